"""GPT-OSS on CPU: the model against transformers (dense and MXFP4 experts), the MXFP4 format against an
independent definition, and paged attention with sinks and sliding windows against transformers' eager
attention of gpt_oss.

The model cases drive ATOM through the paged KV path of test_models_parity (block size 4 < window 5 <
prompts of 7-12 tokens, prefill in two chunks, then 8 decode steps) and compare the logits at every step.
MXFP4 is weight-only, so ATOM on the MXFP4 checkpoint is held to transformers on the dequantized weights
(transformers reads the same checkpoint and dequantizes it itself) as tightly as the dense case.
"""

from __future__ import annotations

import json
import math
import types

import pytest
import torch
from gpt_oss_checkpoint import CONFIG, quantize_tool, write_dense, write_mxfp4
from safetensors import safe_open
from test_models_parity import DECODE_STEPS, PROMPT_LENS, _atom_logits, _hf_greedy, rel_err
from transformers.models.gpt_oss.modeling_gpt_oss import eager_attention_forward

from atom.loader import load_model
from atom.ops import attention as ref_attn
from atom.ops.mxfp4 import (E2M1_VALUES, FRAG_CODE_BYTES, FRAG_K3, FRAG_MASK, FRAG_MAX_SCALE, FRAG_MUL3,
                             FRAG_SCALE_BIAS, dequantize_mxfp4, pack_fragments, quantize_mxfp4, unpack_fragments)
from atom.testing import assert_bf16_logits_close, bf16_logits_stats



@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    dense_dir, mxfp4_dir = tmp_path_factory.mktemp("gpt_oss_dense"), tmp_path_factory.mktemp("gpt_oss_mxfp4")
    hf_dense = write_dense(dense_dir)
    hf_mxfp4 = write_mxfp4(dense_dir, mxfp4_dir)
    prompts = [torch.randint(0, CONFIG["vocab_size"], (n,)).tolist() for n in PROMPT_LENS]
    return {"dense": (str(dense_dir), hf_dense), "mxfp4": (str(mxfp4_dir), hf_mxfp4), "prompts": prompts,
            "seed": torch.initial_seed()}  # the test seed they were drawn under, printed by a later test's failure


def _reference(checkpoints, experts: str):
    path, hf = checkpoints[experts]
    split = min(PROMPT_LENS) - 3
    tokens, logits = _hf_greedy(hf, checkpoints["prompts"], DECODE_STEPS, split)
    return path, tokens, torch.cat(logits), split


@pytest.mark.parametrize("experts", ["dense", "mxfp4"])
def test_float32_logits_match_transformers(experts, checkpoints, parity_report, request):
    request.node.user_properties.append(("seed", checkpoints["seed"]))
    path, tokens, want, split = _reference(checkpoints, experts)
    model, config = load_model(path, dtype="float32", progress=False)
    assert type(model).__name__ == "GptOssForCausalLM"
    experts_layer = model.model.layers[0].mlp.experts
    assert experts_layer.w13_weight.dtype == (torch.uint8 if experts == "mxfp4" else torch.float32)
    assert [layer.self_attn.attn.spec.sliding_window for layer in model.model.layers] == [5, None]
    got = torch.cat(_atom_logits(model, checkpoints["prompts"], tokens, split))
    err = rel_err(got, want)
    parity_report.append(f"float32  gpt_oss_{experts:26s} GptOssForCausalLM      rel_err={err:.2e} "
                         f"({got.shape[0]} positions)")
    assert err < 1e-4


def test_bfloat16_mxfp4_close_to_transformers(checkpoints, parity_report, request):
    """The serving configuration (bf16 activations, MXFP4 experts) against transformers in float32."""
    request.node.user_properties.append(("seed", checkpoints["seed"]))
    path, tokens, want, split = _reference(checkpoints, "mxfp4")
    model, _ = load_model(path, dtype="bfloat16", progress=False)
    got = torch.cat(_atom_logits(model, checkpoints["prompts"], tokens, split))
    stats = bf16_logits_stats(got, want)
    parity_report.append(f"bfloat16 gpt_oss_mxfp4{'':20s} GptOssForCausalLM      median rel_err "
                         f"{stats['median']:.2e} (worst {stats['worst']:.2e}) top1={stats['top1']:.0%} "
                         f"clear misses {stats['clear_misses']:.0%}")
    assert_bf16_logits_close(stats)  # the bounds of test_models_parity's bf16 cases


def test_mxfp4_checkpoint_has_the_released_layout(checkpoints):
    path = checkpoints["mxfp4"][0]
    with open(f"{path}/config.json") as f:
        assert json.load(f)["quantization_config"] == {
            "modules_to_not_convert": ["model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens",
                                       "lm_head"],
            "quant_method": "mxfp4"}
    e, h, i = CONFIG["num_local_experts"], CONFIG["hidden_size"], CONFIG["intermediate_size"]
    want = {"gate_up_proj_blocks": ((e, 2 * i, h // 32, 16), torch.uint8), "gate_up_proj_scales": ((e, 2 * i, h // 32), torch.uint8),
            "gate_up_proj_bias": ((e, 2 * i), torch.float32), "down_proj_blocks": ((e, h, i // 32, 16), torch.uint8),
            "down_proj_scales": ((e, h, i // 32), torch.uint8), "down_proj_bias": ((e, h), torch.float32)}
    with safe_open(f"{path}/model.safetensors", "pt") as f:
        names = set(f.keys())
        for layer in range(CONFIG["num_hidden_layers"]):
            base = f"model.layers.{layer}.mlp.experts."
            assert {n for n in names if n.startswith(base)} == {base + s for s in want}
            for suffix, (shape, dtype) in want.items():
                t = f.get_tensor(base + suffix)
                assert (tuple(t.shape), t.dtype) == (shape, dtype), suffix


def test_mxfp4_config_with_dense_experts_is_refused(checkpoints, tmp_path):
    dense = checkpoints["dense"][0]
    for name in ("model.safetensors", "config.json"):
        (tmp_path / name).write_bytes(open(f"{dense}/{name}", "rb").read())
    config = json.loads((tmp_path / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "mxfp4"}
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"experts\.\w+'? is dense, but the config declares the experts MXFP4"):
        load_model(str(tmp_path), dtype="float32", progress=False)
    # a scheme that exists, with experts of its own that are not GPT-OSS's (FP8: plain SwiGLU experts)
    config["quantization_config"] = {"quant_method": "fp8", "activation_scheme": "dynamic"}
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"GPT-OSS experts \(model\.layers\.0\.mlp\.experts\) with "
                                         r"quant_method='fp8': that scheme gives Fp8MoEMethod, which does not "
                                         "implement GPT-OSS's"):
        load_model(str(tmp_path), dtype="float32", progress=False)
    # a registered scheme whose MoE method is not GPT-OSS's (plain SwiGLU experts, no biases)
    import quant_schemes  # noqa: F401  registers atom_test_transposed

    config["quantization_config"] = {"quant_method": "atom_test_transposed"}
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"quant_method='atom_test_transposed': that scheme gives TransposedMoE, "
                                         "which does not implement GPT-OSS's"):
        load_model(str(tmp_path), dtype="float32", progress=False)


def test_mxfp4_on_another_moe_is_refused(tmp_path):
    from compile_checks import write_tiny_qwen3_moe

    write_tiny_qwen3_moe(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "mxfp4"}
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"model\.layers\.0\.mlp\.experts: ATOM's MXFP4 experts are GPT-OSS's"):
        load_model(str(tmp_path), dtype="float32", progress=False)


def test_a_host_attention_without_sinks_is_refused(checkpoints):
    def no_sinks_factory(spec):  # a host implementation that predates sinks
        return torch.nn.Identity()

    with pytest.raises(ValueError, match="has attention sinks, which this host's attention implementation "
                                         r"\(.*no_sinks_factory\) does not support"):
        load_model(checkpoints["dense"][0], dtype="float32", attn_factory=no_sinks_factory, progress=False)


def test_quantize_tool_refuses_what_it_cannot_convert(checkpoints, tmp_path, capsys):
    tool = quantize_tool()
    assert tool.main([checkpoints["mxfp4"][0], str(tmp_path / "again")]) == 1
    assert "already quantized (mxfp4)" in capsys.readouterr().err


def test_dummy_mxfp4_weights_run(checkpoints):
    """Random weights for benchmarks (load_format dummy): packed codes and scales drawn from sane ranges."""
    model, _ = load_model(checkpoints["mxfp4"][0], dtype="float32", load_format="dummy", progress=False)
    experts = model.model.layers[0].mlp.experts
    assert experts.w13_weight.dtype == torch.uint8 and int(experts.w13_weight.max()) > 200
    assert 119 <= int(experts.w13_weight_scale.min()) <= int(experts.w13_weight_scale.max()) <= 120
    from paged_harness import PagedHarness

    harness = PagedHarness(model, num_blocks=8, block_size=4)
    logits = harness.step([[1, 2, 3, 4, 5, 6, 7]], harness.add(1))
    assert torch.isfinite(logits).all() and logits.abs().max() > 0


# ---------------------------------------------------------------- MXFP4 format
def _e2m1_by_hand(code: int) -> float:
    sign = -1.0 if code & 8 else 1.0
    exponent, mantissa = (code >> 1) & 3, code & 1
    magnitude = mantissa / 2 if exponent == 0 else 2.0 ** (exponent - 1) * (1 + mantissa / 2)
    return sign * magnitude


def test_e2m1_table_is_the_ocp_encoding():
    assert [_e2m1_by_hand(c) for c in range(16)] == list(E2M1_VALUES)


def test_dequantize_matches_a_hand_built_definition():
    rows, groups = 3, 4
    blocks = torch.randint(0, 256, (rows, groups * 16), dtype=torch.uint8)
    scales = torch.randint(0, 253, (rows, groups), dtype=torch.uint8)  # 2^125 * 6 is the largest float32-finite
    scales[0, 0], scales[1, 1] = 0, 252
    want = torch.empty(rows, groups * 32, dtype=torch.float64)
    for r in range(rows):
        for k in range(groups * 32):
            byte = int(blocks[r, k // 2])
            code = byte >> 4 if k % 2 else byte & 0x0F
            want[r, k] = _e2m1_by_hand(code) * 2.0 ** (int(scales[r, k // 32]) - 127)
    got = dequantize_mxfp4(blocks, scales)
    assert got.dtype == torch.float32 and torch.equal(got.double(), want)
    assert torch.equal(dequantize_mxfp4(blocks.view(rows, groups, 16), scales, torch.bfloat16).double(), want)
    with pytest.raises(ValueError, match="do not match scales"):
        dequantize_mxfp4(blocks, scales[:, :-1])


def _registers_of_words(frag: torch.Tensor, split_words: bool = True) -> torch.Tensor:
    """The fragment order's decode, instruction by instruction as its PTX (atom.ops.triton_kernels.moe_swigluoai.
    _frag_decode_ptx) on uint32 words: [..., 128 threads, 8 words, 4 registers] of bf16x2 bits."""
    if split_words:  # thread t's words 0-3 at 16 t, words 4-7 at 2,048 + 16 t (one 512-byte run a warp a load)
        raw = frag[..., :FRAG_CODE_BYTES].unflatten(-1, (2, 128, 4, 4)).movedim(-4, -3).flatten(-3, -2).long()
    else:  # thread t's 32 bytes at 32 t
        raw = frag[..., :FRAG_CODE_BYTES].unflatten(-1, (128, 8, 4)).long()
    w = sum(raw[..., i] << (8 * i) for i in range(4))
    rotl = lambda v, r: ((v << r) | (v >> (32 - r))) & 0xFFFFFFFF  # noqa: E731 (shf.l.wrap)
    regs = (w & FRAG_MASK, rotl(w, 10) & FRAG_MASK, rotl(w, 13) & FRAG_MASK,
            (((w & FRAG_K3) * FRAG_MUL3) & 0xFFFFFFFF) & FRAG_MASK)  # mul.lo.u32 keeps the low 32 bits
    return torch.stack(regs, dim=-1)


@pytest.mark.parametrize("split_words", [True, False], ids=["split", "contiguous"])
@pytest.mark.parametrize("rows, cols, halves", [(96, 160, 2), (64, 128, 1), (130, 320, 1)])
def test_fragment_order_decodes_to_the_dequantized_weights(rows, cols, halves, split_words):
    """atom.ops.mxfp4.pack_fragments: every bf16 half of every decoded register (2^-126 times a code's value, times
    2^(s - 1) from the stored scale byte, as the kernel's one multiply) is the dequantized weight at the row and
    column the fragment layout gives it, scales 0 and 128 (the ends of the single-multiply range) included; rows
    and columns past the matrix decode to 0; unpack_fragments inverts the packing. The mapping is re-derived here
    from wgmma's A-operand layout, not taken from the packer."""
    experts = 2
    blocks = torch.randint(0, 256, (experts, halves * rows, cols // 2), dtype=torch.uint8)
    scales = torch.randint(0, FRAG_MAX_SCALE + 1, (experts, halves * rows, cols // 32), dtype=torch.uint8)
    scales[0, 0, 0], scales[1, -1, -1] = 0, FRAG_MAX_SCALE
    frag = pack_fragments(blocks, scales, halves, split_words=split_words)
    tiles, steps = frag.shape[1] // halves, frag.shape[2]
    want = torch.zeros(experts, halves, tiles * 64, steps * 128, dtype=torch.float64)
    want[:, :, :rows, :cols] = dequantize_mxfp4(blocks, scales).double().unflatten(1, (halves, rows))
    regs = _registers_of_words(frag, split_words)  # [E, halves * tiles, steps, 128, 8, 4]
    halves16 = torch.stack((regs & 0xFFFF, regs >> 16), dim=-1)  # [..., register, low / high half]
    base = (halves16 << 16).to(torch.int32).view(torch.float32).double() * 2.0**126  # bf16 -> exact value
    stored = frag[..., FRAG_CODE_BYTES:].unflatten(-1, (32, 4, 2)).long() - FRAG_SCALE_BIAS  # s; [.., quad, b, r]
    t = torch.arange(128)
    w_, g, c = t // 32, (t // 4) % 8, t % 4
    got = torch.full_like(want, float("nan"))
    for j in range(8):
        for reg in range(4):
            e1, h = reg % 2, reg // 2  # registers: (r0, lo cols), (r1, lo cols), (r0, hi cols), (r1, hi cols)
            s_val = stored[..., t // 4, j // 2, e1]  # [E, halves * tiles, steps, 128]
            for e0 in range(2):
                value = base[..., j, reg, e0] * torch.exp2((s_val - 1).double()) * 2.0**-126
                row = 16 * w_ + 8 * e1 + g
                col = 16 * j + 8 * h + 2 * c + e0
                for tile in range(halves * tiles):
                    for step in range(steps):
                        hv, tt = divmod(tile, tiles)
                        got[:, hv, tt * 64 + row, step * 128 + col] = value[:, tile, step]
    assert torch.equal(got, want)
    unpacked_blocks, unpacked_scales = unpack_fragments(frag, rows, cols, halves, split_words=split_words)
    assert torch.equal(unpacked_blocks, blocks) and torch.equal(unpacked_scales, scales)


def test_fragment_order_refuses_scales_beyond_its_multiply():
    blocks = torch.zeros(1, 64, 64, dtype=torch.uint8)
    scales = torch.full((1, 64, 4), FRAG_MAX_SCALE + 1, dtype=torch.uint8)
    with pytest.raises(ValueError, match="above 128"):
        pack_fragments(blocks, scales)


def test_quantize_picks_the_nearest_value_ties_to_even():
    w = torch.randn(5, 96) * torch.logspace(-3, 2, 5)[:, None]
    w[0, :8] = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, -6.0])  # ties (scale 1: amax 6 in the block)
    blocks, scales = quantize_mxfp4(w)
    got = dequantize_mxfp4(blocks, scales).double()
    grid = torch.tensor(E2M1_VALUES[:8], dtype=torch.float64)
    for r in range(w.shape[0]):
        for g in range(w.shape[1] // 32):
            block = w[r, g * 32 : (g + 1) * 32].double()
            exponent = math.ceil(math.log2(float(block.abs().max()) / 6))
            assert int(scales[r, g]) == exponent + 127
            magnitudes = grid * 2.0**exponent
            for k, x in enumerate(block.tolist()):
                dist = (magnitudes - abs(x)).abs()
                best = dist.min()
                nearest = [c for c in range(8) if dist[c] == best]
                code = nearest[-1] if len(nearest) == 2 and nearest[0] % 2 else nearest[0]  # tie -> even code
                assert float(got[r, g * 32 + k]) == math.copysign(float(magnitudes[code]), x) or x == 0, (r, g, k, x)
    assert got[0, :8].tolist() == [0.0, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0, -6.0]


# ---------------------------------------------------------------- attention with sinks and windows
def _paged(seq_lens, block_size, num_kv_heads, head_dim):
    """Caches with shuffled blocks; returns (k_cache, v_cache, block_tables, per-sequence dense k and v)."""
    blocks = [math.ceil(n / block_size) for n in seq_lens]
    perm = torch.randperm(sum(blocks) + 2)
    k_cache = torch.randn(len(perm), block_size, num_kv_heads, head_dim)
    v_cache = torch.randn(len(perm), block_size, num_kv_heads, head_dim)
    tables = torch.zeros(len(seq_lens), max(blocks), dtype=torch.int32)
    dense, used = [], 0
    for i, (n, nb) in enumerate(zip(seq_lens, blocks)):
        tables[i, :nb] = perm[used : used + nb].int()
        used += nb
        slots = (tables[i, :nb].long()[:, None] * block_size + torch.arange(block_size)).flatten()[:n]
        flat = (k_cache.view(-1, num_kv_heads, head_dim), v_cache.view(-1, num_kv_heads, head_dim))
        dense.append((flat[0][slots], flat[1][slots]))
    return k_cache, v_cache, tables, dense


ATTENTION_CASES = {
    # name: (query lens, cached prefix lens, window, sinks)
    "decode_window_inside_block_sinks": ([1, 1, 1], [12, 5, 2], 6, True),
    "chunked_prefill_window_sinks": ([5, 9, 3], [17, 0, 1], 6, True),
    "prefill_sinks_no_window": ([7, 4], [0, 9], None, True),
    "prefill_window_no_sinks": ([7, 4], [3, 9], 5, False),
}


@pytest.mark.parametrize("name", sorted(ATTENTION_CASES))
def test_paged_attention_matches_transformers_eager_gpt_oss(name):
    q_lens, ctx_lens, window, with_sinks = ATTENTION_CASES[name]
    heads, kv_heads, head_dim, block_size, scale = 4, 2, 8, 4, 0.3
    seq_lens = [c + q for c, q in zip(ctx_lens, q_lens)]
    k_cache, v_cache, tables, dense = _paged(seq_lens, block_size, kv_heads, head_dim)
    q = torch.randn(sum(q_lens), heads, head_dim)
    sinks = 2 * torch.randn(heads) if with_sinks else None
    qsl = torch.tensor([0, *q_lens]).cumsum(0).int()
    got = ref_attn.paged_attention(q, k_cache, v_cache, tables, qsl, torch.tensor(seq_lens).int(), scale, window,
                                   None, max(q_lens), max(seq_lens), sinks=sinks)
    # transformers' eager attention of gpt_oss, one sequence at a time, with the mask written out here
    module = types.SimpleNamespace(num_key_value_groups=heads // kv_heads, training=False,
                                   sinks=sinks if with_sinks else torch.full((heads,), -torch.inf))
    for b, (k, v) in enumerate(dense):
        q_pos = torch.arange(ctx_lens[b], seq_lens[b])[:, None]
        k_pos = torch.arange(seq_lens[b])[None, :]
        visible = (k_pos <= q_pos) & ((q_pos - k_pos < window) if window else True)
        mask = torch.zeros(visible.shape).masked_fill(~visible, -torch.inf)[None, None]
        qb = q[qsl[b] : qsl[b + 1]].transpose(0, 1)[None]
        want, _ = eager_attention_forward(module, qb, k.transpose(0, 1)[None], v.transpose(0, 1)[None], mask, scale)
        torch.testing.assert_close(got[qsl[b] : qsl[b + 1]], want[0], rtol=1e-5, atol=1e-6)
