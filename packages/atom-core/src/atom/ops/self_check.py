"""Numerical self-check of an implementation against the op's torch reference, before a model uses it.

AITER bindings have never run on ROCm hardware here, so they are trusted only after this passes on the
machine that runs them (ATOM_KERNEL_SELF_CHECK=all checks every non-reference implementation). The op's
OpDef.example gives small, representative inputs (fixed seed: the choice is reproducible); reference and
candidate run on separate copies; outputs and every argument the op mutates are compared, floats by
relative-norm error against a per-dtype bound, integers exactly.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

# Relative-norm error bounds: a correct kernel differs from the reference by rounding (bf16 keeps 8
# mantissa bits); a wrong layout, binding or argument order gives errors of order 1.
TOLERANCE = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 3e-2}


class CheckInputs:
    """Random tensors for one self-check: the layer's dtype and device, a fixed seed."""

    def __init__(self, dtype: torch.dtype, device: torch.device, seed: int = 0):
        self.dtype, self.device = dtype, device
        self.gen = torch.Generator(device="cpu").manual_seed(seed)

    def randn(self, *shape: int, dtype: torch.dtype | None = None, scale: float = 1.0) -> torch.Tensor:
        x = torch.randn(*shape, generator=self.gen, dtype=torch.float32) * scale
        return x.to(device=self.device, dtype=dtype or self.dtype)

    def randperm(self, n: int) -> torch.Tensor:
        return torch.randperm(n, generator=self.gen).to(self.device)

    def rand(self, *shape: int) -> torch.Tensor:
        return torch.rand(*shape, generator=self.gen).to(self.device)

    def tensor(self, data, dtype: torch.dtype) -> torch.Tensor:
        return torch.tensor(data, dtype=dtype, device=self.device)


def _flat(out) -> list:
    if isinstance(out, (tuple, list)):
        return [t for o in out for t in _flat(o)]
    return [out]


def compare_outputs(ref, out) -> str | None:
    """None when `out` matches `ref` (tensors, tuples of tensors or None), else how it differs."""
    ref, out = _flat(ref), _flat(out)
    if len(ref) != len(out):
        return f"{len(out)} outputs, the reference gives {len(ref)}"
    for i, (r, o) in enumerate(zip(ref, out)):
        if r is None and o is None:
            continue
        if not isinstance(r, torch.Tensor) or not isinstance(o, torch.Tensor):
            return f"output {i} is {type(o).__name__}, the reference gives {type(r).__name__}"
        if r.shape != o.shape or r.dtype != o.dtype:
            return f"output {i} is {o.dtype}{list(o.shape)}, the reference gives {r.dtype}{list(r.shape)}"
        if not r.is_floating_point():
            if not torch.equal(r, o):
                return f"output {i} ({r.dtype}) differs in {int((r != o).sum())} of {r.numel()} entries"
            continue
        rd, od = r.double(), o.double()
        if bool(torch.isnan(od).any()) and not bool(torch.isnan(rd).any()):
            return f"output {i} has NaNs"
        err = float((od - rd).norm() / rd.norm().clamp_min(1e-30))
        bound = TOLERANCE.get(r.dtype, 1e-4)
        if not err < bound:
            return f"output {i} has relative error {err:.2e} (bound {bound:.0e} for {r.dtype})"
    return None


def _clone(args):
    return [a.clone() if isinstance(a, torch.Tensor) else a for a in args]


def self_check(opdef, reference, impl, fn, dtype: torch.dtype, device: torch.device,
               static: Mapping) -> str | None:
    """None if `fn` (impl's callable) agrees with `reference` on the op's example inputs, else why not."""
    import inspect

    if opdef.example is None:
        return f"op {opdef.name} defines no self-check inputs (define_op(example=...))"
    params = list(inspect.signature(reference.fn).parameters)
    calls = opdef.example(CheckInputs(dtype, device), static)
    calls = calls if isinstance(calls, list) else [calls]
    with torch.no_grad():
        for n, args in enumerate(calls):
            ref_args, test_args = _clone(args), _clone(args)
            ref_out = reference.fn(*ref_args)
            if impl.prepare_weights is not None:
                idx = [params.index(a) for a in opdef.weight_args]
                for i, w in zip(idx, impl.prepare_weights(*(test_args[i] for i in idx))):
                    test_args[i] = w
            try:
                out = fn(*test_args)
                if device.type == "cuda":
                    torch.cuda.synchronize(device)  # a kernel fault surfaces here, not in the model
            except Exception as e:  # any failure means: do not use this implementation
                return f"call {n} raised {type(e).__name__}: {e}"
            failure = (opdef.compare or compare_outputs)(ref_out, out)
            for name in opdef.mutates_args:
                if failure is None:
                    i = params.index(name)
                    failure = compare_outputs(ref_args[i], test_args[i])
                    failure = failure and f"argument {name} (written in place): {failure}"
            if failure is not None:
                return f"call {n}: {failure}"
    return None
