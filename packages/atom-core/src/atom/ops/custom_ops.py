"""`torch.library` custom ops (namespace `atom`) for implementations a compiler cannot trace into.

One op per (op, backend): `torch.ops.atom.<op>_<backend>`, with the torch reference's signature as its
schema (mutated arguments declared from OpDef.mutates_args, e.g. the KV caches) and a fake
implementation (OpDef.fake, or the torch reference run on fake tensors) that gives torch.compile the
output shapes and dtypes. Defined lazily, the first time `resolve` hands the implementation out.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

_LIB = torch.library.Library("atom", "FRAGMENT")
_KERNELS: dict[str, Callable] = {}  # custom op name -> the implementation it runs now
_OPS: dict[str, Callable] = {}  # custom op name -> torch.ops.atom.<name>.default


def custom_op_name(op: str, backend: str) -> str:
    return f"{op}_{backend}"


def custom_op_for(impl, opdef) -> Callable:
    """The custom op running `impl` (registry.Impl), defined on first use."""
    from atom.ops.registry import _IMPLS

    name = custom_op_name(impl.op, impl.backend)
    # Re-registering an implementation (tests plant some) swaps the kernel behind the same op.
    _KERNELS[name] = impl.fn
    if name not in _OPS:
        reference = _IMPLS[impl.op]["torch"].fn  # the op's signature, whatever implements it
        schema = torch.library.infer_schema(reference, mutates_args=opdef.mutates_args)
        _LIB.define(name + schema)
        _LIB.impl(name, lambda *args, **kwargs: _KERNELS[name](*args, **kwargs), "CompositeExplicitAutograd")
        torch.library.register_fake(f"atom::{name}", opdef.fake or reference, lib=_LIB)
        _OPS[name] = getattr(torch.ops.atom, name).default
    return _OPS[name]
