"""The one-launch decoder layer of a one-row decode step (atom.ops.triton_kernels.decode_layer) against the layer
written out in float64 torch: the residual sums, RMSNorms, qkv, qk-norm and rope, the new key's cache store,
paged attention over the cached keys, o_proj, the gated MLP.

CPU: run alone with TRITON_INTERPRET=1 (the CI's triton-interpret lane), where the layer runs as one launch a
phase (the interpreter runs programs one after the other, so there is no grid barrier); on a GPU it is one launch
with the barriers.
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("no GPU: run this module alone with TRITON_INTERPRET=1 (Triton's CPU interpreter)",
                allow_module_level=True)

pytest.importorskip("triton")

from atom.ops.triton_kernels import decode_layer as dl  # noqa: E402

ON_GPU = torch.cuda.is_available()
DEVICE = "cuda" if ON_GPU else "cpu"


def _rms(x, w, eps, rnd):
    """RMSNorm as the kernels round it: x * rstd to the dtype, times w, to the dtype."""
    return rnd(rnd(x * torch.rsqrt((x * x).mean(-1, keepdim=True) + eps)) * w)


def _rope(x, cos, sin, neox):
    """x [heads, D] rotated over its first 2 * len(cos) columns (neox halves, or interleaved pairs)."""
    h = cos.shape[-1]
    out = x.clone()
    if neox:
        a, b = x[:, :h], x[:, h:2 * h]
        out[:, :h], out[:, h:2 * h] = a * cos - b * sin, b * cos + a * sin
    else:
        a, b = x[:, 0:2 * h:2], x[:, 1:2 * h:2]
        out[:, 0:2 * h:2], out[:, 1:2 * h:2] = a * cos - b * sin, b * cos + a * sin
    return out


def _to_dtype(t, dtype):
    """t in dtype as the kernels store it: rounded to nearest on a GPU; the interpreter truncates float32 -> bf16."""
    if dtype == torch.bfloat16 and not ON_GPU:
        return (t.float().view(torch.int32) & -65536).view(torch.float32).to(dtype)
    return t.to(dtype)


def _reference(L, x, res, pos, seq_len, slot, table, k_cache, v_cache, dtype):
    """The layer in float64 from the weights and inputs as stored, each value the module path rounds to the model
    dtype rounded there too (the residual sums, the norms, each linear's output, qk-norm and rope, the attention
    output, act(gate) and the gated product); returns (out, new residual, new key, new value)."""
    def rnd(t):
        return _to_dtype(t, dtype).double()

    f = {k: (v.double().cpu() if isinstance(v, torch.Tensor) else v) for k, v in L.items()}
    hq, hkv, d = L["hq"], L["hkv"], L["d"]
    r1 = rnd(x.double().cpu() + (res.double().cpu() if res is not None else 0.0))
    h = _rms(r1, f["in_w"], L["eps"], rnd)
    qkv = rnd(h @ f["qkv_w"].T + (f["qkv_b"] if L["qkv_b"] is not None else 0.0))
    q = qkv[0, :hq * d].view(hq, d)
    k = qkv[0, hq * d:(hq + hkv) * d].view(hkv, d)
    v = qkv[0, (hq + hkv) * d:].view(hkv, d)
    if L["q_norm_w"] is not None:
        q, k = _rms(q, f["q_norm_w"], L["eps"], rnd), _rms(k, f["k_norm_w"], L["eps"], rnd)
    half = L["cos_sin"].shape[-1] // 2
    cos, sin = f["cos_sin"][pos, :half], f["cos_sin"][pos, half:]
    q, k = rnd(_rope(q, cos, sin, L["neox"])), rnd(_rope(k, cos, sin, L["neox"]))
    page = k_cache.shape[1]
    keys = torch.arange(seq_len - 1)
    blk, off = table[keys // page].long(), keys % page
    kk = torch.cat([k_cache[blk, off].double(), k[None]], 0)  # [seq, hkv, d]
    vv = torch.cat([v_cache[blk, off].double(), v[None]], 0)
    g = hq // hkv
    kk, vv = kk.repeat_interleave(g, 1), vv.repeat_interleave(g, 1)
    s = torch.einsum("hd,shd->hs", q, kk) * d**-0.5
    o = rnd(torch.einsum("hs,shd->hd", s.softmax(-1), vv).reshape(1, hq * d))
    r2 = rnd(r1 + rnd(o @ f["o_w"].T))
    h2 = _rms(r2, f["post_w"], L["eps"], rnd)
    gu = rnd(h2 @ f["gate_up_w"].T)
    inter = gu.shape[-1] // 2
    a = rnd(rnd(torch.nn.functional.silu(gu[:, :inter])) * gu[:, inter:])
    return rnd(a @ f["down_w"].T), r2, k, v


def _layer(hidden, hq, hkv, d, inter, dtype, qk_norm, bias, neox, rot):
    g = torch.Generator().manual_seed(hidden * 7 + inter)

    def w(*shape, scale):
        return (torch.randn(*shape, generator=g) * scale).to(DEVICE, dtype)

    nqkv = (hq + 2 * hkv) * d
    return dict(
        hq=hq, hkv=hkv, d=d, eps=1e-6, neox=neox,
        in_w=(1 + 0.1 * torch.randn(hidden, generator=g)).to(DEVICE, dtype),
        post_w=(1 + 0.1 * torch.randn(hidden, generator=g)).to(DEVICE, dtype),
        qkv_w=w(nqkv, hidden, scale=hidden**-0.5), qkv_b=w(nqkv, scale=0.1) if bias else None,
        q_norm_w=(1 + 0.1 * torch.randn(d, generator=g)).to(DEVICE, dtype) if qk_norm else None,
        k_norm_w=(1 + 0.1 * torch.randn(d, generator=g)).to(DEVICE, dtype) if qk_norm else None,
        cos_sin=torch.cat([torch.cos(a := torch.rand(512, rot // 2, generator=g) * 6.3), torch.sin(a)], -1).to(
            DEVICE, torch.float32),
        o_w=w(hidden, hq * d, scale=(hq * d)**-0.5), gate_up_w=w(2 * inter, hidden, scale=hidden**-0.5),
        down_w=w(hidden, inter, scale=inter**-0.5),
    )


def _run(L, x, res, pos, seq_len, slot, table, k_cache, v_cache, barriers, **kw):
    return dl.decode_layer(
        x, res, input_norm_w=L["in_w"], post_norm_w=L["post_w"], eps=L["eps"], qkv_w=L["qkv_w"], qkv_b=L["qkv_b"],
        q_norm_w=L["q_norm_w"], k_norm_w=L["k_norm_w"], qk_eps=L["eps"], cos_sin=L["cos_sin"], is_neox=L["neox"],
        positions=torch.tensor([pos], device=DEVICE), seq_lens=torch.tensor([seq_len], device=DEVICE,
                                                                            dtype=torch.int32),
        slot_mapping=torch.tensor([slot], device=DEVICE), block_tables=table[None].to(DEVICE), k_cache=k_cache,
        v_cache=v_cache, scale=L["d"]**-0.5, num_heads=L["hq"], num_kv_heads=L["hkv"], o_w=L["o_w"],
        gate_up_w=L["gate_up_w"], down_w=L["down_w"], act=0, barriers=barriers, **kw)


CASES = {
    # hidden, query heads, KV heads, head_dim, intermediate, qk-norm, qkv bias, neox, rotary dims
    "qwen3-like": (96, 4, 2, 32, 80, True, False, True, 32),
    "llama-group4-partial-rope": (64, 8, 2, 16, 128, False, False, False, 8),
    "qwen2-bias": (128, 4, 4, 32, 48, False, True, True, 32),
}
# Relative to the largest value: float32 sums the linears in another order than float64 (~1e-7 seen); bf16 rounds
# where the reference rounds (0 seen under the interpreter; on a GPU a float32 sum near a rounding boundary can
# flip one bf16 value, and the flip travels on: 4 units in the last place of the largest value)
TOL = {torch.float32: 2e-6, torch.bfloat16: 2.0**-6}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("seq_len", [1, 37, 130])
def test_decode_layer_matches_the_layer_in_float64(case, dtype, seq_len):
    hidden, hq, hkv, d, inter, qk_norm, bias, neox, rot = CASES[case]
    L = _layer(hidden, hq, hkv, d, inter, dtype, qk_norm, bias, neox, rot)
    page, blocks = 16, 24
    k_cache = (torch.randn(blocks, page, hkv, d) * 0.5).to(DEVICE, dtype)
    v_cache = torch.randn(blocks, page, hkv, d).to(DEVICE, dtype)
    table = torch.randperm(blocks)[:triton_cdiv(seq_len, page) + 1].to(torch.int32)
    pos = seq_len - 1 + 5  # positions need not equal the key count (the rope table is indexed by position)
    slot = int(table[(seq_len - 1) // page]) * page + (seq_len - 1) % page
    x = torch.randn(1, hidden).to(DEVICE, dtype)
    res = (torch.randn(1, hidden) * 2).to(DEVICE, dtype) if case != "qwen2-bias" else None  # first layer: none
    ref_out, ref_res, ref_k, ref_v = _reference(L, x, res, pos, seq_len, slot, table, k_cache.cpu(), v_cache.cpu(),
                                                    dtype)
    barriers = dl.counters(hkv, torch.device(DEVICE))
    out, res_out = _run(L, x, res, pos, seq_len, slot, table, k_cache, v_cache, barriers, max_seq_len=256)
    tol = TOL[dtype]

    def close(got, want, what):
        err = (got.double().cpu() - want).abs().max().item()
        assert err <= tol * max(want.abs().max().item(), 1.0), f"{what}: max error {err:.3g} ({case}, {dtype})"

    close(res_out, ref_res, "residual")
    close(out, ref_out, "down_proj output")
    blk, off = slot // page, slot % page
    close(k_cache[blk, off], ref_k, "new key in the cache")
    close(v_cache[blk, off], ref_v, "new value in the cache")
    # each barrier's counter (or flag) is zeroed one barrier later, the last one's by the next launch of the layer:
    # the launch leaves that one word set (on a GPU; the interpreter's phase launches have no barriers)
    assert int(barriers.count_nonzero()) == (1 if ON_GPU else 0), barriers.tolist()


def triton_cdiv(a, b):
    return -(-a // b)


# qwen3-0.6b's and qwen3-8b's layer shapes: hidden, query heads, KV heads, head_dim, intermediate (as
# tools/device/decode_layer_bench.py's SHAPES)
REAL_SHAPES = {"qwen3-0.6b": (1024, 16, 8, 128, 3072), "qwen3-8b": (4096, 32, 8, 128, 12288)}


@pytest.mark.skipif(not ON_GPU, reason="real shapes on a GPU only (the interpreter would take minutes)")
@pytest.mark.parametrize("l2", [(0, 0), (262144, 1)], ids=["plain", "stream"])
@pytest.mark.parametrize("shape", list(REAL_SHAPES))
def test_decode_layer_at_real_shapes_on_cuda(shape, l2):
    """The launch at a real model's shapes (the whole grid, several weight chunks a program at 8b, 16 splits a KV
    head over 256 keys), with the L2 switches off and on, twice (the second launch on the counters the first left),
    against the float64 reference within the bf16 bound of the small cases."""
    hidden, hq, hkv, d, inter = REAL_SHAPES[shape]
    stream, ahead = l2
    dtype = torch.bfloat16
    L = _layer(hidden, hq, hkv, d, inter, dtype, True, False, True, d)
    nxt = _layer(hidden, hq, hkv, d, 16, dtype, True, False, True, d)["qkv_w"]  # the next layer's qkv (any values)
    page, seq_len = 16, 256
    blocks = seq_len // page + 4
    k_cache = (torch.randn(blocks, page, hkv, d) * 0.5).to(DEVICE, dtype)
    v_cache = torch.randn(blocks, page, hkv, d).to(DEVICE, dtype)
    table = torch.randperm(blocks)[:seq_len // page + 1].to(torch.int32)
    slot = int(table[(seq_len - 1) // page]) * page + (seq_len - 1) % page
    x = torch.randn(1, hidden).to(DEVICE, dtype)
    res = (torch.randn(1, hidden) * 2).to(DEVICE, dtype)
    want = _reference(L, x, res, seq_len - 1, seq_len, slot, table, k_cache.cpu(), v_cache.cpu(), dtype)[:2]
    barriers = dl.counters(hkv, torch.device(DEVICE))
    for launch in range(2):
        got = _run(L, x, res, seq_len - 1, seq_len, slot, table, k_cache, v_cache, barriers, max_seq_len=4096,
                   next_qkv_w=nxt, stream=stream, loop_ahead=ahead)
        for g, w, what in zip(got, want, ("down_proj output", "residual"), strict=True):
            err = (g.double().cpu() - w).abs().max().item()
            assert err <= TOL[dtype] * max(w.abs().max().item(), 1.0), f"{what}, launch {launch}: max error {err:.3g}"


def _float32_case():
    """A qwen3-like float32 layer over 150 keys and the launch's inputs."""
    hidden, hq, hkv, d, inter, qk_norm, bias, neox, rot = CASES["qwen3-like"]
    L = _layer(hidden, hq, hkv, d, inter, torch.float32, qk_norm, bias, neox, rot)
    seq_len, page = 150, 16
    k_cache = torch.randn(16, page, hkv, d, device=DEVICE)
    v_cache = torch.randn(16, page, hkv, d, device=DEVICE)
    table = torch.arange(16, dtype=torch.int32)
    x, res = torch.randn(1, hidden, device=DEVICE), torch.randn(1, hidden, device=DEVICE)
    barriers = dl.counters(hkv, torch.device(DEVICE))

    def run(**kw):
        return _run(L, x, res, seq_len - 1, seq_len, seq_len - 1, table, k_cache, v_cache, barriers, max_seq_len=256,
                    **kw)[0]

    return run


@pytest.mark.parametrize("splits", [1, 4])
def test_decode_layer_splits_and_programs_do_not_change_the_result(splits):
    """The attention splits and the program count partition the same sums (rows of a linear are summed by one
    program each way; the softmax merge is exact up to float32): float32 results agree to 1e-6."""
    run = _float32_case()
    outs = [run(programs=p, splits=s) for p, s in ((3, 1), (8, splits), (17, 2 * splits))]
    for o in outs[1:]:
        torch.testing.assert_close(o, outs[0], rtol=1e-6, atol=1e-6)


def test_decode_layer_chunks_and_l2_requests_do_not_change_the_result(monkeypatch):
    """Every phase's rows in several weight chunks (the K loops run) sum to the one-chunk result (1e-6, float32); the
    early stream (this layer's later weights and the next layer's qkv asked into L2) and the loops' L2 requests a
    chunk ahead change no bit (on a GPU, where they are issued; under the interpreter they are not, and this checks
    the arguments)."""
    run = _float32_case()
    whole = run(programs=8, splits=4)
    nxt = _layer(*CASES["qwen3-like"][:5], torch.float32, True, False, True, 32)
    monkeypatch.setattr(dl, "CHUNK_ELEMS", 1024)  # qkv 32 x 32, o_proj 16 x 64, gate_up 2 x 16 x 32, down 16 x 64
    chunked = run(programs=8, splits=4)
    streamed = run(programs=8, splits=4, next_qkv_w=nxt["qkv_w"], stream=1 << 20, loop_ahead=1)
    torch.testing.assert_close(chunked, whole, rtol=1e-6, atol=1e-6)
    assert torch.equal(streamed, chunked)


def test_decode_layer_refuses_what_it_does_not_run():
    L = _layer(*CASES["qwen3-like"][:5], torch.float32, True, False, True, 32)
    x = torch.randn(2, 96, device=DEVICE)
    cache = torch.zeros(4, 16, 2, 32, device=DEVICE)
    with pytest.raises(ValueError, match="one row"):
        _run(L, x, None, 0, 1, 0, torch.zeros(1, dtype=torch.int32), cache, cache,
             dl.counters(2, torch.device(DEVICE)), max_seq_len=16)
    with pytest.raises(ValueError, match="must fit 4 programs"):  # a program a (KV head, split)
        _run(L, x[:1], None, 0, 1, 0, torch.zeros(1, dtype=torch.int32), cache, cache,
             dl.counters(2, torch.device(DEVICE)), max_seq_len=16, programs=4, splits=4)
    with pytest.raises(ValueError, match="last_phase must be 0..4"):
        _run(L, x[:1], None, 0, 1, 0, torch.zeros(1, dtype=torch.int32), cache, cache,
             dl.counters(2, torch.device(DEVICE)), max_seq_len=16, last_phase=5)
    with pytest.raises(ValueError, match="counters"):  # one a KV head too
        _run(L, x[:1], None, 0, 1, 0, torch.zeros(1, dtype=torch.int32), cache, cache,
             torch.zeros(dl.NUM_BARRIERS, dtype=torch.int32, device=DEVICE), max_seq_len=16)
    with pytest.raises(ValueError, match="the next layer's qkv weight"):
        _run(L, x[:1], None, 0, 1, 0, torch.zeros(1, dtype=torch.int32), cache, cache,
             dl.counters(2, torch.device(DEVICE)), max_seq_len=16, next_qkv_w=L["qkv_w"][:-1])
    with pytest.raises(ValueError, match="qkv weight"):
        L["qkv_w"] = L["qkv_w"][:, :-1]
        _run(L, x[:1], None, 0, 1, 0, torch.zeros(1, dtype=torch.int32), cache, cache,
             dl.counters(2, torch.device(DEVICE)), max_seq_len=16)


def _tiny_checkpoint(tmp_path, family):
    import transformers

    common = dict(vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  intermediate_size=96, max_position_embeddings=64)
    if family == "qwen3":
        config, cls = transformers.Qwen3Config(head_dim=16, **common), transformers.Qwen3ForCausalLM
    elif family == "qwen2":  # qkv bias
        config, cls = transformers.Qwen2Config(**common), transformers.Qwen2ForCausalLM
    else:
        config, cls = transformers.LlamaConfig(**common), transformers.LlamaForCausalLM
    hf = cls(config).eval()
    with torch.no_grad():  # biases and norm weights away from their init values (zeros, ones)
        for name, p in hf.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    hf.save_pretrained(tmp_path / family)
    return str(tmp_path / family), hf


@pytest.mark.parametrize("family", ["qwen3", "qwen2", "llama"])
def test_a_model_decoding_one_row_with_one_launch_a_layer_matches_transformers(tmp_path, monkeypatch, family):
    """A 2-layer float32 model on the Triton backend with ATOM_DECODE_LAYER on: the prefill runs the modules,
    each one-row decode step one launch a layer (counted); the logits of the prefill's last token and of three
    decode steps against transformers' on the whole sequence at float32 tolerance (1e-4 of the largest)."""
    import sys

    sys.path.insert(0, os.path.dirname(__file__))
    from atom.layers import decode_layer as layer_mod
    from atom.loader import load_model
    from atom.ops import registry
    from paged_harness import PagedHarness

    path, hf = _tiny_checkpoint(tmp_path, family)
    prompt, steps = [5, 9, 2, 77, 3, 14, 8, 40, 41], [7, 100, 3]
    with torch.no_grad():
        want = hf(torch.tensor([prompt + steps])).logits[0, len(prompt) - 1:].double()
    monkeypatch.setenv("ATOM_KERNEL_BACKEND", "triton")
    monkeypatch.delenv("ATOM_KERNEL_OVERRIDES", raising=False)
    monkeypatch.setattr(layer_mod, "ENABLED", True)
    monkeypatch.setattr(dl, "STREAM_BYTES", 1 << 20)  # the early stream on (on a GPU; no result changes)
    launches, nexts = [], []
    real = dl.decode_layer
    monkeypatch.setattr(dl, "decode_layer", lambda *a, **kw: (launches.append(kw["k_cache"].shape),
                                                              nexts.append(kw["next_qkv_w"]), real(*a, **kw))[2])
    registry.forget_resolutions()
    try:
        model, _ = load_model(path, dtype="float32", device=DEVICE, progress=False)
        layers = model.model.layers
        assert all(layer._one_launch is not None for layer in layers)
        assert layers[0]._one_launch.next_layer is layers[1] and layers[1]._one_launch.next_layer is None
        harness = PagedHarness(model, num_blocks=8, block_size=4, device=DEVICE)
        seq = harness.add(1)
        got = [harness.step([prompt], seq)]
        assert launches == []  # the prefill (9 rows) runs the modules
        for t in steps:
            got.append(harness.step([[t]], seq))
    finally:
        registry.forget_resolutions()
    assert len(launches) == 2 * len(steps)
    assert all(n is layers[1].self_attn.qkv_proj.weight for n in nexts[0::2]) and nexts[1::2] == [None] * len(steps)
    got = torch.cat(got).double().cpu()
    err = (got - want).abs().max().item()
    assert err <= 1e-4 * want.abs().max().item(), err


def test_layers_it_cannot_run_keep_their_modules(tmp_path, monkeypatch, caplog):
    """OneLaunchDecode takes a layer only where its kernel runs what the modules run: off (the default), or over FP8
    linears, every layer keeps its modules, and the reason is named (logged once when ATOM_DECODE_LAYER asked)."""
    import logging

    from atom.layers import decode_layer as layer_mod
    from atom.loader import load_model
    from atom.ops import registry

    path, _ = _tiny_checkpoint(tmp_path, "qwen3")
    monkeypatch.setenv("ATOM_KERNEL_BACKEND", "triton")
    monkeypatch.delenv("ATOM_KERNEL_OVERRIDES", raising=False)
    registry.forget_resolutions()
    try:
        monkeypatch.setattr(layer_mod, "ENABLED", False)
        model, _ = load_model(path, dtype="bfloat16", device=DEVICE, progress=False)
        assert all(layer._one_launch is None for layer in model.model.layers)
        assert layer_mod._why_not(model.model.layers[0]) is None  # a layer it could run
        monkeypatch.setattr(layer_mod, "ENABLED", True)
        monkeypatch.setattr(layer_mod, "_SAID", set())
        with caplog.at_level(logging.INFO, logger=layer_mod.__name__):
            model, _ = load_model(path, dtype="bfloat16", device=DEVICE, progress=False, quantization="fp8")
        assert all(layer._one_launch is None for layer in model.model.layers)
        assert layer_mod._why_not(model.model.layers[0]) == "quantized or tensor-parallel linears"
        said = [r.getMessage() for r in caplog.records if r.name == layer_mod.__name__]
        assert said == ["ATOM_DECODE_LAYER: decoder layers keep their modules at decode (quantized or "
                        "tensor-parallel linears)"], said  # once, not once a layer
    finally:
        registry.forget_resolutions()
