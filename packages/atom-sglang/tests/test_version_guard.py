"""The supported SGLang range, and what the plugin does outside it."""

from __future__ import annotations

import logging

import pytest
from packaging.version import Version

from atom_sglang import plugin
from atom_sglang.version import MAX_SGLANG, MIN_SGLANG, sglang_version, support_status


@pytest.mark.parametrize("version,ok", [
    ("0.5.13", False), ("0.5.14", True), ("0.5.15", True), ("0.5.23", True), ("0.5.23.post1", True),
    ("0.5.24", False), ("0.6.0", False), ("0.5.20rc1", True),
])
def test_support_status(version, ok):
    supported, reason = support_status(Version(version))
    assert supported is ok
    if not ok:
        assert f"{MIN_SGLANG}..{MAX_SGLANG}" in reason and version in reason


def test_installed_sglang_is_supported_and_backend_registered():
    assert support_status()[0], support_status()[1]
    assert sglang_version() is not None
    assert plugin.register() is True and plugin.register() is True  # idempotent
    from sglang.srt.layers.attention.attention_registry import ATTENTION_BACKENDS
    from sglang.srt.server_args import add_attention_backend_choices

    assert plugin.BACKEND_NAME in ATTENTION_BACKENDS
    assert add_attention_backend_choices.__self__.count(plugin.BACKEND_NAME) == 1


def test_plugin_stays_off_outside_the_range(caplog):
    with caplog.at_level(logging.WARNING, logger="atom_sglang.plugin"):
        assert plugin.register(Version("0.6.0")) is False
    assert "atom-sglang disabled" in caplog.text and "0.6.0" in caplog.text


def test_entry_point_is_declared():
    from importlib.metadata import entry_points

    eps = [ep for ep in entry_points(group="sglang.srt.plugins") if ep.name == "atom"]
    assert len(eps) == 1 and eps[0].value == "atom_sglang.plugin:register"
    assert eps[0].load() is plugin.register
