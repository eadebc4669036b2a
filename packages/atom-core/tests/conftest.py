"""Shared test plumbing for atom-core.

Random inputs are fresh on every run (DESIGN.md: never fixed, never zeros); each test gets its own seed,
printed on failure so a failing draw can be replayed with ATOM_TEST_SEED=<seed>.
The model-parity tests report their measured errors here, printed once at the end of the session.
"""

from __future__ import annotations

import os
import random

import pytest
import torch

_PARITY_KEY = pytest.StashKey[list]()

# Test tensors are tiny: one intra-op thread is several times faster than OpenMP spinning on a shared
# 2-core CI machine, and results do not depend on it.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def fresh_seed(request) -> int:
    seed = int(os.environ.get("ATOM_TEST_SEED", random.SystemRandom().randrange(2**31)))
    torch.manual_seed(seed)
    random.seed(seed)
    request.node.user_properties.append(("seed", seed))
    return seed


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if report.failed:
        seeds = [v for k, v in item.user_properties if k == "seed"]
        if seeds:
            report.sections.append(("seed", f"replay with ATOM_TEST_SEED={seeds[0]}"))


@pytest.fixture(scope="session")
def parity_report(request) -> list[str]:
    """Lines the parity tests append (one per architecture case); printed in the terminal summary."""
    return request.config.stash.setdefault(_PARITY_KEY, [])


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    lines = config.stash.get(_PARITY_KEY, [])
    if lines:
        terminalreporter.section("ATOM vs transformers logits (max|a-b| / max|b|)")
        for line in sorted(lines):
            terminalreporter.write_line(line)
