"""FP8 checkpoints through ATOM's models (CPU: the torch references) against transformers.

Each case writes a tiny transformers checkpoint (weights spread as in test_quantization.py), converts it with
tools/quantize_fp8.py (block, per-tensor, compressed-tensors; or loads the float checkpoint with
quantization="fp8", quantized per channel at load time) and drives ATOM through the paged KV path (block size
4 < the prompt): a prefill, then decode steps fed with the reference's greedy tokens. Two references run on
the weights the FP8 checkpoint dequantizes to (quantize_fp8.py --dequantize), in float32:
- the oracle: transformers with the input of every quantized linear (experts' inputs and intermediate
  activations included) quantized the way ATOM's FP8 GEMMs do (atom.ops.quant_fp8: per 1 x bk group for block
  checkpoints, per token otherwise). It differs from ATOM's FP8 path by float32 rounding only, so the logits
  must agree to MAX_ORACLE_FLIP_ERR (max |diff| / max |logit| at the worst position): a rounding-level difference
  can move an element across an e4m3 rounding boundary, a 2^-4 step of one activation, hence not 1e-5 (most
  draws agree to ~4e-7). MoE models amplify such a flip past that bound, so a MoE draw with one (seen in the
  residual streams after the decoder layers) is redrawn and the draw kept is held to MAX_ROUNDING_ERR (MOE_DRAWS);
- transformers alone: the float model. ATOM differs from it by activation quantization, whose bound per
  quantized linear (atom/ops/quant_fp8.py) is |y_hat - y| <= 2^-4 (|x| @ |W|^T) + 2^-10 (s @ |W|^T) per
  element, about 2.5% RMS. Asserted: dense models' relative-norm logit error <= sqrt(n) * 2^-4 for the n
  quantized linears a token passes (4 per layer); and greedy tokens equal wherever the float model's top-2
  gap exceeds twice what activation quantization moves that position's logits (|oracle - float|_inf): where
  MoE routing flips (a small shift of the router's input changes the experts) that shift is large and the
  position counts as a near tie.
"""

from __future__ import annotations

import contextlib
import math
import os
import sys

import pytest
import torch
import transformers
from fp8_oracle import quantized_linear_inputs, quantized_params
from paged_harness import PagedHarness
from safetensors.torch import load_file

from atom.loader import load_model
from atom.quantization.fp8 import Fp8LinearMethod, Fp8MoEMethod
from atom.quantization.unquantized import UnquantizedLinearMethod

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "..", "tools"))
import quantize_fp8  # noqa: E402

PROMPT = [5, 9, 2, 77, 3, 14, 8]
DECODE_STEPS = 7
# The worst position (MoE: the median one): float32 rounding can put an activation (or a per-token scale) on the other
# side of an e4m3 rounding midpoint than the oracle's, a one-code step that a tiny model carries to its logits
# (and, in the prompt, to every later position through the KV cache): up to 1.06e-2 in a scan of 80 seeds for
# each of three llama cases (ATOM_TEST_SEED=123518 replays it for llama_tensor, 123454 for llama_online); the
# other draws stay at ~4e-7. The quantization itself is held bit-exact by the op tests (test_fp8_ops.py).
MAX_ORACLE_FLIP_ERR = 2e-2
RESULTS: dict[str, str] = {}

ARCHS = {
    # GQA, biases on q/k/v and o (o's added after the reduction)
    "llama": ("LlamaConfig", dict(num_key_value_heads=2, attention_bias=True)),
    # qk-norm (the fused qk-norm/rope/cache op), one MoE layer (intermediate 24: partial 16-row blocks) and
    # one dense layer
    "qwen3_moe": ("Qwen3MoeConfig", dict(num_key_value_heads=2, head_dim=16, num_experts=4, num_experts_per_tok=2,
                                         moe_intermediate_size=24, norm_topk_prob=True, mlp_only_layers=[1])),
    # block_sparse_moe.experts.<e>.w1/w2/w3 checkpoint names
    "mixtral": ("MixtralConfig", dict(num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2)),
    # MLA (q_lora, kv_a_proj_with_mqa of 40 rows: a partial block) + DeepSeekMoE with a shared expert
    "deepseek_v3": ("DeepseekV3Config", dict(num_key_value_heads=4, q_lora_rank=24, kv_lora_rank=32,
                                             qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16,
                                             moe_intermediate_size=32, n_routed_experts=4, num_experts_per_tok=2,
                                             n_shared_experts=1, n_group=1, topk_group=1, norm_topk_prob=True,
                                             first_k_dense_replace=1, routed_scaling_factor=1.0)),
}

# name -> (architecture, format, block size)
CASES = {
    # block [24, 32]: q (64 rows) is not a multiple of 24, so the merged QKV / gate-up scales are expanded
    # to one row per output channel after loading
    "llama_block": ("llama", "fp8-block", (24, 32)),
    "llama_tensor": ("llama", "fp8-tensor", None),
    "qwen3_moe_block": ("qwen3_moe", "fp8-block", (16, 32)),
    "qwen3_moe_compressed": ("qwen3_moe", "compressed-tensors", None),
    "mixtral_tensor": ("mixtral", "fp8-tensor", None),
    "llama_online": ("llama", "online", None),
    "qwen3_moe_online": ("qwen3_moe", "online", None),
    "deepseek_v3_block": ("deepseek_v3", "fp8-block", (16, 16)),
}


def write_float(path, arch: str) -> None:
    cls, extra = ARCHS[arch]
    config = getattr(transformers, cls)(vocab_size=256, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                        intermediate_size=96, max_position_embeddings=64, tie_word_embeddings=False,
                                        **extra)
    hf = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for p in hf.parameters():  # spread (HF init leaves biases at 0 and norms at 1)
            p.copy_(torch.randn_like(p) / math.sqrt(p.shape[-1]) if p.dim() > 1 else 1 + 0.2 * torch.randn_like(p))
    hf.save_pretrained(path)


@pytest.fixture
def float_checkpoint(fresh_seed, tmp_path):
    """write(arch) -> the path of a fresh float checkpoint. Drawn after this test's own seed is set (fresh_seed),
    never from what earlier tests left in the global RNG, so ATOM_TEST_SEED replays it in any order."""
    drawn = 0

    def write(arch: str):
        nonlocal drawn
        drawn += 1
        path = tmp_path / f"float_{arch}_{drawn}"
        write_float(path, arch)
        return path

    return write


def atom_logits(path, tokens: list[int], streams: list | None = None,
                **load_kw) -> tuple[torch.Tensor, torch.nn.Module]:
    """Logits of the prompt's last token and of each decode step (fed `tokens` after the prompt). streams: gets
    each decoder layer's output residual stream [tokens, hidden], every token in order (prompt, then decode)."""
    model, _ = load_model(str(path), dtype="float32", progress=False, **load_kw)
    layers = model.model.layers
    steps: list[list[torch.Tensor]] = [[] for _ in layers]
    # a layer returns (its MLP's output, the residual before it): the stream after it is their sum
    hooks = [layer.register_forward_hook(lambda m, a, o, i=i: steps[i].append((o[0] + o[1]).detach()))
             for i, layer in enumerate(layers)] if streams is not None else []
    harness = PagedHarness(model, num_blocks=32, block_size=4)
    seqs = harness.add(1)
    out = [harness.step([PROMPT], seqs)]
    for t in tokens[len(PROMPT):]:
        out.append(harness.step([[t]], seqs))
    for h in hooks:
        h.remove()
    if streams is not None:
        streams.extend(torch.cat(per).reshape(-1, per[0].shape[-1]) for per in steps)
    return torch.cat(out), model


def hf_logits(path, tokens: list[int], quantize: set[str] | None = None, block_size=None,
              streams: list | None = None) -> torch.Tensor:
    """streams: gets each decoder layer's output [tokens, hidden] (as atom_logits' streams)."""
    # the eager experts loop calls F.linear per expert (the grouped-GEMM implementations do not)
    hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, experts_implementation="eager")
    ctx = quantized_linear_inputs(hf, quantize, block_size) if quantize else contextlib.nullcontext()
    hooks = [layer.register_forward_hook(
        lambda m, a, o: streams.append((o[0] if isinstance(o, tuple) else o)[0].detach()))
        for layer in hf.model.layers] if streams is not None else []
    with torch.no_grad(), ctx:
        logits = hf(torch.tensor([tokens])).logits[0, len(PROMPT) - 1:]
    for h in hooks:
        h.remove()
    return logits


def hf_greedy(path) -> list[int]:
    hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    with torch.no_grad():
        out = hf.generate(torch.tensor([PROMPT]), max_new_tokens=DECODE_STEPS, do_sample=False)
    return out[0].tolist()


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


# A dense model's greedy check needs a position whose top-2 gap beats the quantization shift; a random tiny
# llama has none in ~2% of draws (per-tensor: 6 of 300 seeds), so its checkpoint is redrawn (from the same
# seeded stream) up to this many times before the guard below fails.
DENSE_DRAWS = 4
# MoE: a one-code e4m3 flip (MAX_ORACLE_FLIP_ERR's) in a tiny MoE moves its logits by up to 5e-2 and, early in the
# sequence, every later position through the KV cache (qwen3_moe_online with ATOM_TEST_SEED=1448729891: the first
# decode token's stream 2.6e-2 apart, the median position 2.5e-2; stop 55). A flip shows in the residual streams
# after the decoder layers: those of draws without one agree to float32 rounding (2-8e-7 relative, every MoE case,
# seeds 1-3). So a MoE checkpoint whose streams leave the oracle's by more than STREAM_ROUNDING at any token is
# redrawn, up to MOE_DRAWS times (a flip in ~1 of 10 draws: all four ~1e-4), and the draw kept is held to
# MAX_ROUNDING_ERR at every position: tighter than the old median bound, which such a flip could fail.
MOE_DRAWS = 4
STREAM_ROUNDING = 1e-4
MAX_ROUNDING_ERR = 1e-4


def stream_gap(atom_streams: list[torch.Tensor], oracle_streams: list[torch.Tensor]) -> float:
    """The largest difference between ATOM's and the oracle's residual streams after any decoder layer, at any
    token, relative to that layer's largest oracle value."""
    assert len(atom_streams) == len(oracle_streams) > 0
    return max(float((a - o).abs().max() / o.abs().max()) for a, o in zip(atom_streams, oracle_streams, strict=True))


def references(src, arch: str, fmt: str, block, out, streams: list | None = None) -> tuple:
    """The FP8 checkpoint of `src`, what it dequantizes to, the float model's greedy tokens on it, the names of
    its quantized weights, and the two references' logits on those tokens (oracle, float model). streams: gets the
    oracle's residual stream after each decoder layer (hf_logits)."""
    # the reference weights: what the checkpoint dequantizes to (online: per-channel quantization with float32
    # scales, which is what compressed-tensors of a float32 model stores)
    fp8 = out / "fp8"
    quantize_fp8.quantize_checkpoint(str(src), str(fp8), "compressed-tensors" if fmt == "online" else fmt,
                                     block or (128, 128))
    deq = out / "dequantized"
    quantize_fp8.dequantize_checkpoint(str(fp8), str(deq))
    tokens = hf_greedy(deq)
    quantized = quantized_params(fp8)
    if arch == "deepseek_v3":
        # MLA's absorbed attention multiplies by kv_b_proj's dequantized weight in float (as vLLM's MLA does):
        # its input, the latent cache, is never quantized
        quantized = {n for n in quantized if ".kv_b_proj." not in n}
    return fp8, deq, tokens, quantized, hf_logits(deq, tokens, quantized, block, streams), hf_logits(deq, tokens)


def decisive_positions(oracle: torch.Tensor, plain: torch.Tensor) -> torch.Tensor:
    """Where the float model's top-2 gap exceeds twice what activation quantization moves that position."""
    shift = (oracle - plain).abs().amax(-1)
    top2 = plain.topk(2, -1).values
    return (top2[:, 0] - top2[:, 1]) > 2 * shift


@pytest.mark.parametrize("case", list(CASES))
def test_fp8_checkpoint_logits(case, float_checkpoint, tmp_path):
    arch, fmt, block = CASES[case]
    gaps = []
    for draw in range(DENSE_DRAWS if arch == "llama" else MOE_DRAWS):
        src = float_checkpoint(arch)
        oracle_streams, atom_streams = [], []
        fp8, deq, tokens, quantized, oracle, plain = references(src, arch, fmt, block, tmp_path / f"draw{draw}",
                                                                oracle_streams)
        decisive = decisive_positions(oracle, plain)
        if arch == "llama" and not bool(decisive.any()):
            continue
        load = {"quantization": "fp8"} if fmt == "online" else {}
        atom, model = atom_logits(src if fmt == "online" else fp8, tokens, atom_streams, **load)
        gaps.append(stream_gap(atom_streams, oracle_streams))
        if arch == "llama" or gaps[-1] <= STREAM_ROUNDING:
            break
    # (all MOE_DRAWS with a flip is a ~1e-4 event; a kernel error moves every draw's streams)
    assert arch == "llama" or gaps[-1] <= STREAM_ROUNDING, (case, "every draw's streams left the oracle's", gaps)
    methods = {type(m.quant_method) for m in model.modules() if hasattr(m, "quant_method")}
    assert Fp8LinearMethod in methods and (arch == "llama" or Fp8MoEMethod in methods), methods

    if arch == "deepseek_v3":
        # the reference leaves kv_b_proj's input unquantized (references()): so must ATOM
        assert model.model.layers[0].self_attn.kv_b_proj.quant_method.dense is not None
    plain_err = float((atom - plain).norm() / plain.norm())
    if arch == "llama":
        oracle_err = _rel(atom, oracle)
        assert oracle_err < MAX_ORACLE_FLIP_ERR, (case, oracle_err)
    else:
        # MoE: a draw without a one-code flip (MOE_DRAWS), every position to float32 rounding
        oracle_err = _rel(atom, oracle)
        assert oracle_err < MAX_ROUNDING_ERR, (case, oracle_err, gaps)
    if arch == "llama":
        bound = math.sqrt(4 * 2) * 2**-4
        assert plain_err <= bound, (case, plain_err, bound)
    # (a tiny MoE's routing can flip at every position, leaving no decisive one; a dense model was redrawn until
    # it had one: all DENSE_DRAWS without is a ~1e-7 event, not a draw to shrug off)
    assert bool(decisive.any()) or arch != "llama", f"{case}: every position is a near tie"
    assert torch.equal(atom.argmax(-1)[decisive], plain.argmax(-1)[decisive]), case
    RESULTS[case] = (f"vs oracle {oracle_err:.1e}, vs float model {plain_err:.3f} (rel norm), greedy equal at "
                     f"{int(decisive.sum())}/{len(decisive)} decisive positions (checkpoint draw {draw + 1})")
    print(f"{case}: {RESULTS[case]}")


def test_ignored_modules_stay_float_and_a_split_merged_layer_is_refused(float_checkpoint, tmp_path):
    """compressed-tensors `ignore` (a regex, as llm-compressor writes it): o_proj stays in float in ATOM too and
    the model still matches its oracle; ignoring one shard of a merged layer is one clear error."""
    fp8, deq = tmp_path / "fp8", tmp_path / "deq"
    quantize_fp8.quantize_checkpoint(str(float_checkpoint("llama")), str(fp8), "compressed-tensors",
                                     ignore=("re:.*self_attn\\.o_proj$",))
    quantize_fp8.dequantize_checkpoint(str(fp8), str(deq))
    tokens = hf_greedy(deq)
    atom, model = atom_logits(fp8, tokens)
    attn = model.model.layers[0].self_attn
    assert isinstance(attn.o_proj.quant_method, UnquantizedLinearMethod)
    assert attn.o_proj.weight.dtype == torch.float32
    assert isinstance(attn.qkv_proj.quant_method, Fp8LinearMethod)
    quantized = quantized_params(fp8)
    assert not any("o_proj" in n for n in quantized)
    assert _rel(atom, hf_logits(deq, tokens, quantized)) < MAX_ORACLE_FLIP_ERR

    split = tmp_path / "split"
    quantize_fp8.quantize_checkpoint(str(float_checkpoint("llama")), str(split), "compressed-tensors",
                                     ignore=("model.layers.0.self_attn.k_proj",))
    with pytest.raises(ValueError, match=r"q_proj.*k_proj.*v_proj are merged into one layer .*same precision"):
        load_model(str(split), dtype="float32", progress=False)


@pytest.fixture(scope="module", autouse=True)
def report():
    yield
    for case, line in RESULTS.items():
        print(f"FP8 {case}: {line}")


def _edit(path, config_edit=None, drop: tuple[str, ...] = (), retype: tuple[str, ...] = ()) -> None:
    import json

    from safetensors.torch import save_file

    if config_edit is not None:
        with open(os.path.join(path, "config.json")) as f:
            cfg = json.load(f)
        config_edit(cfg["quantization_config"])
        with open(os.path.join(path, "config.json"), "w") as f:
            json.dump(cfg, f)
    if drop or retype:
        file = os.path.join(path, "model.safetensors")
        tensors = {k: (v.float() if k in retype else v) for k, v in load_file(file).items() if k not in drop}
        save_file(tensors, file)


BAD = {
    "unknown method": (dict(config_edit=lambda qc: qc.update(quant_method="awq")),
                       r"quantization_config.quant_method='awq' is not supported by ATOM; supported: "
                       r"(.*, )?compressed-tensors, fp8"),
    "static activations": (dict(config_edit=lambda qc: qc.update(activation_scheme="static")),
                           r"activation_scheme 'static' is not supported"),
    "bad block size": (dict(config_edit=lambda qc: qc.update(weight_block_size=[0, 32])),
                       r"weight_block_size must be two positive integers"),
    "missing scale of a merged shard": (dict(drop=("model.layers.0.self_attn.k_proj.weight_scale_inv",)),
                                        r"model.layers.0.self_attn.k_proj.weight_scale_inv"),
    "missing scale": (dict(drop=("model.layers.1.mlp.down_proj.weight_scale_inv",)),
                      r"lacks tensors for: model.layers.1.mlp.down_proj.weight_scale_inv"),
    "float weight in an FP8 checkpoint": (dict(retype=("model.layers.0.self_attn.o_proj.weight",)),
                                          r"model.layers.0.self_attn.o_proj.*has dtype torch.float32.*says the "
                                          r"module is FP8"),
    "scale of another block size": (dict(config_edit=lambda qc: qc.update(weight_block_size=[16, 32])),
                                    r"cannot load checkpoint tensor 'model.layers.*weight_scale_inv': shape mismatch"),
}


@pytest.mark.parametrize("bad", list(BAD))
def test_a_bad_fp8_checkpoint_gets_one_clear_error(bad, float_checkpoint, tmp_path):
    edit, message = BAD[bad]
    fp8 = tmp_path / "fp8"
    quantize_fp8.quantize_checkpoint(str(float_checkpoint("llama")), str(fp8), "fp8-block", (32, 32))
    _edit(fp8, **edit)
    with pytest.raises(ValueError, match=message):
        load_model(str(fp8), dtype="float32", progress=False)
