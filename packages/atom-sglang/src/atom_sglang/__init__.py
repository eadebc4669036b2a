"""ATOM's models and attention inside unmodified SGLang.

- `atom_sglang.models`: the package to name in SGLANG_EXTERNAL_MODEL_PACKAGE.
- `atom_sglang.plugin:register`: the `sglang.srt.plugins` entry point; registers the "atom" attention backend.
"""

try:
    from atom_core_guard import require_atom_core as _require_atom_core
except ModuleNotFoundError as _e:  # atom-core missing altogether
    raise ImportError("atom-sglang needs atom-core: install it from this repository (./packages/atom-core)") from _e

_require_atom_core("atom-sglang")  # a foreign `atom` package (PyPI's `atom`, old `atom-server`) fails here, clearly

__version__ = "0.1.0"
