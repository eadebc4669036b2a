"""The offline runs' harness (conftest.OfflineResults; run_offline.py reports a spec whose engine raised as its RESULT
with the error and goes on): one engine that cannot start fails the tests that read its spec and no others; a spec
this machine leaves out skips them with the reason."""

from __future__ import annotations

import pytest
from conftest import OfflineResults, _gpu_skips


def test_results_skip_a_left_out_spec_and_fail_only_a_failed_one():
    results = OfflineResults({"a": {"spec": "a", "tokens": [[1]]}, "b": {"spec": "b", "error": "ValueError: no"}},
                             {"c": "not on this machine"})
    assert results["a"]["tokens"] == [[1]]
    with pytest.raises(pytest.fail.Exception, match="run of b raised: ValueError: no"):
        results["b"]
    with pytest.raises(pytest.skip.Exception, match="not on this machine"):
        results["c"]
    with pytest.raises(pytest.fail.Exception, match="no result for d"):
        results["d"]


def test_gpu_skips_name_the_mla_float32_specs_only(monkeypatch):
    import conftest

    ckpts = {"deepseek_v2": "/c/dsv2", "deepseek_v3": "/c/dsv3", "qwen3": "/c/q"}
    specs = ["/c/dsv2", "/c/dsv3@compile", "/c/dsv2@bf16@kvfp8", "/c/q"]
    monkeypatch.setattr(conftest, "ON_GPU", False)
    assert _gpu_skips(specs, ckpts) == {}
    monkeypatch.setattr(conftest, "ON_GPU", True)
    assert set(_gpu_skips(specs, ckpts)) == {"/c/dsv2", "/c/dsv3@compile"}

