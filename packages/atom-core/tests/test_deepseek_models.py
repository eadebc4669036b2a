"""DeepSeek-V2/V3 (MLA + DeepSeekMoE) and GLM-4-MoE vs transformers on tiny random checkpoints.

Same method as test_models_parity.py (its helpers are reused): a 2-3 layer checkpoint written with
`save_pretrained`, transformers' greedy decoding as the oracle, ATOM driven through the paged path (block
size 4 < the prompts; MLA layers on their latent caches): prompts of different lengths prefilled in two
chunks (the second over a cached prefix: MLA's prefill path), then 8 decode steps (MLA's absorbed decode
path). float32 logits must agree to a max relative error < 1e-4 at every compared position.

The cases cover: q_lora_rank on and off, dense first layers (first_k_dense_replace), shared experts,
V2's greedy and group_limited_greedy routing, V3's sigmoid routing with e_score_correction_bias and
n_group > 1, norm_topk_prob on and off, routed_scaling_factor, interleaved and neox rope, yarn rope with
mscale != mscale_all_dim (rope attention factor and softmax scale), GLM's partial rotary, qk-norm and bias.
The MTP layers of a checkpoint load and are kept; a tensor of a layer past them still raises.
"""

from __future__ import annotations

import json
import math

import pytest
import safetensors.torch
import torch
import transformers
from test_models_parity import DECODE_STEPS, Reference, _atom_logits, _hf_greedy, _randomize_, rel_err
from transformers import AutoModelForCausalLM

from atom.layers.attention import attention_specs
from atom.layers.kv_cache import MLAKVSpec, kv_cache_specs
from atom.layers.mla import mla_attention_specs
from atom.loader import load_model

VOCAB = 320
PROMPT_LENS = (7, 12, 10)

_MLA = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, moe_intermediate_size=24, num_attention_heads=4,
            num_key_value_heads=4,
            kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=12, max_position_embeddings=128,
            rms_norm_eps=1e-6, tie_word_embeddings=False, first_k_dense_replace=1)
_GLM = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, moe_intermediate_size=24, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, max_position_embeddings=128, rms_norm_eps=1e-6,
            tie_word_embeddings=False, first_k_dense_replace=1)

CASES = {
    # V2-Lite-like: no q_lora, greedy softmax routing, 2 shared experts, yarn with mscale != mscale_all_dim
    "v2_lite_greedy_yarn": ("DeepseekV2Config", {**_MLA, "q_lora_rank": None, "num_hidden_layers": 3,
                                                 "n_routed_experts": 8, "num_experts_per_tok": 2, "n_shared_experts": 2,
                                                 "topk_method": "greedy", "routed_scaling_factor": 1.0,
                                                 "rope_parameters": {"rope_type": "yarn", "factor": 4.0,
                                                                     "original_max_position_embeddings": 32,
                                                                     "mscale": 1.0, "mscale_all_dim": 0.8,
                                                                     "beta_fast": 32, "beta_slow": 1}}),
    # V2: q_lora, group-limited greedy over 4 groups, attention and MLP bias, routed scaling
    "v2_group_limited_bias": ("DeepseekV2Config", {**_MLA, "q_lora_rank": 24, "num_hidden_layers": 2,
                                                   "n_routed_experts": 8, "num_experts_per_tok": 3,
                                                   "n_shared_experts": 1, "topk_method": "group_limited_greedy",
                                                   "n_group": 4, "topk_group": 2, "routed_scaling_factor": 1.5,
                                                   "attention_bias": True, "mlp_bias": True}),
    # V3: q_lora, sigmoid + correction bias, n_group 4 / topk_group 2, norm_topk, interleaved rope
    "v3_grouped_norm_topk": ("DeepseekV3Config", {**_MLA, "q_lora_rank": 24, "num_hidden_layers": 2,
                                                  "n_routed_experts": 8, "num_experts_per_tok": 2, "n_shared_experts": 1,
                                                  "n_group": 4, "topk_group": 2, "norm_topk_prob": True,
                                                  "routed_scaling_factor": 2.5}),
    # V3: no q_lora, no norm_topk, single group, neox rope (rope_interleave false), two dense layers
    "v3_no_norm_topk_neox": ("DeepseekV3Config", {**_MLA, "q_lora_rank": None, "num_hidden_layers": 3,
                                                  "first_k_dense_replace": 2, "n_routed_experts": 6,
                                                  "num_experts_per_tok": 2, "n_shared_experts": 1, "n_group": 1,
                                                  "topk_group": 1, "norm_topk_prob": False,
                                                  "routed_scaling_factor": 1.0, "rope_interleave": False}),
    # GLM-4-MoE: partial rotary 0.5, qk-norm, q/k/v bias, grouped sigmoid routing
    "glm4_moe_qk_norm_partial_rope": ("Glm4MoeConfig", {**_GLM, "num_hidden_layers": 2, "n_routed_experts": 8,
                                                        "num_experts_per_tok": 2, "n_shared_experts": 1, "n_group": 2,
                                                        "topk_group": 1, "norm_topk_prob": True,
                                                        "routed_scaling_factor": 1.8, "use_qk_norm": True,
                                                        "attention_bias": True}),
}


def _randomize_router_bias_(model: torch.nn.Module) -> None:
    """e_score_correction_bias is a zero buffer in transformers: give it values of the size of the sigmoid
    score gaps, so it changes the choices (and a bias applied to the weights would show)."""
    with torch.no_grad():
        for name, buf in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                buf.copy_(0.1 * torch.randn_like(buf))


def _write_case(name: str, path, **changes) -> transformers.PreTrainedModel:
    """CASES[name] (with config `changes`, if any) written to `path` with spread-out random weights."""
    config_class, overrides = CASES[name]
    config = getattr(transformers, config_class)(**{**overrides, **changes})
    hf = AutoModelForCausalLM.from_config(config, attn_implementation="eager", dtype=torch.float32).eval()
    _randomize_(hf)
    _randomize_router_bias_(hf)
    hf.save_pretrained(path)
    return hf


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    made: dict[str, Reference] = {}

    def get(name: str) -> Reference:
        if name not in made:
            path = tmp_path_factory.mktemp(name)
            hf = _write_case(name, path)
            prompts = [torch.randint(0, VOCAB, (n,)).tolist() for n in PROMPT_LENS]
            split = min(PROMPT_LENS) - 3
            tokens, logits = _hf_greedy(hf, prompts, DECODE_STEPS, split)
            made[name] = Reference(str(path), prompts, tokens, torch.cat(logits), split)
        return made[name]

    return get


@pytest.mark.parametrize("name", list(CASES))
def test_float32_logits_match_transformers(name, reference, parity_report):
    ref = reference(name)
    model, config = load_model(ref.path, dtype="float32", progress=False)
    assert type(model).__name__ == config.architectures[0]
    got = torch.cat(_atom_logits(model, ref.prompts, ref.tokens, ref.split))
    err = rel_err(got, ref.logits)
    parity_report.append(f"float32  {name:32s} {config.architectures[0]:22s} rel_err={err:.2e} "
                         f"({got.shape[0]} positions)")
    assert err < 1e-4


def test_mla_cache_is_one_latent_tensor_per_layer(reference):
    """The KV-cache specs the host allocates from: one [blocks, block_size, L + R] tensor per MLA layer, in
    the model's dtype; the layers' attention specs carry the softmax scale."""
    ref = reference("v3_grouped_norm_topk")
    model, config = load_model(ref.path, dtype="float32", progress=False)
    specs = kv_cache_specs(model)
    assert [s.layer_idx for s in specs] == list(range(config.num_hidden_layers))
    for s in specs:
        assert isinstance(s, MLAKVSpec) and s.kind == "mla" and s.dtype == torch.float32
        assert s.cache_shape(10, 4) == (10, 4, config.kv_lora_rank + config.qk_rope_head_dim)
        cache = s.allocate(3, 4, "cpu")
        assert cache.latent.shape == (3, 4, config.kv_lora_rank + config.qk_rope_head_dim) and cache.scale is None
    for s in mla_attention_specs(model):
        assert s.scale == pytest.approx((config.qk_nope_head_dim + config.qk_rope_head_dim) ** -0.5)


def test_yarn_mscale_enters_the_softmax_scale(reference):
    ref = reference("v2_lite_greedy_yarn")
    model, _ = load_model(ref.path, dtype="float32", progress=False)
    mscale = 0.1 * 0.8 * math.log(4.0) + 1.0
    assert mla_attention_specs(model)[0].scale == pytest.approx((16 + 8) ** -0.5 * mscale * mscale)
    # every MLA layer's rope reads the one shared cos|sin table (atom.layers.rotary)
    tables = {id(layer.self_attn.rotary_emb.table) for layer in model.model.layers}
    assert len(tables) == 1 and len(model.model.layers) == 3


def _mtp_tensors(config, weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """An MTP layer as DeepSeek-V3's checkpoints name it: layer num_hidden_layers, a decoder block (a copy of
    the last layer's tensors) plus enorm, hnorm, eh_proj, shared_head and a repeated embed_tokens."""
    n, h = config.num_hidden_layers, config.hidden_size
    last = f"model.layers.{n - 1}."
    mtp = {name.replace(last, f"model.layers.{n}."): t.clone() for name, t in weights.items() if name.startswith(last)}
    mtp.update({f"model.layers.{n}.enorm.weight": torch.rand(h), f"model.layers.{n}.hnorm.weight": torch.rand(h),
                f"model.layers.{n}.eh_proj.weight": torch.randn(h, 2 * h),
                f"model.layers.{n}.shared_head.norm.weight": torch.rand(h),
                f"model.layers.{n}.shared_head.head.weight": torch.randn(config.vocab_size, h),
                f"model.layers.{n}.embed_tokens.weight": weights["model.embed_tokens.weight"].clone()})
    return mtp


@pytest.mark.parametrize("name", ["v3_grouped_norm_topk", "glm4_moe_qk_norm_partial_rope"])
def test_mtp_layers_load_and_are_kept(name, tmp_path):
    hf = _write_case(name, tmp_path)
    file = tmp_path / "model.safetensors"
    weights = safetensors.torch.load_file(file)
    mtp = _mtp_tensors(hf.config, weights)
    safetensors.torch.save_file({**weights, **mtp}, file, metadata={"format": "pt"})
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["num_nextn_predict_layers"] == 1

    model, config = load_model(str(tmp_path), dtype="float32", progress=False)
    n = config.num_hidden_layers
    kept = dict(model.mtp.named_parameters())
    assert torch.equal(kept["layers.0.eh_proj.weight"], mtp[f"model.layers.{n}.eh_proj.weight"])
    assert torch.equal(kept["layers.0.shared_head.head.weight"], mtp[f"model.layers.{n}.shared_head.head.weight"])
    assert torch.equal(kept["layers.0.mtp_block.mlp.gate.weight"], mtp[f"model.layers.{n}.mlp.gate.weight"])
    # its attention is kept out of the KV-cache specs (not run yet)
    specs = mla_attention_specs(model) if "v3" in name else attention_specs(model)
    assert [s.layer_idx for s in specs] == list(range(n))
    assert [s.layer_idx for s in kv_cache_specs(model)] == list(range(n))

    # a host that drafts with its own MTP model skips them: loaded without error, not held
    skipping = type(model)(config)
    skipping.keep_mtp_layers = False
    loaded = skipping.load_weights(iter({**weights, **mtp}.items()))
    assert loaded == {n for n, _ in skipping.named_parameters(remove_duplicate=False)}
    assert not hasattr(skipping, "mtp")

    # a layer past num_hidden_layers + num_nextn_predict_layers is still an unknown tensor
    extra = {f"model.layers.{n + 1}.enorm.weight": torch.rand(config.hidden_size)}
    safetensors.torch.save_file({**weights, **mtp, **extra}, file, metadata={"format": "pt"})
    with pytest.raises(ValueError, match=f"model.layers.{n + 1}.enorm.weight"):
        load_model(str(tmp_path), dtype="float32", progress=False)
    # and so is an unknown tensor inside the MTP layer
    bogus = {f"model.layers.{n}.self_attn.bogus.weight": torch.rand(3)}
    safetensors.torch.save_file({**weights, **mtp, **bogus}, file, metadata={"format": "pt"})
    with pytest.raises(ValueError, match="bogus"):
        load_model(str(tmp_path), dtype="float32", progress=False)


def test_host_mla_factory_gets_the_spec_and_kv_b_proj(reference):
    """The MLA seam: a host's factory is called once per layer with the layer's spec and its kv_b_proj (the
    model keeps owning that weight: no second copy among the model's parameters); a plain multi-head
    attention factory is refused with the reason."""
    from atom.layers.attention import paged_attention_factory
    from atom.layers.mla import PagedMLAAttention
    from atom.loader.model_loader import load_config
    from atom.models.deepseek_v3 import DeepseekV3ForCausalLM

    ref = reference("v3_grouped_norm_topk")
    config = load_config(ref.path)
    calls = []

    def factory(spec, kv_b_proj):
        calls.append((spec, kv_b_proj))
        return PagedMLAAttention(spec, kv_b_proj)

    model = DeepseekV3ForCausalLM(config, mla_factory=factory)
    assert [s.layer_idx for s, _ in calls] == list(range(config.num_hidden_layers))
    for (spec, kv_b_proj), layer in zip(calls, model.model.layers, strict=True):
        assert kv_b_proj is layer.self_attn.kv_b_proj and spec.prefix == f"model.layers.{spec.layer_idx}.self_attn.attn"
    assert not [n for n, _ in model.named_parameters(remove_duplicate=False) if ".impl." in n]
    with pytest.raises(ValueError, match="mla_factory"):
        DeepseekV3ForCausalLM(config, attn_factory=paged_attention_factory)


@pytest.mark.parametrize("name", ["v2_lite_greedy_yarn", "glm4_moe_qk_norm_partial_rope", "v2_group_limited_bias"])
def test_shared_experts_run_as_expert_slots(name, reference, monkeypatch):
    """DeepSeekMoE holds its n shared experts as expert slots E .. E + n - 1 (feature block j of the shared
    gate / up / down in slot E + j) and one fused_experts call runs routed and shared together: the slots hold
    exactly the checkpoint's blocks, and the logits equal those of the separate shared MLP
    (ATOM_FUSE_SHARED_EXPERTS=0). MLP biases keep the separate MLP."""
    ref = reference(name)
    weights = safetensors.torch.load_file(f"{ref.path}/model.safetensors")
    fused, config = load_model(ref.path, dtype="float32", progress=False)
    monkeypatch.setenv("ATOM_FUSE_SHARED_EXPERTS", "0")
    separate, _ = load_model(ref.path, dtype="float32", progress=False)
    n, inter = config.n_shared_experts, config.moe_intermediate_size
    moe_layers = [i for i, layer in enumerate(fused.model.layers) if hasattr(layer.mlp, "fused_shared")]
    assert moe_layers
    for i in moe_layers:
        mlp, plain = fused.model.layers[i].mlp, separate.model.layers[i].mlp
        assert plain.fused_shared == 0 and plain.shared_experts is not None
        if getattr(config, "mlp_bias", False):
            assert mlp.fused_shared == 0 and mlp.shared_experts is not None
            continue
        assert mlp.fused_shared == n and mlp.shared_experts is None
        assert mlp.experts.w13.shape[0] == config.n_routed_experts + n
        prefix = f"model.layers.{i}.mlp.shared_experts"
        for j in range(n):
            block = slice(j * inter, (j + 1) * inter)
            slot = config.n_routed_experts + j
            assert torch.equal(mlp.experts.w13[slot, :inter], weights[f"{prefix}.gate_proj.weight"][block])
            assert torch.equal(mlp.experts.w13[slot, inter:], weights[f"{prefix}.up_proj.weight"][block])
            assert torch.equal(mlp.experts.w2[slot], weights[f"{prefix}.down_proj.weight"][:, block])
    got = torch.cat(_atom_logits(fused, ref.prompts, ref.tokens, ref.split))
    want = torch.cat(_atom_logits(separate, ref.prompts, ref.tokens, ref.split))
    assert rel_err(got, want) < 1e-5
    assert rel_err(got, ref.logits) < 1e-4


@pytest.mark.parametrize("name", ["v2_lite_greedy_yarn", "v3_no_norm_topk_neox", "v2_group_limited_bias"])
def test_mla_input_prep_runs_as_one_op(name, reference, monkeypatch):
    """ATOM's paged MLA takes the latent norm, both ropes and the cache write as one mla_norm_rope_cache op
    (DeepseekMLA hands it q_pe and kv_a as the projections give them): logits over prefill in two chunks and
    paged decode equal those of the separate norm / rope / write (ATOM_MLA_FUSED_PREP=0), and transformers'."""
    ref = reference(name)
    fused, _ = load_model(ref.path, dtype="float32", progress=False)
    monkeypatch.setenv("ATOM_MLA_FUSED_PREP", "0")
    separate, _ = load_model(ref.path, dtype="float32", progress=False)
    attn = [layer.self_attn for layer in fused.model.layers]
    assert all(a._fused_prep is not None for a in attn)
    assert all(layer.self_attn._fused_prep is None for layer in separate.model.layers)
    got = torch.cat(_atom_logits(fused, ref.prompts, ref.tokens, ref.split))
    want = torch.cat(_atom_logits(separate, ref.prompts, ref.tokens, ref.split))
    assert rel_err(got, want) < 1e-5
    assert rel_err(got, ref.logits) < 1e-4


@pytest.mark.parametrize("name", ["v2_lite_greedy_yarn", "v3_grouped_norm_topk"])
def test_mla_input_projections_run_as_one_gemm(name, reference, monkeypatch):
    """Unquantized at TP 1, DeepseekMLA reads x with one GEMM: fused_qkv_a_proj holds q_a_proj (q_proj without
    q_lora) then kv_a_proj_with_mqa, exactly the checkpoint's rows; logits equal the two-GEMM layout's
    (ATOM_MLA_FUSED_QKV_A=0) and transformers'."""
    ref = reference(name)
    weights = safetensors.torch.load_file(f"{ref.path}/model.safetensors")
    fused, config = load_model(ref.path, dtype="float32", progress=False)
    monkeypatch.setenv("ATOM_MLA_FUSED_QKV_A", "0")
    separate, _ = load_model(ref.path, dtype="float32", progress=False)
    q_name = "q_a_proj" if config.q_lora_rank else "q_proj"
    for i, layer in enumerate(fused.model.layers):
        attn, prefix = layer.self_attn, f"model.layers.{i}.self_attn"
        assert not hasattr(attn, "kv_a_proj_with_mqa") and separate.model.layers[i].self_attn.fused_qkv_a_proj is None
        expect = torch.cat((weights[f"{prefix}.{q_name}.weight"], weights[f"{prefix}.kv_a_proj_with_mqa.weight"]))
        assert torch.equal(attn.fused_qkv_a_proj.weight, expect)
    got = torch.cat(_atom_logits(fused, ref.prompts, ref.tokens, ref.split))
    want = torch.cat(_atom_logits(separate, ref.prompts, ref.tokens, ref.split))
    assert rel_err(got, want) < 1e-5
    assert rel_err(got, ref.logits) < 1e-4

