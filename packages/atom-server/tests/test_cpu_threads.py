"""The CPU engine's threads, chosen as vLLM's CPU backend chooses them: physical cores minus one for the
API server, one thread per core, pinned; --cpu-threads / OMP_NUM_THREADS override. The plan is checked on
given topologies (a sysfs tree written here), and on a real `atom serve`: the engine process's CPU
affinity, read back from /proc, is the planned one."""

from __future__ import annotations

import os
import sys

import pytest

from atom_server.cpu_threads import one_cpu_per_core, plan
from server_harness import ServerProcess, write_chat_checkpoint


def write_topology(root, cores_of_cpu: dict[int, tuple[int, int]]) -> str:
    """A /sys/devices/system/cpu lookalike: cpuN/topology/{physical_package_id,core_id}."""
    for cpu, (package, core) in cores_of_cpu.items():
        topo = root / f"cpu{cpu}" / "topology"
        topo.mkdir(parents=True)
        (topo / "physical_package_id").write_text(f"{package}\n")
        (topo / "core_id").write_text(f"{core}\n")
    return os.fspath(root)


def test_one_cpu_per_physical_core(tmp_path):
    # 4 cores with 2 hardware threads each (siblings n and n+4), as Linux numbers them on x86.
    sysfs = write_topology(tmp_path, {cpu: (0, cpu % 4) for cpu in range(8)})
    assert one_cpu_per_core(list(range(8)), sysfs) == [0, 1, 2, 3]
    assert one_cpu_per_core([2, 5, 6], sysfs) == [2, 5]  # cpu 6 is cpu 2's sibling
    two_sockets = write_topology(tmp_path / "b", {0: (0, 0), 1: (1, 0)})  # same core id, other package
    assert one_cpu_per_core([0, 1], two_sockets) == [0, 1]
    assert one_cpu_per_core([0, 1, 2], os.fspath(tmp_path / "missing")) == [0, 1, 2]


def test_plan_reserves_a_core_for_the_api_server():
    p = plan(environ={}, cpus=list(range(8)), cores=[0, 1, 2, 3])
    assert (p.threads, p.cpus) == (3, (0, 1, 2))  # the last core stays free (as vLLM)
    assert "1 left to the API server" in p.describe() and "pinned to CPUs 0-2" in p.describe()
    single = plan(environ={}, cpus=[0], cores=[0])
    assert (single.threads, single.cpus) == (1, (0,))  # nothing to spare on one core


def test_plan_overrides():
    assert plan(environ={"OMP_NUM_THREADS": "2"}, cpus=[0, 1, 2, 3], cores=[0, 1, 2, 3]).cpus == (0, 1)
    flag = plan(3, environ={"OMP_NUM_THREADS": "2"}, cpus=[0, 1, 2, 3], cores=[0, 1, 2, 3])
    assert (flag.threads, flag.cpus) == (3, (0, 1, 2))  # the flag wins over the environment
    more = plan(8, environ={}, cpus=[0, 1, 2, 3], cores=[0, 1, 2, 3])
    assert (more.threads, more.cpus) == (8, None)  # more threads than cores: not pinned
    unpinned = plan(environ={"ATOM_CPU_NO_PIN": "1"}, cpus=[0, 1, 2, 3], cores=[0, 1, 2, 3])
    assert (unpinned.threads, unpinned.cpus) == (3, None)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="CPU affinity is read from /proc")
def test_serving_engine_is_pinned_as_planned(tmp_path):
    ckpt = write_chat_checkpoint(tmp_path / "ckpt")
    expected = plan(1).cpus  # the first physical core this process may use
    srv = ServerProcess([ckpt, "--cpu-threads", "1", "--device", "cpu"], tmp_path / "server.log")
    try:
        srv.wait_healthy()
        assert os.sched_getaffinity(srv.engine_pid()) == set(expected)
        assert f"CPU engine: 1 torch thread, pinned to CPUs {expected[0]} (--cpu-threads=1)" in srv.log()
        assert os.sched_getaffinity(srv.proc.pid) == os.sched_getaffinity(0)  # the API server is not pinned
    finally:
        assert srv.stop() == 0
