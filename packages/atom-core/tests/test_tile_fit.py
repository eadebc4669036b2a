"""The shared-memory fit of the Triton kernels' tiles (pure arithmetic; the limit is patched per device)."""

from __future__ import annotations

import pytest
import torch

from atom.ops.triton_kernels import common


@pytest.fixture
def limit(monkeypatch):
    def set_limit(nbytes: int) -> None:
        monkeypatch.setattr(common, "shared_memory_limit", lambda device: nbytes)

    return set_limit


def test_full_pipeline_when_it_fits(limit):
    limit(232448)  # Hopper
    assert common.fit_tile(3, 64, lambda k: (320 * k * 2, 0), torch.device("cuda")) == (64, 3)  # bf16 MoE tile


def test_fewer_stages_then_a_smaller_block(limit):
    limit(232448)
    assert common.fit_tile(3, 64, lambda k: (320 * k * 4, 0), torch.device("cuda")) == (64, 2)  # float32
    limit(65536)  # CDNA3 LDS: one stage of 64-wide K is 80 KiB in float32 -> halve K to 32
    assert common.fit_tile(3, 64, lambda k: (320 * k * 4, 0), torch.device("cuda")) == (32, 1)


def test_smallest_block_is_returned_when_nothing_fits(limit):
    limit(32 * 1024)
    assert common.fit_tile(4, 128, lambda n: (1 << 20, 0), torch.device("cuda")) == (16, 1)
