"""Native CPU kernels, compiled on the machine that runs them (csrc/*.c with the system C compiler, -O3
-march=native) and called through ctypes: what plain PyTorch cannot do fast enough on a CPU.

Today one kernel: decode attention over the paged KV cache (csrc/cpu_attention.c). PyTorch has no paged
attention on CPU; gathering each row's blocks and running batched matmuls reads the cache two to three times
and costs more than the GEMMs of a decode step at batch 32 (SmolLM2-135M, one core), where the kernel reads
each key and value once.

The library is built once per (source, compiler, flags, CPU) into $ATOM_CACHE_DIR/cpu-kernels (default
~/.cache/atom/cpu-kernels; a per-user temporary folder when that one cannot be written), ~1 s, and loaded on
first use. Processes building at once each compile in a private folder and rename the result into place
(atomic). Without a C compiler ($CC, else cc, gcc or clang), when the build fails, or with ATOM_CPU_NATIVE=0,
`library()` is None (one log line says why) and callers run their PyTorch formulation. The code is built
for the CPU it runs on (-march=native: AVX512-BF16 dot products where the CPU has them, AVX512 or AVX2+FMA
intrinsics for the float32 dot products and the softmax, plain C elsewhere); ATOM_CPU_NATIVE_ARCH=<gcc -march
value> builds for another target (tests build x86-64-v3, no AVX512, and x86-64, plain C, that way). The kernels are single-threaded (the
engine's CPU default is one thread per process) and reentrant.
Under torch.compile the kernel is the custom op `torch.ops.atom.cpu_paged_decode_attention`.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shlex
import shutil
import subprocess
import tempfile
import threading
from importlib import resources

import torch

logger = logging.getLogger(__name__)

_SOURCES = ("cpu_attention.c",)
_FLAGS = ["-O3", "-fopenmp-simd", "-fno-strict-aliasing", "-fno-math-errno", "-shared", "-fPIC"]
_DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
_ABI = 2
_ERRORS = {1: "unsupported shape", 2: "a sequence length or block-table entry out of range",
           3: "float16 not supported by this build", 4: "out of memory"}

_lock = threading.Lock()
_lib: ctypes.CDLL | None = None
_tried = False
_has_f16 = False


def enabled() -> bool:
    return os.environ.get("ATOM_CPU_NATIVE", "1").lower() not in ("0", "false", "no", "off")


def _compiler() -> list[str] | None:
    """The C compiler command: $CC (may carry a wrapper, e.g. "ccache gcc"), else cc, gcc or clang."""
    if os.environ.get("CC"):
        return shlex.split(os.environ["CC"])
    found = shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    return [found] if found else None


def _flags() -> list[str]:
    return [f"-march={os.environ.get('ATOM_CPU_NATIVE_ARCH') or 'native'}", *_FLAGS]


def _cache_folder() -> str:
    """$ATOM_CACHE_DIR/cpu-kernels (default ~/.cache/atom), or a per-user temporary folder when that one cannot
    be created or written (a read-only home)."""
    root = os.environ.get("ATOM_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "atom")
    folder = os.path.join(root, "cpu-kernels")
    try:
        os.makedirs(folder, exist_ok=True)
        if os.access(folder, os.W_OK | os.X_OK):
            return folder
    except OSError:
        pass
    folder = os.path.join(tempfile.gettempdir(), f"atom-cpu-kernels-{os.getuid() if hasattr(os, 'getuid') else 0}")
    os.makedirs(folder, mode=0o700, exist_ok=True)
    return folder


def _cpu_id() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return "".join(line for line in f if line.startswith(("model name", "flags")))[:8192]
    except OSError:
        return platform.processor()


def _build(compiler: list[str]) -> str:
    source = "".join((resources.files("atom.ops") / "csrc" / name).read_text() for name in _SOURCES)
    version = subprocess.run([*compiler, "--version"], capture_output=True, text=True, timeout=60).stdout
    flags = _flags()
    key = hashlib.sha256("\0".join([source, " ".join(compiler), version, " ".join(flags), platform.machine(),
                                    _cpu_id()]).encode()).hexdigest()[:20]
    folder = _cache_folder()
    path = os.path.join(folder, f"atom_cpu_{key}.so")
    if os.path.exists(path):
        return path
    with tempfile.TemporaryDirectory(dir=folder) as tmp:
        src = os.path.join(tmp, "kernels.c")
        with open(src, "w") as f:
            f.write(source)
        out = os.path.join(tmp, "kernels.so")
        done = subprocess.run([*compiler, *flags, "-o", out, src, "-lm"], capture_output=True, text=True,
                              timeout=300)
        if done.returncode != 0:
            first = next((line for line in done.stderr.splitlines() if "error" in line), done.stderr.strip()[-300:])
            raise RuntimeError(f"{' '.join(compiler)} {' '.join(flags[:1])} failed: {first.strip()}")
        os.replace(out, path)  # atomic: processes building at once each install a whole library
    return path


def library() -> ctypes.CDLL | None:
    """The loaded kernel library, or None (disabled, no compiler, build failed: logged once). Thread-safe: a
    caller that comes while another builds waits for the outcome (`_tried` is set only once `_lib` is final)."""
    global _lib, _tried
    if _tried:
        return _lib
    with _lock:
        if not _tried:
            _lib = _load()
            _tried = True
        return _lib


def _load() -> ctypes.CDLL | None:
    global _has_f16
    if not enabled():
        logger.info("native CPU kernels off (ATOM_CPU_NATIVE=0): PyTorch formulations run instead")
        return None
    compiler = _compiler()
    if compiler is None:
        logger.warning("native CPU kernels not built: no C compiler found (cc, gcc, clang or $CC); CPU decode "
                       "attention runs as PyTorch ops, which is slower")
        return None
    try:
        path = _build(compiler)
        lib = ctypes.CDLL(path)
        if lib.atom_cpu_attention_abi() != _ABI:
            raise RuntimeError("stale kernel library")
    except (OSError, RuntimeError, subprocess.SubprocessError) as e:
        reason = " ".join(str(e).split())[:300]
        logger.warning("building the native CPU kernels failed (%s): CPU decode attention runs as PyTorch ops, "
                       "which is slower", reason)
        return None
    fn = lib.atom_paged_decode_attention
    fn.restype = ctypes.c_int
    fn.argtypes = ([ctypes.c_void_p] * 4 + [ctypes.c_int, ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p]
                   + [ctypes.c_int64] * 6 + [ctypes.c_float, ctypes.c_int64, ctypes.c_float, ctypes.c_void_p])
    _has_f16 = bool(lib.atom_has_f16())
    logger.info("native CPU kernels loaded from %s (AVX512-BF16 dot products: %s)", path,
                "yes" if lib.atom_has_bf16_dot() else "no")
    return lib


def available(dtype: torch.dtype) -> bool:
    """Whether the kernels are built and take this element type. Traceable once the library was tried (a
    compiled step's warm-up calls library() first); while compiling before that, False."""
    if not _tried:
        if torch.compiler.is_compiling():
            return False
        library()
    return _lib is not None and dtype in _DTYPE_CODES and (dtype != torch.float16 or _has_f16)


def decode_attention_supported(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor) -> bool:
    """Whether the native kernel takes this call: CPU tensors of one supported element type, contiguous caches,
    the library built."""
    return (q.device.type == "cpu" and q.dtype == k_cache.dtype == v_cache.dtype and q.dim() == 3
            and k_cache.dim() == 4 and k_cache.shape == v_cache.shape and q.shape[-1] == k_cache.shape[-1] <= 1024
            and q.shape[1] % k_cache.shape[2] == 0
            and k_cache.is_contiguous() and v_cache.is_contiguous() and available(k_cache.dtype))


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def paged_decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                           seq_lens: torch.Tensor, scale: float, sliding_window: int | None = None,
                           logit_softcap: float | None = None, sinks: torch.Tensor | None = None) -> torch.Tensor:
    """The kernel (see csrc/cpu_attention.c): q [B, H, D] -> out [B, H, D]; caller checked
    decode_attention_supported."""
    q = q.contiguous()
    tables = block_tables.to(torch.int32).contiguous()
    lens = seq_lens.to(torch.int32).contiguous()
    sink = None if sinks is None else sinks.float().contiguous()
    batch, num_heads, head_dim = q.shape
    out = torch.empty_like(q)
    rc = library().atom_paged_decode_attention(
        _ptr(q), _ptr(k_cache), _ptr(v_cache), _ptr(out), _DTYPE_CODES[q.dtype], _ptr(tables), tables.shape[1],
        _ptr(lens), batch, num_heads, k_cache.shape[2], head_dim, k_cache.shape[1], k_cache.shape[0], float(scale),
        int(sliding_window or 0), float(logit_softcap or 0.0), _ptr(sink))
    if rc != 0:
        raise RuntimeError(f"native decode attention: {_ERRORS.get(rc, f'error {rc}')} (q {tuple(q.shape)}, "
                           f"cache {tuple(k_cache.shape)}, block tables {tuple(tables.shape)})")
    return out


def _decode_attention_kernel(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                             block_tables: torch.Tensor, seq_lens: torch.Tensor, scale: float, sliding_window: int,
                             logit_softcap: float, sinks: torch.Tensor | None) -> torch.Tensor:
    return paged_decode_attention(q, k_cache, v_cache, block_tables, seq_lens, scale, sliding_window or None,
                                  logit_softcap or None, sinks)


# A plain Library op on the CPU key (the least dispatch cost a Python kernel gets)
_LIB = torch.library.Library("atom", "FRAGMENT")
_LIB.define("cpu_paged_decode_attention(Tensor q, Tensor k_cache, Tensor v_cache, Tensor block_tables, "
            "Tensor seq_lens, float scale, int sliding_window, float logit_softcap, Tensor? sinks) -> Tensor")
_LIB.impl("cpu_paged_decode_attention", _decode_attention_kernel, "CPU")


@torch.library.register_fake("atom::cpu_paged_decode_attention", lib=_LIB)
def _(q, k_cache, v_cache, block_tables, seq_lens, scale, sliding_window, logit_softcap, sinks):
    return torch.empty_like(q, memory_format=torch.contiguous_format)


def paged_decode_attention_op(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                              block_tables: torch.Tensor, seq_lens: torch.Tensor, scale: float,
                              sliding_window: int | None = None, logit_softcap: float | None = None,
                              sinks: torch.Tensor | None = None) -> torch.Tensor:
    """paged_decode_attention as one opaque node under torch.compile, the direct call otherwise."""
    if torch.compiler.is_compiling():
        return torch.ops.atom.cpu_paged_decode_attention(q, k_cache, v_cache, block_tables, seq_lens, scale,
                                                         int(sliding_window or 0), float(logit_softcap or 0.0),
                                                         sinks)
    return paged_decode_attention(q, k_cache, v_cache, block_tables, seq_lens, scale, sliding_window,
                                  logit_softcap, sinks)
