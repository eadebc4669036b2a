"""L2 prefetch of the next linear's weights inside captured decode graphs (ATOM_L2_PREFETCH_MB; off by default,
an experiment for issue 16 target 2 until it is measured on a GPU).

At batch 1 a small model's decode step is a chain of short kernels, and the weight GEMMs, which hold most of the
bytes, read them from HBM at a fraction of its rate (qwen3-0.6b: 5-10 us for 4-13 MB, ~1.3-1.6 TB/s, DECODE_NOTES),
while HBM idles during the attention, norm and rope kernels between them. Here, when a linear layer runs inside a
graph capture, a side stream first asks L2 for the next linear's weights (Hopper's bulk prefetch: a kernel of a
few programs that returns at once, `atom.ops.triton_kernels.pdl.prefetch_to_l2`), so that HBM streams them while
the kernels in between run and the next GEMM reads L2. A weight is prefetched up to the cap (MB); the next linear
is the one that ran after this one in the warm-up forward that precedes every capture (call order, not module
order). The side stream joins the capture's stream after the model's forward. Prefetches change no value: the
captured graphs compute exactly what they compute without them.

Only while DecodeGraphs captures (hooks are installed for the capture and removed after it), only on CUDA with
a Triton that has the bulk-prefetch instruction (sm_90+), and not under tensor parallelism (the capture is
thread-local there, a side stream's fork is not worth the risk untested).
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from atom.envs import env_int
from atom.layers.linear import LinearBase

logger = logging.getLogger(__name__)

# the most bytes (MB) prefetched of one linear's weights; 0 = off. A weight larger than L2 (50 MB on an H200)
# gains nothing from a whole-tensor prefetch; its first MB can still arrive early.
PREFETCH_MB = env_int("ATOM_L2_PREFETCH_MB", 0, 1024, "MB")


def available(device: torch.device) -> bool:
    if PREFETCH_MB == 0 or device.type != "cuda" or not torch.cuda.is_available():
        return False
    return torch.cuda.get_device_capability(device)[0] >= 9


def _capturing() -> bool:
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


class L2Prefetch:
    """Forward pre-hooks on every LinearBase of `model` and a forward hook on the model, for one capture phase:
    `with L2Prefetch(model, device, max_bytes): ...capture...`. The first forward outside a capture records the
    call order; inside a capture each linear forks the side stream, which prefetches the next linear's tensors."""

    def __init__(self, model: nn.Module, device: torch.device, max_bytes: int):
        self.model = model
        self.max_bytes = max_bytes
        self.device = device
        self.side: torch.cuda.Stream | None = None  # made at the first fork (a capture: CUDA)
        self.order: list[nn.Module] = []
        self.seen: set[int] = set()
        self.next_of: dict[int, list[torch.Tensor]] | None = None
        self.forked = False
        self.launches = 0
        self.handles: list = []

    @staticmethod
    def tensors(module: nn.Module) -> list[torch.Tensor]:
        """A linear's own weights (its parameters and buffers: scales, packed forms), CUDA only."""
        own = [*module.parameters(recurse=False), *module.buffers(recurse=False)]
        return [t for t in own if t is not None and t.is_cuda and t.numel()]

    def _pre(self, module: nn.Module, args) -> None:
        if not _capturing():
            if self.next_of is None and id(module) not in self.seen:
                self.seen.add(id(module))
                self.order.append(module)
            return
        if self.next_of is None:
            self.next_of = {id(a): self.tensors(b) for a, b in zip(self.order, self.order[1:])}
        targets = self.next_of.get(id(module))
        if not targets:
            return
        from atom.ops.triton_kernels.pdl import prefetch_to_l2

        main = torch.cuda.current_stream()
        if self.side is None:
            self.side = torch.cuda.Stream(self.device)
        self.side.wait_stream(main)  # the prefetch starts when this linear does
        with torch.cuda.stream(self.side):
            left = self.max_bytes
            for t in targets:
                if left <= 0:
                    break
                asked = prefetch_to_l2(t, left)
                left -= asked
                self.launches += bool(asked)
        self.forked = True

    def _post(self, module: nn.Module, args, output) -> None:
        if self.forked and _capturing():
            torch.cuda.current_stream().wait_stream(self.side)  # a capture must join every stream it forked
            self.forked = False

    def __enter__(self) -> L2Prefetch:
        warmed = False
        for m in self.model.modules():
            if isinstance(m, LinearBase):
                self.handles.append(m.register_forward_pre_hook(self._pre))
                if not warmed and self.tensors(m):  # JIT-compile and load the prefetch kernel outside any capture
                    from atom.ops.triton_kernels.pdl import prefetch_to_l2

                    warmed = bool(prefetch_to_l2(self.tensors(m)[0], 1 << 16))
        self.handles.append(self.model.register_forward_hook(self._post))
        return self

    def __exit__(self, *exc) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()
        if self.next_of is not None:
            logger.info("L2 prefetch: %d linears in call order, %d prefetch launches captured (up to %d MB each)",
                        len(self.order), self.launches, self.max_bytes >> 20)
