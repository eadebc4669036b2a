"""Kernel dispatch: one table of implementations per op, chosen once per layer at model build time.

Adding an op: a torch reference registered with `@register("op", "torch")` (the oracle), its module named in
`_OP_FAMILY`, and `define_op(...)` next to it: what it writes in place, its fake for torch.compile, the
inputs of its self-check. Faster implementations register under "triton" or "aiter" in their own files,
with the same signature, and declare their capabilities (CUDA-graph capturable, dtypes, devices, whether
they are verified). Without define_op an op still runs, but is not a custom op under torch.compile
(Dynamo traces into its Python, breaking the graph where it reads tensors on the host) and its unverified
(AITER) implementations are never used (nothing to check them with).

Choosing: ATOM_KERNEL_BACKEND=auto|torch|triton|aiter sets the requested backend of every op;
ATOM_KERNEL_OVERRIDES="rms_norm=torch,paged_attention=triton" overrides single ops. From the requested
backend the chain aiter -> triton -> torch is walked: an implementation is skipped (WARNING with the
reason) when it is missing, its backend cannot run here, it does not support the layer's dtype, device or
static arguments, or it is unverified and fails its numerical self-check against the torch reference
(atom.ops.self_check). The torch reference ends every chain.

Compilers: `resolve` returns the implementation itself in eager mode; under torch.compile the opaque
ones of declared ops (every triton/aiter kernel, and torch references that read tensors on the host) are
called through their `torch.library` custom op `torch.ops.atom.<op>_<backend>` (atom.ops.custom_ops), so
Dynamo traces around them without a graph break and Inductor fuses their neighbours.
"""

from __future__ import annotations

import functools
import importlib
import logging
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch

from atom import platform

logger = logging.getLogger(__name__)

# Fallback order: each backend falls back to the ones after it.
BACKEND_ORDER = ("aiter", "triton", "torch")


@dataclass(frozen=True)
class OpDef:
    """What is true of an op whatever implements it (declared once, next to its torch reference)."""

    name: str
    mutates_args: tuple[str, ...] = ()  # arguments written in place (KV-cache writes)
    # (*args) -> outputs with the right shapes/dtypes, for torch.compile; None: the torch reference run on
    # fake tensors (fine when its output shapes do not depend on tensor values)
    fake: Callable | None = None
    # (inputs: self_check.CheckInputs, static: Mapping) -> positional args of a small representative call
    example: Callable | None = None
    # (ref_outputs, outputs) -> None or a reason they differ; None: self_check.compare_outputs
    compare: Callable | None = None
    weight_args: tuple[str, ...] = ()  # arguments an implementation may want in its own layout (prepare_weights)
    # False for host-side ops that take Python objects (sample's generators). An op without define_op is
    # never a custom op: nothing says what it writes in place, and a wrong guess would drop the writes.
    custom_op: bool = True


@dataclass(frozen=True)
class Impl:
    """One implementation of an op and what it can do."""

    op: str
    backend: str
    fn: Callable
    cuda_graph: bool = True  # can be captured in a CUDA graph (no host sync, no data-dependent shapes)
    traceable: bool = False  # plain torch code torch.compile may trace into (no custom op needed)
    dtypes: frozenset | None = None  # activation dtypes it handles; None: any
    devices: frozenset | None = None  # device kinds ("cpu", "cuda", "rocm") it runs on; None: the backend's
    verified: bool = True  # False: used only after passing the self-check against the torch reference
    # (static) -> None, or why this implementation cannot serve a layer with these build-time properties
    supports: Callable[[Mapping], str | None] | None = None
    # (*weight tensors of OpDef.weight_args) -> the same tensors in this implementation's layout; layers
    # apply it once after loading (atom.quantization), the self-check before calling the implementation
    prepare_weights: Callable | None = None


_IMPLS: dict[str, dict[str, Impl]] = {}
_OPS: dict[str, OpDef] = {}
_IMPL_OF: dict[Callable, Impl] = {}  # every callable `resolve` has handed out -> its Impl
_RESOLVED: dict[tuple, Callable] = {}  # resolution cache: (op, requested backend, dtype, device, static)
_CHECKED: dict[tuple, str | None] = {}  # self-check results: key -> None (passed) or the failure
# Modules that register non-reference implementations, imported on first use of their backend.
_BACKEND_MODULES = {"triton": "atom.ops.triton_kernels", "aiter": "atom.ops.aiter_bindings"}
_loaded_backends: set[str] = set()


def define_op(name: str, **fields) -> OpDef:
    """Declare an op's backend-independent facts (see OpDef): what makes it a custom op under torch.compile
    and gives its unverified implementations a self-check."""
    op = OpDef(name, **fields)
    _OPS[name] = op
    return op


def op_def(name: str) -> OpDef:
    _import_family(name)
    return _OPS.get(name) or OpDef(name, custom_op=False)


def register(op: str, backend: str, *, cuda_graph: bool = True, traceable: bool | None = None,
             dtypes=None, devices=None, verified: bool | None = None, supports=None,
             prepare_weights=None) -> Callable[[Callable], Callable]:
    """Register `fn` as `op`'s implementation for `backend`. Defaults: torch references are traceable and
    verified (they are the oracle); aiter bindings are unverified (never run on hardware here)."""
    if backend not in BACKEND_ORDER:
        raise ValueError(f"unknown kernel backend {backend!r} for op {op!r}; choose one of {', '.join(BACKEND_ORDER)}")

    def wrap(fn: Callable) -> Callable:
        impl = Impl(op, backend, fn, cuda_graph=cuda_graph,
                    traceable=backend == "torch" if traceable is None else traceable,
                    dtypes=frozenset(dtypes) if dtypes is not None else None,
                    devices=frozenset(devices) if devices is not None else None,
                    verified=backend != "aiter" if verified is None else verified,
                    supports=supports, prepare_weights=prepare_weights)
        _IMPLS.setdefault(op, {})[backend] = impl
        forget_resolutions(op)
        return fn

    return wrap


def forget_resolutions(op: str | None = None) -> None:
    """Drop cached choices and self-check results (of one op, or all): registrations changed."""
    for cache in (_RESOLVED, _CHECKED):
        for key in [k for k in cache if op is None or k[0] == op]:
            del cache[key]


def _import_family(op: str) -> None:
    if op not in _OP_FAMILY:
        raise ValueError(f"unknown op {op!r}; ops: {', '.join(sorted(_OP_FAMILY))}")
    importlib.import_module(f"atom.ops.{_OP_FAMILY[op]}")


def _load_backend(backend: str) -> None:
    if backend in _loaded_backends or backend not in _BACKEND_MODULES:
        return
    importlib.import_module(_BACKEND_MODULES[backend])
    _loaded_backends.add(backend)


def _overrides() -> dict[str, str]:
    spec = os.environ.get("ATOM_KERNEL_OVERRIDES", "").strip()
    out: dict[str, str] = {}
    for item in filter(None, (s.strip() for s in spec.split(","))):
        if "=" not in item:
            raise ValueError(f"ATOM_KERNEL_OVERRIDES entry {item!r} is not of the form op=backend")
        op, backend = (s.strip() for s in item.split("=", 1))
        if op not in _OP_FAMILY:  # a typo would otherwise be silently ignored
            raise ValueError(f"ATOM_KERNEL_OVERRIDES names unknown op {op!r}; ops: {', '.join(sorted(_OP_FAMILY))}")
        out[op] = backend.lower()
    return out


def backend_for(op: str) -> str:
    """The backend requested for `op` (override or process-wide); raises when it cannot run here."""
    backend = _overrides().get(op) or platform.kernel_backend()
    ok, reason = platform.backend_status(backend)
    if not ok:
        raise RuntimeError(f"kernel backend {backend!r} requested for op {op!r} is not usable here: {reason}")
    return backend


def _device_kind(device: torch.device) -> str:
    if device.type == "cuda":
        return "rocm" if torch.version.hip else "cuda"
    return device.type


def _default_devices(backend: str) -> frozenset | None:
    if backend == "triton":  # CPU tensors only through Triton's interpreter (tests)
        return frozenset({"cuda", "rocm", "cpu"} if os.environ.get("TRITON_INTERPRET") == "1" else {"cuda", "rocm"})
    if backend == "aiter":
        return frozenset({"rocm"})
    return None


def _self_check_mode() -> str:
    mode = os.environ.get("ATOM_KERNEL_SELF_CHECK", "auto").strip().lower() or "auto"
    if mode not in ("auto", "all"):
        raise ValueError(f"ATOM_KERNEL_SELF_CHECK={mode!r}: choose auto (unverified implementations) or all")
    return mode


def _unusable(op: str, backend: str, dtype: torch.dtype, device: torch.device, static: Mapping) -> str | None:
    """None when `backend`'s implementation of `op` may serve this layer, else why not."""
    ok, reason = platform.backend_status(backend)
    if not ok:
        return reason
    try:
        _load_backend(backend)
    except Exception as e:  # pragma: no cover - a broken install of the backend's package
        return f"the {backend} bindings failed to load: {e}"
    impl = _IMPLS[op].get(backend)
    if impl is None:
        return f"there is no {backend} implementation"
    kind = _device_kind(device)
    devices = impl.devices if impl.devices is not None else _default_devices(backend)
    if kind != "meta" and devices is not None and kind not in devices:
        return f"it does not run on {kind} tensors (runs on {', '.join(sorted(devices))})"
    if impl.dtypes is not None and dtype not in impl.dtypes:
        return f"it does not support {dtype} (supports {', '.join(sorted(str(d) for d in impl.dtypes))})"
    if impl.supports is not None and (why := impl.supports(static)):
        return why
    if kind == "meta":  # a model built on the meta device never runs a kernel
        return None
    if not impl.verified or (_self_check_mode() == "all" and op_def(op).example is not None):
        return _checked(impl, dtype, device, static)
    return None


def _checked(impl: Impl, dtype: torch.dtype, device: torch.device, static: Mapping) -> str | None:
    from atom.ops.self_check import self_check  # imports the op modules; only needed here

    key = (impl.op, impl.backend, dtype, str(device), _freeze(static))
    if key not in _CHECKED:
        failure = self_check(op_def(impl.op), _IMPLS[impl.op]["torch"], impl, _callable(impl), dtype, device, static)
        if failure is None:
            logger.info("op %s: the %s implementation passed its self-check (%s on %s)", impl.op, impl.backend,
                        dtype, device)
        _CHECKED[key] = None if failure is None else f"its self-check against the torch reference failed: {failure}"
    return _CHECKED[key]


def _freeze(static: Mapping | None) -> tuple:
    return tuple(sorted((static or {}).items()))


def resolve(op: str, backend: str | None = None, *, dtype: torch.dtype | None = None,
            device: torch.device | str | None = None, static: Mapping | None = None) -> Callable:
    """The implementation of `op` for a layer being built.

    backend=None: walk the chain from the requested backend (see the module doc) for a layer of `dtype`
    on `device` (default: the default dtype and device, i.e. the model's while it is being built) with
    build-time properties `static` (e.g. the MoE activation). An explicit backend returns that backend's
    implementation (the torch reference when it has none), without fallback or self-check (tests, benches).
    """
    _import_family(op)
    if backend is not None:
        ok, reason = platform.backend_status(backend)
        if not ok:
            raise RuntimeError(f"kernel backend {backend!r} requested for op {op!r} is not usable here: {reason}")
        _load_backend(backend)
        impls = _IMPLS[op]
        return _callable(impls.get(backend) or impls["torch"])
    requested = backend_for(op)
    dtype = dtype or torch.get_default_dtype()
    device = torch.device(device) if device is not None else _build_device()
    static = dict(static or {})
    key = (op, requested, dtype, str(device), _freeze(static))
    if key in _RESOLVED:
        return _RESOLVED[key]
    chain = BACKEND_ORDER[BACKEND_ORDER.index(requested):]
    chosen = _IMPLS[op]["torch"]  # the end of every chain
    for i, candidate in enumerate(chain[:-1]):
        why = _unusable(op, candidate, dtype, device, static)
        if why is None:
            chosen = _IMPLS[op][candidate]
            break
        logger.warning("op %s: not using the %s implementation (%s); falling back to %s", op, candidate, why,
                       chain[i + 1])
    fn = _callable(chosen)
    if device.type != "meta":  # a model built on the meta device never runs: do not remember its choice
        _RESOLVED[key] = fn
    return fn


def _build_device() -> torch.device:
    """The device of the layer being built: the default device (hosts build models under their device,
    `with torch.device(...)` or torch.set_default_device), or, when nothing set one in a GPU process (a
    host-side op resolved outside any build), the process's accelerator. A CPU build in a GPU process
    (LLM(device="cpu"), load_model(device="cpu"), the CPU variants of the tests) gets CPU kernels."""
    explicit = _explicit_default_device()
    if explicit is not None:
        return explicit
    device = torch.get_default_device()
    if device.type == "cpu" and platform.device_kind() != "cpu":
        return platform.default_device()
    return device


def _explicit_default_device() -> torch.device | None:
    """The device set by an active `with torch.device(...)` or by torch.set_default_device, else None
    (torch.get_default_device() answers "cpu" for both an explicit CPU and no setting at all)."""
    try:
        from torch.overrides import _get_current_function_mode_stack
        from torch.utils._device import DeviceContext
    except ImportError:  # pragma: no cover - a torch without these internals: the heuristic alone
        return None
    if any(isinstance(mode, DeviceContext) for mode in _get_current_function_mode_stack()):
        return torch.get_default_device()
    if getattr(getattr(torch, "_GLOBAL_DEVICE_CONTEXT", None), "device_context", None) is not None:
        return torch.get_default_device()
    return None


@functools.cache
def _compile_aware(impl: Impl) -> Callable:
    """impl.fn in eager mode; under torch.compile, its custom op (which Dynamo records as one node)."""
    from atom.ops.custom_ops import custom_op_for

    fn = impl.fn
    custom = custom_op_for(impl, op_def(impl.op))

    @functools.wraps(fn)
    def call(*args, **kwargs):
        if torch.compiler.is_compiling():
            return custom(*args, **kwargs)
        return fn(*args, **kwargs)

    return call


def _callable(impl: Impl) -> Callable:
    fn = impl.fn if impl.traceable or not op_def(impl.op).custom_op else _compile_aware(impl)
    _IMPL_OF[fn] = impl
    return fn


def impl_of(fn: Callable) -> Impl | None:
    """The Impl behind a callable that `resolve` returned (None for anything else)."""
    try:
        return _IMPL_OF.get(fn)
    except TypeError:  # unhashable
        return None


def resolved_impls(model: torch.nn.Module) -> list[Impl]:
    """The implementations a model's layers resolved: callables held by its modules, or by plain objects
    they hold (quantization methods), in module order, without repeats."""
    seen: dict[tuple[str, str], Impl] = {}

    def scan(values) -> None:
        for value in values:
            if callable(value) and not isinstance(value, (torch.nn.Module, type)):
                impl = impl_of(value)
                if impl is not None:
                    seen.setdefault((impl.op, impl.backend), impl)

    for module in model.modules():
        scan(vars(module).values())
        for value in vars(module).values():
            if not isinstance(value, (torch.nn.Module, torch.Tensor, type)) and hasattr(value, "__dict__"):
                scan(vars(value).values())
    return list(seen.values())


def cuda_graph_blockers(model: torch.nn.Module) -> list[str]:
    """'op (backend)' of every implementation the model uses that cannot be captured in a CUDA graph."""
    return [f"{i.op} ({i.backend})" for i in resolved_impls(model) if not i.cuda_graph]


def available_impls(op: str) -> list[str]:
    _import_family(op)
    for backend in _BACKEND_MODULES:
        if platform.backend_status(backend)[0]:
            _load_backend(backend)
    return sorted(_IMPLS[op])


def implementation(op: str, backend: str) -> Impl | None:
    """The registered Impl (capabilities included) of `op` for `backend`, or None."""
    _import_family(op)
    if platform.backend_status(backend)[0]:
        _load_backend(backend)
    return _IMPLS[op].get(backend)


# op name -> module in atom.ops holding its torch reference
_OP_FAMILY = {
    "rms_norm": "norm",
    "fused_add_rms_norm": "norm",
    "rotary_embedding": "rope",
    "silu_and_mul": "activation",
    "gelu_tanh_and_mul": "activation",
    "moe_topk_softmax": "moe",
    "fused_experts": "moe",
    "fused_experts_swigluoai": "moe_swigluoai",
    "reshape_and_cache": "attention",
    "paged_attention": "attention",
    "sample": "sampling",
    "qk_norm_rope_cache": "qk_norm_rope_cache",
    "fp8_quant_group": "quant_fp8",
    "fp8_quant_token": "quant_fp8",
    "fp8_quantize_weight": "quant_fp8",
    "fp8_linear": "quant_fp8",
    "dense_linear": "dense",
    "fp8_fused_experts": "quant_fp8",
    "rms_norm_quant_fp8": "fp8_producers",
    "fused_add_rms_norm_quant_fp8": "fp8_producers",
    "silu_and_mul_quant_fp8": "fp8_producers",
    "fp8_linear_quantized": "fp8_producers",
    "silu_and_mul_rowmax": "fp8_producers",
    "fp8_linear_rowmax": "fp8_producers",
    "moe_grouped_topk": "moe_routing",
    "moe_router_logits": "moe_routing",
    "moe_gate_logits": "moe_routing",
    "mla_cache_write": "mla",
    "mla_norm_rope_cache": "mla",
    "mla_decode": "mla",
    "mla_prefill": "mla",
}
