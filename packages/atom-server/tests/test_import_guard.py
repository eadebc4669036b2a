"""A foreign `atom` package (PyPI's `atom` 0.13.0, or the unrelated 2022 `atom-server` 0.0.x, both ship
a top-level `atom`) is reported by name with the fix, by every ATOM host and by atom-core itself,
instead of failing later in some attribute lookup. The foreign projects are planted as real
site-directories (package files plus dist-info metadata) in a subprocess's path."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", ".."))
SGLANG_SRC = os.path.join(REPO, "packages", "atom-sglang", "src")


def plant(site, name: str, version: str, files: dict[str, str]) -> str:
    """A minimal installed distribution: its files and a dist-info whose RECORD lists them."""
    site = os.fspath(site)
    for rel, text in files.items():
        os.makedirs(os.path.join(site, os.path.dirname(rel)), exist_ok=True)
        with open(os.path.join(site, rel), "w") as f:
            f.write(text)
    info = os.path.join(site, f"{name.replace('-', '_')}-{version}.dist-info")
    os.makedirs(info, exist_ok=True)
    with open(os.path.join(info, "METADATA"), "w") as f:
        f.write(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
    with open(os.path.join(info, "RECORD"), "w") as f:
        f.write("".join(f"{rel},,\n" for rel in files))
    return site


def run_import(module: str, first_on_path: str | None = None, last_on_path: str | None = None
               ) -> subprocess.CompletedProcess:
    """Import `module` in a fresh interpreter with first_on_path ahead of everything (it shadows) or
    last_on_path after everything, site-packages included (it cannot shadow, its metadata is still found)."""
    path = os.pathsep.join([*filter(None, [first_on_path]),
                            *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep)), SGLANG_SRC])
    code = f"import sys; sys.path.append({last_on_path!r}); import {module}" if last_on_path else f"import {module}"
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120, env={**os.environ, "PYTHONPATH": path})


@pytest.mark.parametrize("module,host", [("atom_server", "atom-server"), ("atom_vllm", "atom-vllm"),
                                         ("atom_sglang", "atom-sglang")])
def test_hosts_name_a_shadowing_atom_package(tmp_path, module, host):
    site = plant(tmp_path, "atom", "0.13.0", {"atom/__init__.py": '"""Memory efficient Python objects."""\n',
                                              "atom/catom.py": ""})
    out = run_import(module, site)
    assert out.returncode != 0
    err = out.stderr
    assert "ForeignAtomError" in err, err
    assert f"{host} needs ATOM's `atom` package" in err
    assert os.path.join(site, "atom") in err  # where the foreign package sits
    assert "atom 0.13.0" in err and "pip uninstall atom" in err  # who installed it, and the fix


def test_old_pypi_atom_server_is_named(tmp_path):
    site = plant(tmp_path, "atom-server", "0.0.3", {"atom/__init__.py": "", "atom/cli.py": "",
                                                    "atom/core/__init__.py": ""})
    err = run_import("atom_vllm", site).stderr
    assert "ForeignAtomError" in err and "atom-server 0.0.3" in err and "pip uninstall atom-server" in err
    assert "installs an unrelated 2022 package" in err


def test_atom_core_refuses_a_co_installed_claimant(tmp_path):
    """atom-core's own __init__ ran (its files won), but metadata says another project shares them. The
    claimant's files exist where its RECORD says (Python >= 3.12 drops RECORD entries missing on disk from
    Distribution.files: an empty claimant passed unnoticed on the GPU machine's 3.12); its site comes after
    ATOM's sources on the path, so ATOM's atom is the one imported."""
    site = plant(tmp_path, "atom", "0.13.0", {"atom/__init__.py": "", "atom/catom.py": ""})
    out = run_import("atom", last_on_path=site)
    assert out.returncode != 0
    assert "ForeignAtomError" in out.stderr and "atom 0.13.0 is installed in the same environment" in out.stderr


def test_clean_environment_imports(tmp_path):
    # An unrelated distribution named like a claimant but without atom/ files is no claimant.
    site = plant(tmp_path, "atom", "9.9", {"not_atom/__init__.py": ""})
    out = run_import("atom_server, atom_vllm, atom_sglang, atom.models", site)
    assert out.returncode == 0, out.stderr
