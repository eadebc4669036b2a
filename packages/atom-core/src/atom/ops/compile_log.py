"""Triton JIT compile log: which kernels compile, how often, how long, and what differs between the variants.

Triton compiles a kernel once per specialisation: its constexpr values, num_warps/num_stages, and for every
other argument its type plus Triton's value specialisation (an int equal to 1 becomes a constant, an int or
pointer divisible by 16 gets a divisibility hint). A start-up that captures CUDA graphs for many batch sizes
can therefore compile the same kernel many times. `CompileLog` hooks Triton's JIT (the cache hook before a
compile, the post-compile hook after it) and records every in-process cache miss under the label the caller
set (a start-up phase, a captured batch size). A miss that the on-disk cache serves still passes the hooks,
but in milliseconds; `disk_hit_s` separates the two. Works with Triton >= 3.3 (`triton.knobs`) and the older
`JITFunction.cache_hook` / `compiled_hook`; does nothing without Triton or under its interpreter.
"""

from __future__ import annotations

import re
import threading
import time
from dataclasses import dataclass, field
from typing import Any

_ARG = re.compile(r"(\w+): ([^,]+)")


@dataclass
class Compile:
    kernel: str
    label: str
    seconds: float
    spec: dict[str, str]  # argument -> Triton's type/specialisation, plus num_warps, num_stages, constexprs


@dataclass
class CompileLog:
    """Install with `install()`; `label` is the phase the next compiles are counted under."""

    label: str = "start"
    disk_hit_s: float = 0.05  # a compile shorter than this came from Triton's on-disk cache
    compiles: list[Compile] = field(default_factory=list)
    _pending: dict[int, tuple[float, str, dict[str, str]]] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _restore: Any = None

    # ---- hooks ---------------------------------------------------------------------------------------
    def _before(self, *args: Any, **kw: Any) -> bool:
        spec = _spec(kw)
        with self._lock:
            self._pending[threading.get_ident()] = (time.perf_counter(), _kernel_name(kw), spec)
        return False  # False: go on and compile

    def _after(self, *args: Any, **kw: Any) -> bool:
        with self._lock:
            started = self._pending.pop(threading.get_ident(), None)
        if started is not None:
            t0, name, spec = started
            self.compiles.append(Compile(name, self.label, time.perf_counter() - t0, spec))
        return False

    def install(self) -> bool:
        """Hook Triton's JIT; False when there is nothing to hook (no Triton, or its interpreter)."""
        try:
            import triton
        except ImportError:
            return False
        knobs = getattr(triton, "knobs", None)
        if knobs is not None and hasattr(knobs, "runtime") and hasattr(knobs.runtime, "jit_cache_hook"):
            if getattr(knobs.runtime, "interpret", False):
                return False
            rt = knobs.runtime
            old = (rt.jit_cache_hook, rt.jit_post_compile_hook)
            rt.jit_cache_hook, rt.jit_post_compile_hook = _chain(old[0], self._before), _chain(old[1], self._after)

            def restore() -> None:
                rt.jit_cache_hook, rt.jit_post_compile_hook = old

        else:  # Triton < 3.3
            from triton.runtime.jit import JITFunction

            old = (JITFunction.cache_hook, getattr(JITFunction, "compiled_hook", None))
            JITFunction.cache_hook = _chain(old[0], self._before)
            JITFunction.compiled_hook = _chain(old[1], self._after)

            def restore() -> None:
                JITFunction.cache_hook, JITFunction.compiled_hook = old

        self._restore = restore
        return True

    def uninstall(self) -> None:
        if self._restore is not None:
            self._restore()
            self._restore = None

    # ---- summaries -----------------------------------------------------------------------------------
    def by_label(self) -> dict[str, dict[str, float]]:
        """label -> {compiles, seconds, disk_hits} in the order labels first appeared."""
        out: dict[str, dict[str, float]] = {}
        for c in self.compiles:
            row = out.setdefault(c.label, dict(compiles=0, seconds=0.0, disk_hits=0))
            row["compiles"] += 1
            row["seconds"] += c.seconds
            row["disk_hits"] += c.seconds < self.disk_hit_s
        return out

    def by_kernel(self) -> list[dict[str, Any]]:
        """One entry per kernel, most compile time first: variants, seconds, and the specialisation fields
        whose value differs between its variants (what makes it recompile), with the values seen."""
        kernels: dict[str, list[Compile]] = {}
        for c in self.compiles:
            kernels.setdefault(c.kernel, []).append(c)
        rows = []
        for name, cs in kernels.items():
            keys = sorted({k for c in cs for k in c.spec})
            varying = {k: sorted({c.spec.get(k, "-") for c in cs}) for k in keys
                       if len({c.spec.get(k, "-") for c in cs}) > 1}
            rows.append(dict(kernel=name, variants=len(cs), seconds=sum(c.seconds for c in cs),
                             disk_hits=sum(c.seconds < self.disk_hit_s for c in cs),
                             labels=sorted({c.label for c in cs}, key=[c.label for c in cs].index),
                             varying=varying))
        return sorted(rows, key=lambda r: -r["seconds"])

    def report(self) -> dict[str, Any]:
        total = sum(c.seconds for c in self.compiles)
        return dict(compiles=len(self.compiles), seconds=total, by_label=self.by_label(), by_kernel=self.by_kernel())

    def format(self, top: int = 15, timed: bool = True) -> str:
        """Text summary; timed=False leaves the seconds out (a census of keys, nothing compiled)."""
        rep = self.report()
        secs = (lambda s: f" {s:7.1f} s") if timed else (lambda s: "")
        head = f"Triton JIT: {rep['compiles']} compiles"
        if timed:
            head += (f", {rep['seconds']:.1f} s (of them served by the on-disk cache: "
                     f"{sum(r['disk_hits'] for r in rep['by_kernel'])})")
        lines = [head]
        for label, row in rep["by_label"].items():
            lines.append(f"  {label:<28} {row['compiles']:4d} compiles{secs(row['seconds'])}")
        lines.append("  per kernel: variants," + (" seconds," if timed else "")
                     + " what differs between its variants (arg type/value, :16 = divisible by 16, =v = constant):")
        for r in rep["by_kernel"][:top]:
            diff = "; ".join(f"{k} {' | '.join(v)}" for k, v in r["varying"].items()) or "-"
            lines.append(f"    {r['kernel']:<30} {r['variants']:3d}{secs(r['seconds'])}  {diff[:300]}")
        return "\n".join(lines)


def _chain(prev, hook):
    if prev is None:
        return hook

    def both(*args: Any, **kw: Any):
        skip = prev(*args, **kw)
        hook(*args, **kw)
        return skip

    return both


def _kernel_name(kw: dict[str, Any]) -> str:
    fn = kw.get("fn")
    name = getattr(fn, "name", None)
    if name:
        return str(name).rsplit(".", 1)[-1]
    return str(kw.get("repr", "?")).split("[", 1)[0]


def _spec(kw: dict[str, Any]) -> dict[str, str]:
    """The specialisation of one compile: every argument's Triton type (`i32`, `*bf16`; `:16` when Triton
    was told it is divisible by 16; `=v` for constexprs and for ints specialised to the constant 1), plus
    num_warps and num_stages."""
    info = kw.get("compile") or {}
    spec: dict[str, str] = {}
    for opt in ("num_warps", "num_stages"):
        if info.get(opt) is not None:
            spec[opt] = str(info[opt])
    sig = info.get("signature") or {}
    names = list(sig) if isinstance(sig, dict) else []
    if not names:  # an older hook: the types are only in the repr ("name[opts](arg: type, ...)")
        _, _, args = str(kw.get("repr", "")).partition("](")
        return {**spec, **{n: t.strip() for n, t in _ARG.findall(args.rstrip(")"))}}
    for name, ty in sig.items():
        if ty != "constexpr":
            spec[name] = str(ty)

    def arg_name(path: Any) -> str:
        idx = path[0] if isinstance(path, tuple) and path else path
        return names[idx] if isinstance(idx, int) and idx < len(names) else str(path)

    for path, value in (info.get("constants") or {}).items():
        spec[arg_name(path)] = f"={value}"
    for attrs in info.get("configs") or []:  # {(arg index,): [["tt.divisibility", 16]]}
        if isinstance(attrs, dict):
            for path, hints in attrs.items():
                if "divisibility" in str(hints):
                    spec[arg_name(path)] = spec.get(arg_name(path), "") + ":16"
    return spec
