"""Programmatic dependent launch (atom.ops.triton_kernels.pdl): when it is on, and that a decode chain of ATOM's
kernels launched early gives the same bits as the same chain launched one after the other.

A kernel launched with PDL may start while the previous one still runs; a missing or misplaced wait shows as a
read of stale activations or a write over ones still being read, i.e. outputs that differ from the serial run.
The chain below is a quantized decoder layer's op sequence (norm + quantization, the swap-AB GEMM with split-K,
SiLU-and-mul + quantization, the split-K sum or the serial split, per-token quantization, a plain norm) repeated
and fed back into itself, captured in a CUDA graph (as the engine replays it) and replayed; every replay must
equal the chain run with PDL off. The interpreter half checks the switch (off on CPU and under the interpreter,
ATOM_PDL parsed strictly).
"""

from __future__ import annotations

import os
import sys

import pytest
import torch

if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("no GPU: run this module alone with TRITON_INTERPRET=1 (Triton's CPU interpreter)",
                allow_module_level=True)

pytest.importorskip("triton")

from atom.ops import quant_fp8 as Q  # noqa: E402
from atom.ops.registry import resolve  # noqa: E402
from atom.ops.triton_kernels import common, pdl  # noqa: E402
from atom.ops.triton_kernels import quant_fp8 as tk  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))

ON_GPU = torch.cuda.is_available()
HOPPER = ON_GPU and not torch.version.hip and torch.cuda.get_device_capability() >= (9, 0)


def test_pdl_is_off_on_cpu_and_under_the_interpreter(monkeypatch):
    assert pdl.pdl_args(torch.device("cpu")) == {"PDL": False}
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert not pdl.pdl_on(torch.device("cuda", 0))
    monkeypatch.setattr(pdl, "ENABLED", False)
    monkeypatch.delenv("TRITON_INTERPRET")
    assert not pdl.pdl_on(torch.device("cuda", 0))  # ATOM_PDL=0 wins on any device


def test_atom_pdl_env_is_parsed_strictly(monkeypatch):
    for raw, want in (("", True), ("1", True), ("0", False)):
        monkeypatch.setenv("ATOM_PDL", raw)
        assert common.env_flag("ATOM_PDL", True) is want
    monkeypatch.setenv("ATOM_PDL", "on")
    with pytest.raises(ValueError, match="ATOM_PDL must be 0 or 1, got 'on'"):
        common.env_flag("ATOM_PDL", True)
    monkeypatch.setenv("ATOM_FP8_PDL_PREFETCH", "lots")
    with pytest.raises(ValueError, match=r"ATOM_FP8_PDL_PREFETCH must be an integer \(bytes\)"):
        common.env_int("ATOM_FP8_PDL_PREFETCH", 1024, 1 << 20, "bytes")


def _kernels():
    """(module file, FunctionDef) of every Triton kernel (a jitted function named *_kernel) in atom's Triton backend."""
    import ast
    import glob

    import atom.ops.triton_kernels as pkg

    for path in sorted(glob.glob(os.path.join(os.path.dirname(pkg.__file__), "*.py"))):
        for node in ast.parse(open(path).read()).body:
            if isinstance(node, ast.FunctionDef) and node.name.endswith("_kernel") and any(
                    "jit" in ast.unparse(d) for d in node.decorator_list):
                yield os.path.basename(path), node


# Helpers a kernel may call before its wait: they read nothing but constant weights (the swap-AB GEMM's L2
# prefetch) or a decode step's host-written metadata (the
# attention's EARLY_META: only the kernel right before may still run during a wait, and no kernel writes it; with
# EARLY_KV the block-table entries too, and the first key tile's cache lines, prefetched (1) or loaded (2): earlier
# steps' keys, written by kernels that completed before the qkv GEMM started; the new key's slot is read stale and
# replaced from registers after the wait). The one-launch decode layer loads its first chunk of qkv weight rows
# (_w_chunk of its _rows_of, which is arithmetic) and asks L2 for the rest of them and for its rows of the later
# phases' weights (_prefetch_lines).
PRE_WAIT_HELPERS = ("prefetch_l2", "_decode_meta", "_first_tile", "_prefetch_keys", "_early_tile", "_rows_of",
                    "_w_chunk", "_prefetch_lines")


def test_every_triton_kernel_waits_before_it_touches_memory():
    """The rule PDL rests on, checked in the source: every kernel takes the PDL constexpr and calls pdl_wait(PDL)
    in its top-level body, and nothing before that call loads, stores or runs an atomic; the helpers allowed
    there read constant weights or host-written step metadata only (PRE_WAIT_HELPERS). A kernel launched early
    without it would read stale activations."""
    import ast

    memory = ("load", "store", "atomic_add", "atomic_xchg", "atomic_cas", "atomic_max", "atomic_min",
              "inline_asm_elementwise")
    kernels = list(_kernels())
    assert len(kernels) >= 30  # the glob found the backend
    for fname, fn in kernels:
        where = f"{fname}:{fn.name}"
        assert "PDL" in [a.arg for a in fn.args.args], f"{where} has no PDL constexpr"
        waits = [i for i, st in enumerate(fn.body) if ast.unparse(st) == "pdl_wait(PDL)"]
        assert waits, f"{where} never calls pdl_wait(PDL) in its top-level body"
        for st in fn.body[:waits[0]]:
            for call in (c for c in ast.walk(st) if isinstance(c, ast.Call)):
                name = ast.unparse(call.func)
                assert name.split(".")[-1] not in memory, f"{where}: {name} before pdl_wait"
                # a helper (another jitted function) may load: only PRE_WAIT_HELPERS are allowed; tl.* and tensor
                # methods (x.to) are arithmetic
                assert not isinstance(call.func, ast.Name) or name in PRE_WAIT_HELPERS, f"{where}: {name}() before pdl_wait"


@pytest.mark.skipif(not HOPPER, reason="PDL needs an NVIDIA GPU of compute capability 9.0 or newer")
def test_pdl_is_on_for_hopper():
    """The H200 (sm_90) with the Triton ATOM ships against: both halves of a PDL launch are passed."""
    assert pdl.pdl_args(torch.device("cuda")) == {"PDL": True, "launch_pdl": True}


def _fp8_weight(n: int, k: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    w = torch.randn(n, k, generator=gen, device="cuda") / k ** 0.5
    return Q.quantize_weight_fp8(w, "channel")


def _layer_chain(x, weights, norms, layers: int):
    """`layers` quantized decoder-layer op sequences on x [M, H] (bf16), each feeding the next."""
    add_norm_quant = resolve("fused_add_rms_norm_quant_fp8", "triton")
    linear_q = resolve("fp8_linear_quantized", "triton")
    silu_quant = resolve("silu_and_mul_quant_fp8", "triton")
    linear = resolve("fp8_linear", "triton")
    rms_norm = resolve("rms_norm", "triton")
    residual = x
    h = x
    for i in range(layers):
        (w_up, s_up), (w_down, s_down), (w_o, s_o) = weights[i % len(weights)]
        q, s, residual = add_norm_quant(h, residual, norms[0], 1e-6, None, torch.float8_e4m3fn)
        up = linear_q(q, s, w_up, s_up, None, None, torch.bfloat16)  # swap-AB, one split at these sizes
        q2, s2 = silu_quant(up, None, torch.float8_e4m3fn)
        h = linear_q(q2, s2, w_down, s_down, None, None, torch.bfloat16)  # split over K
        h = linear(rms_norm(h, norms[1], 1e-6), w_o, s_o, None, None)  # per-token quantization kernel + GEMM
    return h + residual


def _chain_inputs(m: int, seed: int, hidden: int = 1024, inter: int = 3072):
    """_layer_chain's weights (two layers' gate_up, down, o), norms and an [m, hidden] input."""
    gen = torch.Generator(device="cuda").manual_seed(seed)
    weights = [(_fp8_weight(2 * inter, hidden, gen), _fp8_weight(hidden, inter, gen), _fp8_weight(hidden, hidden, gen))
               for _ in range(2)]
    norms = [1 + 0.1 * torch.randn(hidden, generator=gen, device="cuda", dtype=torch.bfloat16) for _ in range(2)]
    return weights, norms, torch.randn(m, hidden, generator=gen, device="cuda", dtype=torch.bfloat16)


def _check_chain_under_pdl(monkeypatch, chain, x, replays: int = 20):
    """chain(x) with PDL off is the reference; with PDL on, run eagerly and as a captured CUDA graph replayed
    `replays` times on a static copy of x, it must give the same bits every time."""
    monkeypatch.setattr(pdl, "ENABLED", False)
    want = chain(x)
    torch.cuda.synchronize()
    monkeypatch.setattr(pdl, "ENABLED", True)
    eager = chain(x)  # PDL launches outside a graph (prefill, eager mode)
    static_x = x.clone()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        chain(static_x)  # warm-up: compiles, makes the split counters
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = chain(static_x)
    torch.cuda.synchronize()
    assert torch.equal(eager, want)
    for replay in range(replays):
        static_x.copy_(x)
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(static_out, want), f"replay {replay}: {(static_out.float() - want.float()).abs().max()}"
    assert torch.isfinite(want).all() and want.abs().max() > 0


@pytest.mark.skipif(not HOPPER, reason="PDL needs an NVIDIA GPU of compute capability 9.0 or newer")
@pytest.mark.parametrize("m", [1, 8, 32])
@pytest.mark.parametrize("serial", [False, True])
def test_decode_chain_with_pdl_in_a_cuda_graph_equals_the_serial_chain(monkeypatch, m, serial):
    weights, norms, x = _chain_inputs(m, 1000 + m)
    monkeypatch.setattr(tk, "GEMV_MAX_M", 0)
    monkeypatch.setattr(tk, "SWAP_SERIAL_SPLIT", serial)
    _check_chain_under_pdl(monkeypatch, lambda inp: _layer_chain(inp, weights, norms, 12), x)


def _moe_chain(x, router, w13, w2, norm, layers: int, top_k: int):
    """`layers` MoE blocks on x [T, H] (bf16): RMSNorm (Triton), router GEMM (cuBLAS: a kernel without PDL between
    two with it), top-k softmax, the fused experts (the per-pair GEMVs and top-k sum, or the expert-sorting
    kernels and the grouped GEMMs, by the number of pairs), residual add (torch)."""
    rms_norm = resolve("rms_norm", "triton")
    topk = resolve("moe_topk_softmax", "triton")
    experts = resolve("fused_experts", "triton")
    h = x
    for _ in range(layers):
        y = rms_norm(h, norm, 1e-6)
        weights, ids = topk(y @ router.t(), top_k, True)
        h = h + experts(y, w13, w2, weights, ids)
    return h


@pytest.mark.skipif(not HOPPER, reason="PDL needs an NVIDIA GPU of compute capability 9.0 or newer")
@pytest.mark.parametrize("tokens", [2, 8, 64])
def test_moe_chain_with_pdl_in_a_cuda_graph_equals_the_serial_chain(monkeypatch, tokens):
    """The MoE kernels (routing, expert sorting in one or several chunks, grouped GEMMs or per-pair GEMVs, top-k
    sum) launched early, in a captured graph and eagerly, against the same chain with PDL off: equal bits."""
    gen = torch.Generator(device="cuda").manual_seed(2000 + tokens)
    hidden, inter, experts, top_k = 256, 512, 16, 4

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen, device="cuda") * scale).to(torch.bfloat16)

    router = rand(experts, hidden, scale=hidden ** -0.5)
    w13 = rand(experts, 2 * inter, hidden, scale=hidden ** -0.5)
    w2 = rand(experts, hidden, inter, scale=inter ** -0.5)
    norm = 1 + 0.1 * rand(hidden)
    x = rand(tokens, hidden)
    _check_chain_under_pdl(monkeypatch, lambda inp: _moe_chain(inp, router, w13, w2, norm, 6, top_k), x)


def _attention_o_chain(q, caches, meta, o_weight, layers: int):
    """`layers` decode attentions (split over the keys, so the merge kernel runs) each followed by an FP8 o_proj
    that quantizes the attention's output itself from its per-head maxima (fp8_linear_rowmax), the projection
    fed back as the next queries."""
    from atom.ops.triton_kernels.attention import paged_attention_impl

    o_proj = resolve("fp8_linear_rowmax", "triton")
    w, s = o_weight
    t, heads, d = q.shape
    for _ in range(layers):
        maxima = torch.empty(t, heads, dtype=torch.float32, device=q.device)
        attn = paged_attention_impl(q, *caches, *meta, num_splits=4, maxima=maxima)
        q = o_proj(attn.view(t, heads * d), maxima, w, s, None, torch.bfloat16).view(t, heads, d)
    return q


@pytest.mark.skipif(not HOPPER, reason="PDL needs an NVIDIA GPU of compute capability 9.0 or newer")
@pytest.mark.parametrize("tokens", [1, 4])
def test_attention_merge_then_o_proj_with_prefetch_under_pdl(monkeypatch, tokens):
    """Decode attention split over the keys, its merge kernel, and o_proj quantizing the merged rows itself from the
    stored per-head maxima, with o_proj's programs prefetching their weights before their wait
    (PDL_PREFETCH_BYTES): in a CUDA graph and eagerly, the same bits as the chain with PDL off."""
    gen = torch.Generator(device="cuda").manual_seed(3000 + tokens)
    heads, kv_heads, d, page = 8, 2, 128, 16
    lens = [150 + 37 * i for i in range(tokens)]
    blocks = [(n + page - 1) // page for n in lens]
    tables = torch.zeros(tokens, max(blocks), dtype=torch.int32, device="cuda")
    perm = torch.randperm(sum(blocks), generator=gen, device="cuda").int()
    for i, start in enumerate(torch.tensor([0] + blocks).cumsum(0)[:-1].tolist()):
        tables[i, :blocks[i]] = perm[start:start + blocks[i]]
    caches = [torch.randn(sum(blocks), page, kv_heads, d, generator=gen, device="cuda").to(torch.bfloat16)
              for _ in range(2)]
    qsl = torch.arange(tokens + 1, dtype=torch.int32, device="cuda")
    meta = (tables, qsl, torch.tensor(lens, dtype=torch.int32, device="cuda"), d ** -0.5, None, None, 1, 4096)
    o_weight = _fp8_weight(heads * d, heads * d, gen)
    q = torch.randn(tokens, heads, d, generator=gen, device="cuda").to(torch.bfloat16)
    monkeypatch.setattr(tk, "PDL_PREFETCH_BYTES", 1024)
    _check_chain_under_pdl(monkeypatch, lambda inp: _attention_o_chain(inp, caches, meta, o_weight, 6), q)
