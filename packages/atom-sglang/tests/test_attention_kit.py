"""ATOM's "atom" attention backend through SGLang's own attention kit (real pools, SDPA-style reference)."""

from __future__ import annotations

import os

import pytest
import torch

from atom_sglang.plugin import BACKEND_NAME, register

assert register(), "atom-sglang must be active on the sglang installed for these tests"

from sglang.srt.model_executor.forward_batch_info import ForwardMode  # noqa: E402
from sglang.test.kits.attention_unittest.attention_methods import dense_attention as kit  # noqa: E402


class _NoSkip:
    """The kit calls testcase.skipTest when a backend fails to build; for ATOM's backend that is a failure."""

    def skipTest(self, reason: str) -> None:
        pytest.fail(f"atom backend failed to build: {reason}")


def _cases():
    cases = (kit.make_dense_cases(BACKEND_NAME) + kit.make_swa_no_prefix_input_config_cases(BACKEND_NAME)
             + kit.make_swa_prefix_input_config_cases(BACKEND_NAME))
    # The kit has no SWA decode case; ATOM follows the extend-window rule (window + 1 keys), as torch_native does.
    cases += (kit.DenseAttentionCase(name="swa_decode_window_edges", backend=BACKEND_NAME,
                                     forward_mode=ForwardMode.DECODE, num_heads=4, num_kv_heads=2, page_size=1,
                                     prefix_lens=(2, 4, 9), sliding_window_size=4),)
    return cases


@pytest.fixture(autouse=True)
def _atom_swa_rule(monkeypatch):
    monkeypatch.setattr(kit, "_SWA_DECODE_EXTEND_WINDOW", kit._SWA_DECODE_EXTEND_WINDOW | {BACKEND_NAME})


_EXTRA_LAYOUT_CASES = {"mha_extend_ragged_page_boundary", "gqa_decode_page_boundary", "swa_extend_prefix_window_edges"}


def _layout_cases():
    for case in _cases():
        yield pytest.param(case, "shuffled_pages", id=f"{case.name}-shuffled_pages")  # the kit's default layout
        if case.name in _EXTRA_LAYOUT_CASES:
            for layout in ("interleaved_pages", "non_monotonic_extend"):
                yield pytest.param(case, layout, id=f"{case.name}-{layout}")


@pytest.mark.parametrize("case,layout", _layout_cases())
def test_dense_attention_kit(case, layout):
    with torch.no_grad():
        if layout == "shuffled_pages":
            # The kit's own verdict (its tolerances are sized for fp16 on GPUs)...
            kit.run_dense_attention_case(_NoSkip(), case, dtype=torch.float32, device="cpu", loc_layout=layout)
        # ...and a float32-tight one on the kit's fixture and reference.
        fixture = kit.build_dense_attention_fixture(_NoSkip(), case, dtype=torch.float32, device="cpu",
                                                    loc_layout=layout)
        assert type(fixture.backend).__name__ == "AtomAttnBackend"
        backend = os.environ.get("ATOM_KERNEL_BACKEND", "auto")
        if backend in ("torch", "triton"):  # the kernel the backend computes with follows ATOM_KERNEL_BACKEND
            assert fixture.backend._attend.__module__ == {"torch": "atom.ops.attention",
                                                          "triton": "atom.ops.triton_kernels.attention"}[backend]
        actual = kit.run_dense_fixture_eager(fixture)
        expected = kit.expected_dense_fixture_output(fixture)
    torch.testing.assert_close(actual, expected, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("name", ["gqa_decode_page_boundary", "mha_decode_bsz1_nonzero_prefix"])
def test_decode_through_cuda_graph_buffers(name):
    """With graph state allocated, decode metadata lives in static full-context buffers (what a captured
    graph replays); the capture itself needs a GPU, the metadata path is checked here."""
    case = next(c for c in _cases() if c.name == name)
    with torch.no_grad():
        fixture = kit.build_dense_attention_fixture(_NoSkip(), case, dtype=torch.float32, device="cpu")
        fixture.backend.init_cuda_graph_state(max_bs=4, max_num_tokens=4)
        actual = kit.run_dense_fixture_eager(fixture)
        md = fixture.backend.forward_metadata
        assert md.max_seq_len == fixture.backend.max_context_len  # the static-buffer path was taken
        expected = kit.expected_dense_fixture_output(fixture)
    torch.testing.assert_close(actual, expected, atol=2e-5, rtol=1e-5)


def test_prefill_graph_capture_dummy_batch_longer_than_context():
    """SGLang 0.5.15+ captures prefill CUDA graphs on a dummy batch: one sequence of `num_tokens` new tokens
    (up to --cuda-graph-max-bs-prefill, 4096 by default) plus zero-length sentinel requests, whatever the
    model's context length. Its req_to_token rows are narrower than that sequence; the backend must still
    run it (on the GPU the kernel read past the table: an illegal memory access in the first capture)."""
    import copy

    case = next(c for c in _cases() if c.forward_mode == ForwardMode.EXTEND)
    with torch.no_grad():
        fixture = kit.build_dense_attention_fixture(_NoSkip(), case, dtype=torch.float32, device="cpu")
        backend = fixture.backend
        width = backend.req_to_token_pool.req_to_token.shape[1]
        n, slots = width + 37, 3  # what capture_prepare builds: lens [n, 0, 0], starts [0, n, n]
        batch = copy.copy(fixture.forward_batch)
        batch.batch_size = slots
        batch.req_pool_indices = torch.arange(slots)
        batch.seq_lens = torch.tensor([n, 0, 0])
        batch.seq_lens_cpu = batch.seq_lens.clone()
        batch.extend_seq_lens = batch.seq_lens.clone()
        batch.extend_seq_lens_cpu = batch.seq_lens.clone()
        batch.extend_prefix_lens = torch.zeros(slots, dtype=torch.int64)
        batch.extend_prefix_lens_cpu = batch.extend_prefix_lens.clone()
        batch.extend_start_loc = torch.tensor([0, n, n])
        batch.extend_num_tokens = n
        batch.seq_lens_sum = n
        batch.out_cache_loc = torch.zeros(n, dtype=torch.int64)  # the capture buffers' padding slot
        layer = fixture.actual_module.attn
        q = torch.randn(n, layer.tp_q_head_num * layer.qk_head_dim)
        k = torch.randn(n, layer.tp_k_head_num, layer.qk_head_dim)
        v = torch.randn(n, layer.tp_v_head_num, layer.v_head_dim)
        backend.init_forward_metadata(batch)
        assert backend.forward_metadata.block_tables.shape[1] >= n
        out = backend.forward_extend(q, k, v, layer, batch)
    assert out.shape == (n, layer.tp_q_head_num * layer.v_head_dim)
    assert torch.isfinite(out).all()
