"""FP8 KV cache through ATOM's models (CPU, torch references): load_model(kv_cache_dtype="fp8") against the
same model with a float32 cache, and checkpoint KV scales (tools/quantize_fp8.py --kv-cache-scales).

Bound. Each cached element is stored as fp8(x / s) and read as q * s: |x_hat - x| <= 2^-4 |x| + 2^-10 s
(e4m3's half ulp, normal and subnormal range; atom/ops/quant_fp8.py). Keys and values of each layer are two
such error sources of relative size <= 2^-4; to first order, and with the model passing a relative
perturbation of its attention inputs on without amplifying it, the logits' relative-norm error is at most
their sum, 2 L 2^-4 for L layers (0.25 for 2): asserted. Measured 4-5% with unit scales on float weights,
7-10% on FP8 weights with unit or checkpoint scales. Checkpoint (static) scales also saturate entries beyond
the calibration's amax at 448 * scale (as in vLLM). The cache contents of the first layer (same inputs in
both runs) are checked element by element against the float32 run's with the per-element bound (after
saturation).
"""

from __future__ import annotations

import json
import math
import os
import sys

import pytest
import torch
import transformers
from paged_harness import PagedHarness
from safetensors.torch import load_file

from atom.layers.attention import PagedAttention
from atom.loader import load_model

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "..", "tools"))
import quantize_fp8  # noqa: E402

PROMPTS = ([5, 9, 2, 77, 3, 14, 8, 40, 41], [4, 4, 60, 1, 2])
STEPS = 6
LAYERS = 2
BOUND = 2 * LAYERS * 2**-4

ARCHS = {
    "llama": ("LlamaConfig", dict(num_key_value_heads=2)),
    # qk-norm: the fused qk-norm / rope / cache-write op writes the FP8 cache
    "qwen3": ("Qwen3Config", dict(num_key_value_heads=2, head_dim=16)),
}


def write_float(path, arch: str) -> None:
    cls, extra = ARCHS[arch]
    config = getattr(transformers, cls)(vocab_size=256, hidden_size=64, num_hidden_layers=LAYERS,
                                        num_attention_heads=4, intermediate_size=96, max_position_embeddings=64,
                                        tie_word_embeddings=False, **extra)
    hf = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for p in hf.parameters():
            p.copy_(torch.randn_like(p) / math.sqrt(p.shape[-1]) if p.dim() > 1 else 1 + 0.2 * torch.randn_like(p))
    hf.save_pretrained(path)


def run(path, **load_kw):
    """(logits of every step [steps, B, V], the model, its harness): a batch prefill then greedy decode
    steps, the tokens of the float32-cache run fed to both (teacher forcing) via `feed`."""
    model, _ = load_model(str(path), dtype="float32", progress=False, **load_kw)
    harness = PagedHarness(model, num_blocks=16, block_size=4)
    return model, harness


def decode(model, harness, feed: list[list[int]] | None = None) -> tuple[torch.Tensor, list[list[int]]]:
    seqs = harness.add(len(PROMPTS))
    out = [harness.step([list(p) for p in PROMPTS], seqs)]
    tokens = []
    for i in range(STEPS):
        step = feed[i] if feed is not None else out[-1].argmax(-1).tolist()
        tokens.append(step)
        out.append(harness.step([[t] for t in step], seqs))
    return torch.stack(out), tokens


def cached(harness, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
    """float32 K and V of a layer as the cache holds them (dequantized with its scales)."""
    c = harness.caches[layer]
    k, v = c.k.float(), c.v.float()
    if c.k_scale is not None:
        k, v = k * c.k_scale, v * c.v_scale
    return k, v


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    out = {}
    for arch in ARCHS:
        out[arch] = tmp_path_factory.mktemp(arch)
        write_float(out[arch], arch)
    return out


@pytest.mark.parametrize("arch", list(ARCHS))
def test_fp8_kv_cache_decode_within_bound_of_float32_cache(arch, checkpoints):
    ref_model, ref_h = run(checkpoints[arch])
    ref, tokens = decode(ref_model, ref_h)
    model, h = run(checkpoints[arch], kv_cache_dtype="fp8")
    attn = [m for m in model.modules() if isinstance(m, PagedAttention)]
    assert {m.kv_cache_spec.dtype for m in attn} == {torch.float8_e4m3fn}
    assert {(m.kv_cache_spec.k_scale, m.kv_cache_spec.v_scale) for m in attn} == {(1.0, 1.0)}  # vLLM's default
    fp8, _ = decode(model, h, tokens)
    err = float((fp8 - ref).norm() / ref.norm())
    assert err < BOUND, (arch, err, BOUND)
    # layer 0's keys and values come from the same inputs in both runs (later layers see the FP8 error of the
    # layers before): its cache holds what the float32 run's holds, within e4m3's rounding
    for got, want in zip(cached(h, 0), cached(ref_h, 0)):
        assert bool(((got - want).abs() <= 2**-4 * want.abs() + 2**-10).all()), arch
    print(f"FP8 KV cache {arch}: logits rel err {err:.3f} vs float32 cache (bound {BOUND:.3f})")


def test_checkpoint_kv_scales_are_used(checkpoints, tmp_path):
    """A compressed-tensors checkpoint with calibrated k_scale / v_scale (and its kv_cache_scheme): the
    default kv_cache_dtype "auto" then stores an FP8 cache, as vLLM does; every layer's spec and cache carry
    the checkpoint's scales; entries are fp8(x / scale) (the cache holds values of ~1/scale magnitude, not x)
    and the run stays within the bound of the float32-cache run of the same weights."""
    fp8 = tmp_path / "fp8"
    quantize_fp8.quantize_checkpoint(str(checkpoints["qwen3"]), str(fp8), "compressed-tensors", kv_cache_scales=True)
    with open(fp8 / "config.json") as f:
        assert json.load(f)["quantization_config"]["kv_cache_scheme"]["type"] == "float"
    tensors = load_file(str(fp8 / "model.safetensors"))
    want = {i: (float(tensors[f"model.layers.{i}.self_attn.k_scale"]), float(tensors[f"model.layers.{i}.self_attn.v_scale"]))
            for i in range(LAYERS)}
    assert all(k != 1.0 and v != 1.0 for k, v in want.values())

    model, h = run(fp8)  # kv_cache_dtype auto
    attn = sorted((m for m in model.modules() if isinstance(m, PagedAttention)), key=lambda m: m.spec.layer_idx)
    assert {m.kv_cache_spec.dtype for m in attn} == {torch.float8_e4m3fn}
    for i, m in enumerate(attn):
        assert (m.kv_cache_spec.k_scale, m.kv_cache_spec.v_scale) == pytest.approx(want[i])
        assert (float(h.caches[i].k_scale), float(h.caches[i].v_scale)) == pytest.approx(want[i])

    ref_model, ref_h = run(fp8, kv_cache_dtype=torch.float32)
    ref, tokens = decode(ref_model, ref_h)
    got, _ = decode(model, h, tokens)
    err = float((got - ref).norm() / ref.norm())
    assert err < BOUND, err
    for i in range(LAYERS):
        k_raw, k_ref = h.caches[i].k.float(), cached(ref_h, i)[0]
        assert bool((k_raw.abs().amax() > 8 * k_ref.abs().amax())), "entries are not divided by the scale"
    saturated = 0
    for got_t, want_t, s in zip(cached(h, 0), cached(ref_h, 0), want[0]):  # layer 0: same inputs in both runs
        stored = want_t.clamp(-448 * s, 448 * s)
        saturated += int((stored != want_t).sum())
        assert bool(((got_t - stored).abs() <= 2**-4 * stored.abs() + 2**-10 * s).all())
    print(f"FP8 KV cache with checkpoint scales: logits rel err {err:.3f} (bound {BOUND:.3f}), "
          f"{saturated} saturated entries in layer 0")


def test_bad_kv_cache_dtype_is_named(checkpoints):
    with pytest.raises(ValueError, match="kv_cache_dtype 'fp8_e5m2' is not supported .*e4m3.*auto, fp8, fp8_e4m3"):
        load_model(str(checkpoints["llama"]), dtype="float32", progress=False, kv_cache_dtype="fp8_e5m2")
