"""FP8 activations handed straight from their producer (RMSNorm, SiLU-and-mul) to the FP8 linear they feed.

An FP8 linear quantizes its input with a kernel of its own before its GEMM. When the input comes from a norm or
a gated activation whose output goes nowhere else, the producer's kernel can write the FP8 codes and scales
itself (atom.ops.fp8_producers: bit-identical to the float op followed by the quantization kernel) and the
linear skips its quantization kernel.

The model wires each such pair at build time (`producer.feed_fp8_linear(linear)`, decoder.py: input_layernorm
-> qkv_proj, post_attention_layernorm -> a dense MLP's gate_up_proj, the MLP's activation -> down_proj). On
every call the producer asks its link for the layout the linear wants (`Fp8InputFormat`); the answer is None,
and the producer returns its usual float tensor, unless
- fusion is on (ATOM_FP8_FUSED_PRODUCERS, default 1) and the producer's float op runs the Triton kernel
  (so the fused kernel reproduces it exactly),
- the linear is an FP8 linear running the Triton GEMM (`Fp8LinearMethod.fused_input_format`: not the CPU
  torch path, not a float linear),
- fp8_linear would run a quantization kernel for this call's row count (not where its GEMV quantizes the input
  itself: M <= GEMV_MAX_M with 1 x 128 groups; per-token layouts take the producer's codes there too;
  `quant_fp8.gemv_quantizes_input`),
- nothing is being traced by torch.compile (atom-vllm compiles the backbone: the compiled graph keeps the
  float ops, which Inductor may fuse on its own).
Then it returns an `Fp8Activation`, which only `Fp8LinearMethod.apply` accepts. A producer with a `rowmax` form
(SiLU-and-mul; and ATOM's PagedAttention for o_proj) returns an `Fp8RowMaxActivation` instead where the linear's
GEMM quantizes per-token activations itself from the producer's partial row maxima (`takes_rowmax`,
`quant_fp8.gemm_quantizes_rows`: ATOM_FP8_ROWMAX_MAX_M, 32 rows by default). All of these are decided from
build-time facts and the row count, so CUDA-graph capture sees no host sync and no data-dependent branch.

The other direction, GEMM -> consumer (`SplitKPartials`): an FP8 linear whose output feeds a residual RMSNorm
alone (o_proj -> post_attention_layernorm, a dense MLP's down_proj -> the next layer's input_layernorm or the final
norm; `RowParallelLinear.sum_splits_in`, wired in decoder.py) hands over the float32 partials of a GEMM that
splits over K, and the norm's kernel adds them (in split order, rounded to the residual's dtype: bit-identical)
instead of quant_fp8's _split_k_sum_kernel: one kernel fewer per such pair at decode. Likewise qkv_proj ->
ATOM's attention on the decode steps whose prep (qk-norm, rope, KV write) runs inside the attention kernel
(`LinearBase.leave_splits`, decoder.SelfAttention; other steps add the partials with the sum kernel,
`SplitKPartials.summed`), and a dense MLP's gate_up_proj -> its gated activation (decoder.DenseMLP; the FP8
codes form has the sum kernel add them first). On by default (measured on an H100, quant_fp8;
ATOM_FP8_NORM_SUMS_SPLITS=0 / ATOM_FP8_ATTN_SUMS_SPLITS=0 / ATOM_FP8_ACT_SUMS_SPLITS=0 turn them off), no bias
(and one rank for the norms: a row-parallel output is all-reduced), both sides on Triton, and nothing traced by
torch.compile.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import nn

from atom.ops.registry import impl_of, resolve


class Fp8InputFormat(NamedTuple):
    """How an FP8 linear quantizes its input: 1 x group_size groups (None: one scale per token), to fp8_dtype."""

    group_size: int | None
    fp8_dtype: torch.dtype


class Fp8Activation(NamedTuple):
    """Activations already quantized for an FP8 linear: q [M, K] FP8, scale [M, groups] float32, and the float
    dtype the producer would have returned (the linear's output dtype)."""

    q: torch.Tensor
    scale: torch.Tensor
    dtype: torch.dtype


class SplitKPartials(NamedTuple):
    """A linear's output not yet summed: parts [splits, M, N] float32, whose sum over dim 0 in order, rounded to
    out's dtype, is the output; out [M, N] the output tensor, left unwritten (its shape, dtype and strides).
    atom.layers.norm.RMSNorm adds them, ATOM's attention kernel the qkv_proj's (decoder.SelfAttention), and the gated
    activation a dense MLP's gate_up_proj's (atom.layers.activation)."""

    parts: torch.Tensor
    out: torch.Tensor

    def summed(self) -> torch.Tensor:
        """out, written: the partials added by quant_fp8's sum kernel (where the consumer cannot add them)."""
        from atom.ops.triton_kernels import quant_fp8  # partials come from the Triton GEMM: importable

        quant_fp8.add_split_parts(self.parts, self.out)
        return self.out


class Fp8RowMaxActivation(NamedTuple):
    """Float activations x [M, K] for a per-token FP8 linear, with parts [M, P] float32 whose max over P is each
    row's absolute maximum: the linear's GEMM quantizes them itself (atom.ops.fp8_producers, fp8_linear_rowmax)."""

    x: torch.Tensor
    parts: torch.Tensor


def fused_producers_enabled() -> bool:
    raw = os.environ.get("ATOM_FP8_FUSED_PRODUCERS", "1").strip().lower()
    if raw not in ("0", "1", "false", "true", "off", "on", ""):
        raise ValueError(f"ATOM_FP8_FUSED_PRODUCERS must be 0 or 1, got {raw!r}")
    return raw in ("1", "true", "on", "")


class Fp8ConsumerLink:
    """Held by a producer module: the linear its output feeds (a plain reference, not a submodule) and the fused
    producer ops, resolved on the producer's float op's backend."""

    def __init__(self, consumer: nn.Module, fused_ops: tuple[Callable, ...], rowmax_op: Callable | None = None):
        from atom.ops.triton_kernels import quant_fp8  # the producer runs Triton: importable

        self._consumer = (consumer,)  # a tuple: nn.Module would register a module attribute as a child
        self.ops = fused_ops
        self.rowmax_op = rowmax_op
        self._gemm_module = quant_fp8  # its GEMV bounds, read per call (a process may change them)

    def format_for(self, x: torch.Tensor) -> Fp8InputFormat | None:
        """The layout to hand this call's output over in, or None for the float output."""
        if torch.compiler.is_compiling():
            return None
        wants = getattr(self._consumer[0].quant_method, "fused_input_format", None)
        fmt = wants() if wants is not None else None
        if fmt is None:
            return None
        rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
        return None if self._gemm_module.gemv_quantizes_input(rows, fmt.group_size is not None) else fmt

    def takes_rowmax(self, x: torch.Tensor, fmt: Fp8InputFormat) -> bool:
        """Whether this call's output goes over as an Fp8RowMaxActivation (the link has a rowmax op, the layout is
        per token, and the GEMM would quantize these rows itself)."""
        if self.rowmax_op is None or fmt.group_size is not None:
            return False
        rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
        return takes_rowmax(self._consumer[0], rows, x.dtype, fmt)


def takes_rowmax(consumer: nn.Module, rows: int, dtype: torch.dtype, fmt: Fp8InputFormat | None = None) -> bool:
    """Whether `consumer` (a linear) takes an Fp8RowMaxActivation of `rows` rows in `dtype` now: an FP8 linear on
    the Triton GEMM with per-token activation scales whose GEMM quantizes that many rows itself
    (quant_fp8.gemm_quantizes_rows), and nothing traced by torch.compile. fmt: its fused_input_format(), when the
    caller has asked already."""
    method = getattr(consumer, "quant_method", None)
    if getattr(method, "linear_rowmax", None) is None or torch.compiler.is_compiling():
        return False
    fmt = fmt or method.fused_input_format()
    if fmt is None or fmt.group_size is not None:
        return False
    from atom.ops.triton_kernels import quant_fp8  # linear_rowmax is the Triton op: importable

    return quant_fp8.gemm_quantizes_rows(rows, consumer.weight, None, dtype)


def link_fp8_consumer(float_op: Callable, fused_op_names: tuple[str, ...], consumer: nn.Module,
                      rowmax_op_name: str | None = None) -> Fp8ConsumerLink | None:
    """The link a producer keeps to its consumer, or None when fusion cannot apply to this producer (off, or
    its float op is not the Triton kernel the fused kernels reproduce)."""
    impl = impl_of(float_op)
    if not fused_producers_enabled() or impl is None or impl.backend != "triton":
        return None
    return Fp8ConsumerLink(consumer, tuple(resolve(name, "triton") for name in fused_op_names),
                           resolve(rowmax_op_name, "triton") if rowmax_op_name else None)
