"""The native CPU decode attention (atom.ops.cpu_native, csrc/cpu_attention.c) and the decode formulation of
paged attention against the general (padded) torch reference, on random paged caches whose unused blocks and
table entries hold garbage (NaN): GQA, block sizes 16 and 1 (SGLang's pool), sliding windows, soft-capping,
attention sinks; float32 tightly, bfloat16 / float16 against a float64 computation on the same inputs."""

from __future__ import annotations

import os
import platform
import tempfile

import pytest
import torch

from atom.ops import cpu_native
from atom.ops.attention import paged_attention, paged_attention_padded, paged_decode_attention

pytestmark = pytest.mark.skipif(cpu_native.library() is None, reason="no C compiler: the native kernels are not built")

CASES = {"plain": {}, "window": {"sliding_window": 23}, "softcap": {"logit_softcap": 20.0},
         "sinks": {"sinks": True}, "window_sinks": {"sliding_window": 9, "sinks": True}}


def _paged(dtype, block_size: int, lens: list[int], heads=(8, 2), head_dim=64, seed=0):
    """q [B, H, D], caches with NaN in every slot no row owns, tables padded with stale (garbage) blocks."""
    gen = torch.Generator().manual_seed(seed)
    num_heads, num_kv = heads
    widths = [-(-n // block_size) for n in lens]
    num_blocks = sum(widths) + 3
    k = torch.full((num_blocks, block_size, num_kv, head_dim), float("nan"))
    v = torch.full_like(k, float("nan"))
    order = torch.randperm(num_blocks - 1, generator=gen) + 1
    tables = torch.zeros(len(lens), max(widths) + 1, dtype=torch.int32)
    used = 0
    for b, (n, w) in enumerate(zip(lens, widths)):
        blocks = order[used:used + w]
        used += w
        tables[b, :w] = blocks
        tables[b, w:] = order[-1]  # a block nobody owns: NaN
        for j in range(n):
            k[blocks[j // block_size], j % block_size] = torch.randn(num_kv, head_dim, generator=gen)
            v[blocks[j // block_size], j % block_size] = torch.randn(num_kv, head_dim, generator=gen)
    q = torch.randn(len(lens), num_heads, head_dim, generator=gen)
    sinks = torch.randn(num_heads, generator=gen)
    return q.to(dtype), k.to(dtype), v.to(dtype), tables, torch.tensor(lens, dtype=torch.int32), sinks


def _reference(q, k, v, tables, lens, scale, **kw):
    qsl = torch.arange(len(lens) + 1, dtype=torch.int32)
    return paged_attention_padded(q, k, v, tables, qsl, lens, scale, kw.get("sliding_window"),
                                  kw.get("logit_softcap"), sinks=kw.get("sinks"))


def _kwargs(case: str, sinks: torch.Tensor) -> dict:
    kw = dict(CASES[case])
    if kw.pop("sinks", False):
        kw["sinks"] = sinks
    return kw


@pytest.mark.parametrize("block_size", [16, 1])
@pytest.mark.parametrize("case", list(CASES))
def test_native_float32_matches_reference(case, block_size):
    q, k, v, tables, lens, sinks = _paged(torch.float32, block_size, [1, 17, 50, 33, 64])
    kw = _kwargs(case, sinks)
    scale = q.shape[-1] ** -0.5
    assert cpu_native.decode_attention_supported(q, k, v)
    out = cpu_native.paged_decode_attention(q, k, v, tables, lens, scale, **kw)
    torch.testing.assert_close(out, _reference(q, k, v, tables, lens, scale, **kw), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype,atol", [(torch.bfloat16, 2e-2), (torch.float16, 3e-3)])
@pytest.mark.parametrize("case", ["plain", "window_sinks", "softcap"])
def test_native_16_bit_is_as_close_to_float64_as_the_reference(dtype, atol, case):
    """The kernel computes in float32 and rounds once; the torch reference rounds scores and probabilities to
    the cache dtype on the way. Both against float64 on the same (rounded) inputs."""
    if dtype == torch.float16 and not cpu_native.available(torch.float16):
        pytest.skip("the compiler has no _Float16")
    q, k, v, tables, lens, sinks = _paged(dtype, 16, [5, 40, 64, 2], heads=(12, 4), head_dim=128, seed=1)
    kw = _kwargs(case, sinks)
    scale = q.shape[-1] ** -0.5
    truth = _reference(q.double(), k.double(), v.double(), tables, lens, scale, **kw)
    native = cpu_native.paged_decode_attention(q, k, v, tables, lens, scale, **kw)
    reference = _reference(q, k, v, tables, lens, scale, **kw)
    assert native.dtype == dtype
    native_err = (native.double() - truth).abs().max().item()
    assert native_err <= atol
    assert native_err <= (reference.double() - truth).abs().max().item() + 1e-3


@pytest.mark.parametrize("case", list(CASES))
def test_torch_decode_formulation_matches_reference(case, monkeypatch):
    """Without the native kernel (no compiler, FP8 caches, GPUs) decode runs the gathered-matmul formulation."""
    monkeypatch.setattr(cpu_native, "decode_attention_supported", lambda *args: False)
    q, k, v, tables, lens, sinks = _paged(torch.float32, 16, [1, 17, 50, 33, 64])
    kw = _kwargs(case, sinks)
    scale = q.shape[-1] ** -0.5
    out = paged_decode_attention(q, k, v, tables, lens, scale, **kw)
    torch.testing.assert_close(out, _reference(q, k, v, tables, lens, scale, **kw), rtol=1e-5, atol=1e-5)


def test_paged_attention_decode_goes_to_the_decode_formulation():
    q, k, v, tables, lens, sinks = _paged(torch.float32, 16, [3, 30])
    qsl = torch.arange(3, dtype=torch.int32)
    via_reference = paged_attention(q, k, v, tables, qsl, lens, 0.125, None, None, 1, int(lens.max()))
    assert torch.equal(via_reference, paged_decode_attention(q, k, v, tables, lens, 0.125))


def test_compiled_call_is_one_opaque_op():
    """Under torch.compile the kernel is the custom op atom::cpu_paged_decode_attention (fullgraph: no break)."""
    q, k, v, tables, lens, sinks = _paged(torch.bfloat16, 16, [3, 30, 8])
    ops = []

    def backend(gm, example_inputs):
        ops.extend(str(n.target) for n in gm.graph.nodes if n.op == "call_function")
        return gm

    fn = torch.compile(lambda *a: paged_decode_attention(*a, 0.125, sinks=sinks), backend=backend, fullgraph=True)
    out = fn(q, k, v, tables, lens)
    assert ops == ["atom.cpu_paged_decode_attention"]  # the whole call, nothing traced around it
    assert torch.equal(out, paged_decode_attention(q, k, v, tables, lens, 0.125, sinks=sinks))


@pytest.fixture
def fresh_library(monkeypatch, tmp_path):
    """cpu_native as in a new process (library not tried yet), building into tmp_path; the module's loaded
    library is restored afterwards."""
    for name, value in (("_tried", False), ("_lib", None), ("_has_f16", False)):
        monkeypatch.setattr(cpu_native, name, value)
    monkeypatch.setenv("ATOM_CACHE_DIR", str(tmp_path))
    return tmp_path


@pytest.mark.parametrize("how", ["CC names a missing binary", "no compiler on PATH"])
def test_no_compiler_falls_back_with_a_warning(how, fresh_library, monkeypatch, caplog):
    if how == "CC names a missing binary":
        monkeypatch.setenv("CC", str(fresh_library / "no-such-compiler"))
        expected = "building the native CPU kernels failed"
    else:
        monkeypatch.delenv("CC", raising=False)
        monkeypatch.setenv("PATH", str(fresh_library))
        expected = "no C compiler found"
    q, k, v, tables, lens, _ = _paged(torch.float32, 16, [3, 30])
    with caplog.at_level("WARNING", logger="atom.ops.cpu_native"):
        assert not cpu_native.decode_attention_supported(q, k, v)
    assert expected in caplog.text and len(caplog.records) == 1 and "\n" not in caplog.records[0].getMessage()
    out = paged_decode_attention(q, k, v, tables, lens, 0.125)  # the torch formulation
    torch.testing.assert_close(out, _reference(q, k, v, tables, lens, 0.125), rtol=1e-5, atol=1e-5)


def test_disabled_by_env(fresh_library, monkeypatch):
    monkeypatch.setenv("ATOM_CPU_NATIVE", "0")
    q, k, v, _, _, _ = _paged(torch.float32, 16, [3])
    assert cpu_native.library() is None and not cpu_native.decode_attention_supported(q, k, v)


@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="x86-64 -march levels")
@pytest.mark.parametrize("arch", ["x86-64-v3", "x86-64"])
def test_portable_build_without_avx512_matches_reference(arch, fresh_library, monkeypatch, caplog):
    """The C paths CPUs without AVX512-BF16 run (ATOM_CPU_NATIVE_ARCH: x86-64-v3, AVX2 + FMA intrinsics, no
    AVX512; x86-64, plain C), for float32 / bfloat16 / float16, head_dim 64 and 128, GQA, windows, sinks,
    soft-capping."""
    monkeypatch.setenv("ATOM_CPU_NATIVE_ARCH", arch)
    with caplog.at_level("INFO", logger="atom.ops.cpu_native"):
        lib = cpu_native.library()
    assert lib is not None and lib.atom_has_bf16_dot() == 0
    assert "AVX512-BF16 dot products: no" in caplog.text
    for case in CASES:
        q, k, v, tables, lens, sinks = _paged(torch.float32, 16, [1, 17, 50, 33, 64])
        kw = _kwargs(case, sinks)
        out = cpu_native.paged_decode_attention(q, k, v, tables, lens, 0.125, **kw)
        torch.testing.assert_close(out, _reference(q, k, v, tables, lens, 0.125, **kw), rtol=1e-5, atol=1e-5)
    for dtype, atol in ((torch.bfloat16, 2e-2), (torch.float16, 3e-3)):
        if not cpu_native.available(dtype):
            continue
        for heads, head_dim in (((8, 2), 64), ((12, 4), 128)):
            q, k, v, tables, lens, sinks = _paged(dtype, 16, [5, 40, 64, 2], heads=heads, head_dim=head_dim, seed=1)
            kw = _kwargs("window_sinks", sinks)
            truth = _reference(q.double(), k.double(), v.double(), tables, lens, 0.1, **kw)
            native = cpu_native.paged_decode_attention(q, k, v, tables, lens, 0.1, **kw)
            assert (native.double() - truth).abs().max().item() <= atol


def test_block_table_out_of_range_is_an_error_not_a_read():
    q, k, v, tables, lens, _ = _paged(torch.float32, 16, [3, 30])
    bad = tables.clone()
    bad[1, 1] = k.shape[0]  # one past the last block
    with pytest.raises(RuntimeError, match="out of range"):
        cpu_native.paged_decode_attention(q, k, v, bad, lens, 0.125)
    with pytest.raises(RuntimeError, match="out of range"):  # longer than its table
        cpu_native.paged_decode_attention(q, k, v, tables, torch.tensor([3, 16 * tables.shape[1] + 1]), 0.125)
    bad = tables.clone()
    bad[0, 0] = -1
    with pytest.raises(RuntimeError, match="out of range"):
        cpu_native.paged_decode_attention(q, k, v, bad, lens, 0.125)


def test_unwritable_cache_dir_builds_in_a_temporary_folder(fresh_library, monkeypatch):
    blocker = fresh_library / "a-file"
    blocker.write_text("")
    monkeypatch.setenv("ATOM_CACHE_DIR", str(blocker))  # cpu-kernels cannot be made under a file
    path = cpu_native._build(cpu_native._compiler())
    assert os.path.dirname(path).startswith(tempfile.gettempdir())


@pytest.mark.parametrize("window", [None, 6, 40])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_rows_path_matches_padded_reference(dtype, window):
    """Mixed steps on CPU: decoding rows batched, each prefill row (with a cached prefix or without, longer and
    shorter than the window) through torch's fused attention, against the padded formulation."""
    q_lens, lens = [1, 5, 17, 1, 30, 12], [9, 5, 40, 64, 30, 50]
    _, k, v, tables, seq_lens, _ = _paged(dtype, 16, lens)
    q = torch.randn(sum(q_lens), 8, 64, generator=torch.Generator().manual_seed(2)).to(dtype)
    qsl = torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()], dtype=torch.int32)
    out = paged_attention(q, k, v, tables, qsl, seq_lens, 0.125, window, None, max(q_lens), max(lens))
    ref = paged_attention_padded(q, k, v, tables, qsl, seq_lens, 0.125, window, None)
    assert not out.isnan().any()
    if dtype == torch.float32:
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    else:
        truth = paged_attention_padded(q.double(), k.double(), v.double(), tables, qsl, seq_lens, 0.125, window, None)
        assert (out.double() - truth).abs().max() <= (ref.double() - truth).abs().max() + 1e-2


def test_concurrent_builds_install_one_whole_library_which_is_cached(fresh_library):
    """Builders racing on one cache folder (processes starting together do) each compile in a private folder and
    rename into place: every one gets a loadable library at the same path, nothing is left behind; a later
    build finds it (not rebuilt) and rebuilds it when it is gone; threads asking library() at once all get the
    one library."""
    from concurrent.futures import ThreadPoolExecutor

    compiler = cpu_native._compiler()
    with ThreadPoolExecutor(2) as pool:
        paths = list(pool.map(lambda _: cpu_native._build(compiler), range(2)))
    path = paths[0]
    assert paths == [path, path] and path.startswith(str(fresh_library / "cpu-kernels"))
    assert [p.name for p in (fresh_library / "cpu-kernels").iterdir()] == [os.path.basename(path)]
    built = os.stat(path).st_mtime_ns
    assert cpu_native._build(compiler) == path and os.stat(path).st_mtime_ns == built  # found, not rebuilt
    with ThreadPoolExecutor(4) as pool:
        libs = list(pool.map(lambda _: cpu_native.library(), range(4)))
    assert libs[0] is not None and all(lib is libs[0] for lib in libs)
    assert libs[0].atom_cpu_attention_abi() == cpu_native._ABI
    os.unlink(path)
    assert cpu_native._build(compiler) == path and os.path.exists(path)
