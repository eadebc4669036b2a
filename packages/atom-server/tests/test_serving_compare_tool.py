"""tools/cpu_serving_compare.py (the serving comparison behind tools/device/serve_vs_vllm.sh) must never leave a
server running: its device call is cut by a budget (SIGINT), and in stop 39 a vLLM server whose start was cut kept
85% of the GPU's memory and failed the next call's tests. Here a real `atom serve` is started through the tool and
interrupted while the tool waits for it to become ready."""

from __future__ import annotations

import _thread
import argparse
import importlib.util
import os
import pathlib
import threading
import time

import pytest

from tiny_checkpoint import write_tiny_llama

TOOL = pathlib.Path(__file__).resolve().parents[3] / "tools" / "cpu_serving_compare.py"


def _tool():
    spec = importlib.util.spec_from_file_location("cpu_serving_compare", TOOL)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _group_alive(pgid: int, settle_s: float = 5.0) -> bool:
    """Whether a live (not zombie) process of the group remains after `settle_s`. SIGKILL lands asynchronously
    and a killed child is re-parented to PID 1, which in some containers (the GPU machine's) never reaps it: a
    zombie holds no memory and no port, so it does not count."""
    deadline = time.monotonic() + settle_s
    while True:
        live = []
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                with open(f"/proc/{entry}/stat") as f:
                    stat = f.read()
            except OSError:
                continue
            fields = stat[stat.rindex(")") + 2:].split()  # state, ppid, pgrp, ...
            if int(fields[2]) == pgid and fields[0] not in ("Z", "X"):
                live.append(int(entry))
        if not live or time.monotonic() > deadline:
            return bool(live)
        time.sleep(0.1)


def test_a_start_cut_while_waiting_stops_the_server(tmp_path, monkeypatch):
    tool = _tool()
    ckpt = write_tiny_llama(str(tmp_path / "ckpt"))
    ns = argparse.Namespace(model=ckpt, max_model_len=64, dtype="float32", concurrency=[1], atom_extra="",
                            start_timeout=120)
    started = []
    popen = tool.subprocess.Popen

    def recording_popen(*args, **kwargs):  # the real Popen; the test only keeps the handle to check the group
        proc = popen(*args, **kwargs)
        started.append(proc)
        return proc

    monkeypatch.setattr(tool.subprocess, "Popen", recording_popen)
    # the budget's SIGINT, delivered while the tool polls /health (atom serve takes seconds to import torch)
    timer = threading.Timer(1.0, _thread.interrupt_main)
    timer.start()
    try:
        with pytest.raises(KeyboardInterrupt):
            tool.start("atom", ns, str(tmp_path / "atom.log"))
    finally:
        timer.cancel()
    assert len(started) == 1
    proc = started[0]
    assert proc.poll() is not None, "the server outlived its cut start"
    assert not _group_alive(proc.pid), "a process of the server's group outlived its cut start"


def test_a_server_that_exits_during_start_is_reported(tmp_path):
    tool = _tool()
    ns = argparse.Namespace(model=str(tmp_path / "no-such-model"), max_model_len=64, dtype="float32",
                            concurrency=[1], atom_extra="", start_timeout=120)
    with pytest.raises(RuntimeError, match="atom exited with"):
        tool.start("atom", ns, str(tmp_path / "atom.log"))
