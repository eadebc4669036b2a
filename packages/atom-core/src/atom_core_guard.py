"""Is the `atom` that Python imports ATOM's own (atom-core)?

Two unrelated projects on the public index ship a top-level `atom` package too: `atom` (nucleic's
memory-efficient objects, e.g. 0.13.0) and `atom-server` 0.0.x (a 2022 demo web framework; ATOM's
`atom-server` is not on the public index). Installed next to atom-core they overwrite or shadow its
files, and the failure would otherwise surface as a puzzling AttributeError deep in a model build.

This module lives outside the `atom` package on purpose: when `atom` is someone else's, nothing under
it is reachable, and this is the one place that can still say so. atom-core's `atom/__init__.py` runs
`check_installed()` (metadata); atom-server, atom-vllm and atom-sglang run `require_atom_core()` when
they are imported.
"""

from __future__ import annotations

import importlib.metadata

MARKER = "__atom_core__"  # set to True by atom-core's atom/__init__.py
# Distributions on the public index known to install files under atom/ (ATOM's own never do).
KNOWN_CLAIMANTS = ("atom", "atom-server")


class ForeignAtomError(ImportError):
    """The `atom` import name belongs to another installed project."""


def foreign_distributions() -> list[str]:
    """'name version' of each installed distribution other than atom-core that ships files under atom/.

    Only the known claimants are looked up (a scan of every installed distribution takes ~0.2 s, too
    slow for every import); an unknown one still trips require_atom_core() in the host packages."""
    found = []
    for name in KNOWN_CLAIMANTS:
        try:
            dist = importlib.metadata.distribution(name)
        except importlib.metadata.PackageNotFoundError:
            continue
        if any(str(f).replace("\\", "/").startswith("atom/") for f in (dist.files or ())):
            found.append(f"{dist.metadata['Name']} {dist.version}")
    return found


def _fix(found: list[str]) -> str:
    names = " ".join(f.split()[0] for f in found) or "<the package that owns it>"
    return (f"Fix: `pip uninstall {names}`, then `pip install --force-reinstall --no-deps atom-core` "
            "(from this repository: ./packages/atom-core), or use a separate virtual environment. "
            "Note that `pip install atom-server` from the public index installs an unrelated 2022 package: "
            "install ATOM's wheels from this repository.")


def check_installed() -> None:
    """atom-core's own metadata check: no other installed distribution claims the `atom` package."""
    found = foreign_distributions()
    if found:
        raise ForeignAtomError(
            f"the import name `atom` belongs to atom-core (ATOM), but {', '.join(found)} is installed in "
            "the same environment and ships its own `atom` package; the two overwrite each other's files. "
            + _fix(found))


def require_atom_core(host: str) -> None:
    """Raise ForeignAtomError when `import atom` does not give atom-core (a host package calls this)."""
    try:
        import atom
    except ForeignAtomError:
        raise
    except ImportError as e:
        raise ImportError(f"{host} needs atom-core (`import atom` failed: {e}); install ATOM's atom-core "
                          "from this repository (./packages/atom-core)") from e
    if getattr(atom, MARKER, False) is True:
        return
    where = getattr(atom, "__file__", None) or ", ".join(getattr(atom, "__path__", [])) or "?"
    found = foreign_distributions()
    owner = f" (installed by {', '.join(found)})" if found else ""
    raise ForeignAtomError(
        f"{host} needs ATOM's `atom` package (atom-core), but `import atom` found another project's "
        f"package at {where}{owner}. " + _fix(found))
