"""The "atom" backend on ATOM's Triton kernel (Triton's interpreter on CPU) through SGLang's attention kit.

A separate process: TRITON_INTERPRET must be set before triton is first imported, and sglang imports it.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")


def test_kit_cases_on_triton_kernel():
    env = {**os.environ, "TRITON_INTERPRET": "1", "ATOM_KERNEL_BACKEND": "triton"}
    selection = "shuffled_pages and (gqa_decode or ragged or swa_extend_prefix or mqa or swa_decode)"
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                           str(Path(__file__).with_name("test_attention_kit.py")), "-k", selection],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert "5 passed" in proc.stdout, proc.stdout[-2000:]
