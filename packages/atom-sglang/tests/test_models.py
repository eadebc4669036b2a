"""ATOM's models inside SGLang: registry resolution, strict imports, and logits against transformers.

Prefill (in two chunks, so the second extends a cached prefix) and decode run through SGLang's real
token pool, RadixAttention and LogitsProcessor, with ATOM's "atom" backend and with SGLang's own
torch_native backend (which has no attention sinks: GPT-OSS runs on "atom" only). DeepSeek-V2/V3 run
over SGLang's MLA pool (absorbed attention through RadixAttention); ATOM's "atom" backend refuses them with
the reason. GPT-OSS also runs with MXFP4 experts, SGLang's Mxfp4Config mapped to ATOM's scheme, against
transformers on the dequantized weights.
"""

from __future__ import annotations

import importlib
import pkgutil

import pytest
import torch
import transformers

from atom_sglang.plugin import register
from tiny_models import CONFIGS, MLA_ARCHS, SINK_ARCHS, write_checkpoint, write_mxfp4_checkpoint

assert register()

from sglang.srt.model_loader.weight_utils import safetensors_weights_iterator  # noqa: E402
from sglang.srt.models.registry import ModelRegistry, import_model_classes  # noqa: E402

from sglang_harness import SGLangHarness, publish_server_args  # noqa: E402

ARCHS = sorted(CONFIGS)


def test_every_module_imports_strictly():
    import atom_sglang.models as pkg

    names = [m.name for m in pkgutil.iter_modules(pkg.__path__)]
    assert sorted(names) == ["deepseek_v2", "deepseek_v3", "glm4_moe", "gpt_oss", "llama", "mixtral", "qwen2",
                             "qwen3", "qwen3_moe"]
    for name in names:
        importlib.import_module(f"atom_sglang.models.{name}")  # raises instead of SGLang's log-and-drop
    classes = import_model_classes("atom_sglang.models", strict=True)
    assert sorted(classes) == ARCHS


@pytest.mark.parametrize("arch", ARCHS)
def test_registry_resolves_atom_class(arch):
    cls, resolved = ModelRegistry.resolve_model_cls([arch])
    assert resolved == arch and cls.__name__ == arch
    assert cls.__module__.startswith("atom_sglang.models."), cls


def test_quantization_goes_through_atom_and_unknown_methods_are_refused(tmp_path):
    from sglang.srt.layers.quantization.blockwise_int8 import BlockInt8Config
    from sglang.srt.layers.quantization.fp8 import Fp8Config

    from atom.quantization.fp8 import Fp8LinearMethod
    from atom_sglang.models.llama import LlamaForCausalLM

    # SGLang's --quantization fp8 on a float checkpoint: ATOM's online FP8 (its name picks ATOM's scheme)
    write_checkpoint("LlamaForCausalLM", tmp_path)
    publish_server_args(tmp_path, "atom")
    model = LlamaForCausalLM(config=CONFIGS["LlamaForCausalLM"](), quant_config=Fp8Config())
    assert isinstance(model.model.layers[0].self_attn.qkv_proj.quant_method, Fp8LinearMethod)
    with pytest.raises(NotImplementedError, match=r"cannot serve this quantized checkpoint.*'blockwise_int8' is not "
                                                  r"supported by ATOM; supported: compressed-tensors, fp8"):
        LlamaForCausalLM(config=CONFIGS["LlamaForCausalLM"](),
                         quant_config=BlockInt8Config(is_checkpoint_int8_serialized=True, activation_scheme="dynamic",
                                                      ignored_layers=None, weight_block_size=[128, 128]))


@pytest.fixture(scope="module", params=ARCHS)
def checkpoint(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(request.param)
    hf = write_checkpoint(request.param, path)
    return request.param, path, hf


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.mark.parametrize("backend", ["atom", "torch_native"])
def test_prefill_decode_logits_match_transformers(checkpoint, backend):
    arch, path, hf = checkpoint
    if arch in SINK_ARCHS and backend == "torch_native":
        pytest.skip("SGLang's torch_native backend has no attention sinks (SGLang refuses it for GPT-OSS)")
    _check_prefill_decode(path, hf, backend)


@pytest.fixture(scope="module")
def gpt_oss_mxfp4(tmp_path_factory):
    root = tmp_path_factory.mktemp("gpt_oss_mxfp4")
    write_checkpoint("GptOssForCausalLM", root / "dense")
    return root / "dense", root / "mxfp4", write_mxfp4_checkpoint(root / "dense", root / "mxfp4")


def test_gpt_oss_mxfp4_logits_match_transformers_on_dequantized_weights(gpt_oss_mxfp4):
    """SGLang's Mxfp4Config, as its loader builds it for this checkpoint on a GPU, handed to ATOM's class.
    (On CPU, SGLang's config check lists no mxfp4 method and refuses the checkpoint before any model code
    runs, so the process config published here is the dense twin's.)"""
    from sglang.srt.layers.quantization.mxfp4 import Mxfp4Config

    dense, path, hf = gpt_oss_mxfp4
    config = transformers.AutoConfig.from_pretrained(path)
    model = _check_prefill_decode(path, hf, "atom", Mxfp4Config.from_config(config.quantization_config),
                                  published=dense)
    experts = model.model.layers[0].mlp.experts
    assert experts.w13_weight.dtype == torch.uint8 and type(experts.quant_method).__name__ == "Mxfp4SwigluOaiMethod"


def _check_prefill_decode(path, hf, backend: str, quant_config=None, published=None):
    config = transformers.AutoConfig.from_pretrained(path)
    arch = config.architectures[0]
    # SGLang's config-time checks accept only its own backends for GPT-OSS: publish one of them (the
    # harness below drives `backend` itself).
    publish_server_args(published or path, "triton" if arch in SINK_ARCHS else backend)
    cls, _ = ModelRegistry.resolve_model_cls(config.architectures)
    model = cls(config=config, quant_config=quant_config).float().eval()
    loaded = model.load_weights(safetensors_weights_iterator([str(p) for p in path.glob("*.safetensors")]))
    assert loaded == {n for n, _ in model.named_parameters(remove_duplicate=False)}

    torch.manual_seed(1)
    prompts = [torch.randint(0, config.vocab_size, (n,)).tolist() for n in (9, 6)]
    if arch in MLA_ARCHS and backend == "atom":
        with pytest.raises(NotImplementedError, match="MLA.*--attention-backend"):
            SGLangHarness(model, config, backend, batch_size=len(prompts))
        return
    harness = SGLangHarness(model, config, backend, batch_size=len(prompts))
    seqs = [[] for _ in prompts]

    def check(logits: torch.Tensor, what: str) -> None:
        with torch.no_grad():
            ref = torch.stack([hf(torch.tensor([s])).logits[0, -1] for s in seqs])
        assert logits.shape == ref.shape
        err = _rel_err(logits.float(), ref)
        assert err < 1e-4, f"{arch}/{backend} {what}: max rel err {err:.2e}"

    for chunk in ([p[:4] for p in prompts], [p[4:] for p in prompts]):  # the second extends a cached prefix
        for s, c in zip(seqs, chunk):
            s.extend(c)
        logits = harness.step(chunk)
        check(logits, f"extend to {[len(s) for s in seqs]}")
    for step in range(3):
        nxt = logits.argmax(-1).tolist()
        for s, t in zip(seqs, nxt):
            s.append(t)
        logits = harness.step([[t] for t in nxt])
        check(logits, f"decode step {step}")
    return model


def test_atom_backend_refuses_the_hybrid_swa_pool_with_the_fix():
    """SGLang's default pool for GPT-OSS keeps the sliding-window layers apart; the atom backend names the
    flag that gives one pool."""
    import types

    from sglang.srt.mem_cache.memory_pool import ReqToTokenPool
    from sglang.srt.mem_cache.swa_memory_pool import SWAKVPool

    from atom_sglang.attention_backend import AtomAttnBackend

    pool = SWAKVPool(size=64, size_swa=32, page_size=1, dtype=torch.float32, head_num=2, head_dim=16,
                     swa_attention_layer_ids=[0], full_attention_layer_ids=[1], device="cpu",
                     enable_memory_saver=False)
    runner = types.SimpleNamespace(device="cpu", dtype=torch.float32, token_to_kv_pool=pool,
                                   req_to_token_pool=ReqToTokenPool(size=2, max_context_len=32, device="cpu",
                                                                    enable_memory_saver=False))
    with pytest.raises(NotImplementedError, match="--disable-hybrid-swa-memory"):
        AtomAttnBackend(runner)



def test_mla_layers_are_found_where_sglang_looks(checkpoint):
    """SGLang's model runner takes `self_attn.attn` (a RadixAttention), or `self_attn.attn_mqa` for DeepSeek."""
    from sglang.srt.layers.radix_attention import RadixAttention
    from sglang.srt.model_executor.model_runner_components.layer_setup import compute_attention_and_moe_layers

    arch, path, _ = checkpoint
    config = transformers.AutoConfig.from_pretrained(path)
    cls, _ = ModelRegistry.resolve_model_cls(config.architectures)
    model = cls(config=config, quant_config=None)
    layers = compute_attention_and_moe_layers(model.model).attention_layers
    assert [type(a) for a in layers] and all(isinstance(a, RadixAttention) for a in layers)
    assert [a.layer_id for a in layers] == list(range(config.num_hidden_layers))
    if arch in MLA_ARCHS:  # one latent "KV head" of kv_lora_rank + rope dims, values the first kv_lora_rank
        assert {(a.tp_k_head_num, a.qk_head_dim, a.v_head_dim) for a in layers} == {
            (1, config.kv_lora_rank + config.qk_rope_head_dim, config.kv_lora_rank)}


@pytest.mark.parametrize("arch", sorted(MLA_ARCHS))
def test_mtp_layers_of_a_checkpoint_load_and_are_skipped(arch, tmp_path):
    """SGLang drafts with its own MTP model: the target loads a checkpoint with an MTP layer without error and
    holds no copy of it; a tensor of a layer past the MTP layers is still refused."""
    import safetensors.torch

    hf = write_checkpoint(arch, tmp_path)
    file = next(tmp_path.glob("*.safetensors"))
    weights = safetensors.torch.load_file(file)
    n = hf.config.num_hidden_layers
    mtp = {k.replace(f"model.layers.{n - 1}.", f"model.layers.{n}."): t.clone() for k, t in weights.items()
           if k.startswith(f"model.layers.{n - 1}.")}
    mtp[f"model.layers.{n}.eh_proj.weight"] = torch.randn(hf.config.hidden_size, 2 * hf.config.hidden_size)
    config = transformers.AutoConfig.from_pretrained(tmp_path)
    config.num_nextn_predict_layers = 1
    cls, _ = ModelRegistry.resolve_model_cls(config.architectures)
    model = cls(config=config, quant_config=None)
    loaded = model.load_weights(iter({**weights, **mtp}.items()))
    assert loaded == {name for name, _ in model.named_parameters(remove_duplicate=False)}
    assert not hasattr(model, "mtp")
    with pytest.raises(ValueError, match=f"model.layers.{n + 1}.eh_proj.weight"):
        model.load_weights(iter({f"model.layers.{n + 1}.eh_proj.weight": mtp[f"model.layers.{n}.eh_proj.weight"]}
                                .items()))


def test_checkpoint_k_scale_is_the_latent_scale_sglang_reads(tmp_path):
    """A DeepSeek checkpoint's per-layer k_scale (vLLM's / ModelOpt's spellings) goes to the layer's
    RadixAttention as SGLang's backends read it (k_scale tensor for the triton backend's write, k_scale_float for
    its descale) and, the values being the same latent row, as its v_scale too; a checkpoint v_scale is ignored."""
    import safetensors.torch

    write_checkpoint("DeepseekV3ForCausalLM", tmp_path)
    publish_server_args(tmp_path, "torch_native")
    config = transformers.AutoConfig.from_pretrained(tmp_path)
    cls, _ = ModelRegistry.resolve_model_cls(config.architectures)
    model = cls(config=config, quant_config=None).float().eval()
    weights = safetensors.torch.load_file(next(tmp_path.glob("*.safetensors")))
    weights.update({"model.layers.0.self_attn.k_scale": torch.tensor(0.02),
                    "model.layers.1.self_attn.k_proj.k_scale": torch.tensor(0.03),
                    "model.layers.1.self_attn.v_proj.v_scale": torch.tensor(5.0)})
    model.load_weights(iter(weights.items()))
    for layer, want in enumerate((0.02, 0.03)):
        attn = model.model.layers[layer].self_attn.attn_mqa
        assert (attn.k_scale_float, attn.v_scale_float) == pytest.approx((want, want))
        assert (float(attn.k_scale), float(attn.v_scale)) == pytest.approx((want, want))
