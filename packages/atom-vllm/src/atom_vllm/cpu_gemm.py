"""vLLM's own CPU GEMMs for ATOM's unquantized linears (the host packer of atom.ops.cpu_linear).

On CPU, ATOM packs each 16-bit weight once and runs it through torch's oneDNN op (`_linear_pointwise`), which
sets its oneDNN primitive up again on every call. vLLM's CPU build has faster GEMMs for the same weights:
`dispatch_cpu_unquantized_gemm` gives each linear a oneDNN matmul handle that caches its primitives
(`onednn_mm`), or SGL's AMX / AVX-512 kernel for small weights (`weight_packed_linear`), or zentorch on AMD
Zen. Measured on a 2-core Xeon with AMX (SmolLM2-135M shapes, one thread, 1 and 32 rows): 7-35 us less per
GEMM than torch's op; vLLM+ATOM went from 0.94x / 0.95x to 1.05x / 1.04x of vLLM's built-in model
(BENCHMARKS.md). Under vLLM on CPU, atom-vllm hands that dispatch to atom-core, so ATOM's linears and LM head
run the very GEMMs vLLM's built-in models run; ATOM_VLLM_CPU_GEMM=0 keeps torch's oneDNN op.

The dispatch's kernels want the bias in different dtypes (SGL's: float32; oneDNN's: the activation dtype),
found once per weight when it is packed. After loading, each unquantized linear gets its GEMM attached
(atom.ops.cpu_linear.attach), so vLLM's torch.compile traces vLLM's own GEMM ops inside ATOM's layers, as in
vLLM's models, instead of calling ATOM's opaque packed-linear op, whose Python body costs ~10-20 us a call.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable

import torch
from torch import nn

logger = logging.getLogger("vllm.atom_vllm")


def _vllm_dispatch() -> Callable[..., None] | None:
    try:
        from vllm.model_executor.layers.utils import dispatch_cpu_unquantized_gemm
    except ImportError:
        return None
    return dispatch_cpu_unquantized_gemm


def vllm_packer(weight: torch.Tensor) -> Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor]:
    """fn(x, bias) = x @ weight^T + bias through the GEMM vLLM's CPU dispatch picks for `weight`; traceable by
    Dynamo as vLLM's own linears are (the bias dtype the kernel takes is found here, by one probe)."""
    holder = nn.Module()
    holder.weight = nn.Parameter(weight, requires_grad=False)
    _vllm_dispatch()(holder, remove_weight=False)
    gemm = holder.cpu_linear
    probe = weight.new_zeros(1, weight.shape[1])
    try:
        gemm(probe, weight, weight.new_zeros(weight.shape[0]))
        bias_dtype = weight.dtype
    except RuntimeError:  # "expected scalar type Float": SGL's kernel takes a float32 bias
        bias_dtype = torch.float32

    def run(x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if bias is not None and bias.dtype != bias_dtype:
            bias = bias.to(bias_dtype)
        return gemm(x, weight, bias)

    return run


def active() -> bool:
    from atom.ops import cpu_linear

    return cpu_linear.host_packer_name() == "vllm"


def install() -> bool:
    """Hand vLLM's CPU GEMM dispatch to atom-core (on a CPU platform, unless ATOM_VLLM_CPU_GEMM=0)."""
    from atom.ops import cpu_linear

    if os.environ.get("ATOM_VLLM_CPU_GEMM", "1").strip().lower() in ("0", "false", "no", "off"):
        cpu_linear.set_host_packer(None)
        return False
    if _vllm_dispatch() is None:
        logger.info("ATOM: this vLLM has no dispatch_cpu_unquantized_gemm; ATOM's linears keep torch's oneDNN op")
        return False
    if cpu_linear.host_packer_name() != "vllm":
        cpu_linear.set_host_packer(vllm_packer, "vllm")
        logger.info("ATOM: unquantized linears on CPU run vLLM's CPU GEMM dispatch (ATOM_VLLM_CPU_GEMM=0: torch's "
                    "oneDNN op)")
    return True
