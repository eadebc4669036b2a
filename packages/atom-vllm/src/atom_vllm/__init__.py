"""vLLM out-of-tree plugin: plain `vllm serve` runs ATOM's model implementations.

Entry point (see pyproject.toml): `atom_vllm.plugin:register` (vllm.general_plugins).
"""

try:
    from atom_core_guard import require_atom_core as _require_atom_core
except ModuleNotFoundError as _e:  # atom-core missing altogether
    raise ImportError("atom-vllm needs atom-core: install it from this repository (./packages/atom-core)") from _e

_require_atom_core("atom-vllm")  # a foreign `atom` package (PyPI's `atom`, old `atom-server`) fails here, clearly

__version__ = "0.1.0"
