"""Devices and dtypes under test in atom-server's suite (issue 21; the bounds are in atom.testing).

- `device`: "cpu" always, "cuda" too on a GPU machine (that variant is marked gpu). A test meaningful on
  both takes it and builds its engine on it: `LLM(ckpt, dtype="float32", device=device, ...)`. On a CPU-only
  machine (CI) each such test runs once, as before.
- `precision`: a (device, dtype) pair, for a parity test that also has a bfloat16 bound: cpu/float32
  always; cuda/float32 and cuda/bfloat16 on a GPU machine (bf16 never on CPU: CI runs no extra variant).
  `LLM(ckpt, dtype=precision.dtype, device=precision.device, ...)`; KV byte budgets scale with
  precision.itemsize.
- Every comparison with a reference states the dtype. Against transformers in float32 the engine runs
  float32 (dtype="auto" would give bfloat16 on a GPU) and meets the CPU tolerances on CUDA too (IEEE
  float32 kernels, CUDA graphs and async scheduling on, as users get them); bfloat16 is checked with
  atom.testing.assert_bf16_greedy_close / bf16_margin (near-tie aware).
- `atom serve` subprocesses (server_harness.ServerProcess) run --dtype float32 unless the test passes its
  own --dtype, on the server's own device choice (CUDA with its graphs on a GPU machine).
- A test that sizes the KV cache from free GPU memory and checks the result is marked `serial`:
  tools/device/run_gpu_tests.sh runs those alone, after the parallel (xdist) pass.
- CPU engines run their decode steps eagerly here (ATOM_CPU_COMPILE=0, inherited by `atom serve`
  subprocesses): compiling the decode step costs tens of seconds per model shape on the CI machine.
  test_cpu_compile.py turns it on and checks the compiled steps against the eager ones and transformers.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import pytest
import torch

from atom.testing import devices_under_test

os.environ.setdefault("ATOM_CPU_COMPILE", "0")


@dataclass(frozen=True)
class Precision:
    device: str
    dtype: str  # "float32" or "bfloat16"

    @property
    def itemsize(self) -> int:
        return getattr(torch, self.dtype).itemsize

    def __str__(self) -> str:
        return f"{self.device}-{self.dtype}"


def _param(value, device: str):
    return pytest.param(value, id=str(value), marks=[pytest.mark.gpu] if device != "cpu" else [])


PRECISIONS = [Precision(d, dt) for d in devices_under_test() for dt in ("float32", "bfloat16")
              if d != "cpu" or dt == "float32"]


@pytest.fixture(scope="module", params=[_param(d, d) for d in devices_under_test()])
def device(request) -> str:
    """The device under test: "cpu", and "cuda" on a GPU machine."""
    return request.param


@pytest.fixture(scope="module", params=[_param(p, p.device) for p in PRECISIONS])
def precision(request) -> Precision:
    """(device, dtype) of a parity test: cpu/float32, and cuda/float32 + cuda/bfloat16 on a GPU machine."""
    return request.param
