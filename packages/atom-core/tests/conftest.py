"""Shared test plumbing for atom-core.

Random inputs are fresh on every run (DESIGN.md: never fixed, never zeros); each test gets its own seed,
printed on failure so a failing draw can be replayed with ATOM_TEST_SEED=<seed>.
The model-parity tests report their measured errors here, printed once at the end of the session.

Devices and dtypes (issue 21; atom.testing has the details): a test that is meaningful on every device takes
the `device` fixture ("cpu" always, "cuda" too on a GPU machine, marked gpu there) and builds on it, e.g.
`load_model(path, dtype="float32", device=device)` and `PagedHarness(model, device=device)`; CI's CPU run
is unchanged (one "cpu" variant). Every comparison with a reference states its dtype: float32 meets the
same tolerances on CUDA as on CPU (ATOM's Triton kernels are IEEE in float32); bfloat16 uses the bounds
of atom.testing (BF16_REL_ERR and friends). A test that needs a GPU only is marked gpu and skips without
one; one that measures free GPU memory is also marked serial (tools/device/run_gpu_tests.sh runs those
alone, after the parallel pass).
"""

from __future__ import annotations

import os
import random

import pytest
import torch

from atom.testing import devices_under_test, speed_up_triton_interpreter

_PARITY_KEY = pytest.StashKey[list]()

# Test tensors are tiny: one intra-op thread is several times faster than OpenMP spinning on a shared
# 2-core CI machine, and results do not depend on it.
torch.set_num_threads(1)
# Under TRITON_INTERPRET=1 (the triton-interpret lane): no re-patching of triton.language a helper call.
speed_up_triton_interpreter()


@pytest.fixture(scope="module", params=[pytest.param(d, marks=[pytest.mark.gpu] if d != "cpu" else [])
                                        for d in devices_under_test()])
def device(request) -> str:
    """The device under test: "cpu", and "cuda" on a GPU machine."""
    return request.param


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
            # The last one: a test whose data a module-scoped fixture drew under an earlier test's seed
            # records that seed after its own (replaying with it draws the same data).
            report.sections.append(("seed", f"replay with ATOM_TEST_SEED={seeds[-1]}"))


@pytest.fixture
def kernel_env_cleared(monkeypatch):
    """No kernel-choice variable from the caller's environment (backend, overrides, self-check, the Triton
    interpreter) and no cached resolution, before and after the test: the registry tests' starting point."""
    from atom.ops import registry

    for k in ("ATOM_KERNEL_BACKEND", "ATOM_KERNEL_OVERRIDES", "ATOM_KERNEL_SELF_CHECK", "TRITON_INTERPRET"):
        monkeypatch.delenv(k, raising=False)
    registry.forget_resolutions()
    yield
    registry.forget_resolutions()


@pytest.fixture
def planted_backend(monkeypatch):
    """plant(op, fn, **capabilities): register `fn` as `op`'s "aiter" implementation for this test and
    request it (ATOM_KERNEL_OVERRIDES=op=aiter). AITER cannot run here, so the platform is told the aiter
    backend is usable and its real bindings are never imported; everything else (the fallback chain, the
    self-check, the WARNINGs) is the registry's own. Registrations are restored afterwards."""
    from atom import platform
    from atom.ops import registry

    real_status = platform.backend_status
    monkeypatch.setattr(platform, "backend_status",
                        lambda b: (True, "planted by the test") if b == "aiter" else real_status(b))
    monkeypatch.setattr(registry, "_loaded_backends", registry._loaded_backends | {"aiter"})
    replaced: dict[str, object] = {}  # op -> the aiter Impl it had before (None: none)

    def plant(op: str, fn, **capabilities):
        registry._import_family(op)
        replaced.setdefault(op, registry._IMPLS[op].get("aiter"))
        capabilities.setdefault("devices", {"cpu"})  # real aiter bindings run on ROCm only
        registry.register(op, "aiter", **capabilities)(fn)
        monkeypatch.setenv("ATOM_KERNEL_OVERRIDES", ",".join(f"{o}=aiter" for o in replaced))
        return fn

    yield plant
    for op, impl in replaced.items():
        if impl is None:
            registry._IMPLS[op].pop("aiter", None)
        else:
            registry._IMPLS[op]["aiter"] = impl
    registry.forget_resolutions()


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
