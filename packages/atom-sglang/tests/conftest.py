"""Devices and dtypes (issue 21, atom.testing): these tests state theirs explicitly, SGLang on CPU in float32
(`--device cpu --dtype float32`, the harness's ServerArgs) against transformers in float32, so they run the
same on a GPU machine; SGLang on the GPU is checked by tools/device/sglang_gpu.py. A new test meaningful on
both devices takes its device from atom.testing.devices_under_test() and a bf16 run uses atom.testing's
bounds."""

from __future__ import annotations

import os

# Set before sglang is imported anywhere: SGLang's model registry reads it at import time.
os.environ.setdefault("SGLANG_EXTERNAL_MODEL_PACKAGE", "atom_sglang.models")
from atom.testing import speed_up_triton_interpreter  # noqa: E402

speed_up_triton_interpreter()  # the interpreter cases' own pytest process (TRITON_INTERPRET=1) only
