"""vLLM out-of-tree plugin: plain `vllm serve` runs ATOM's model implementations.

Entry point (see pyproject.toml): `atom_vllm.plugin:register` (vllm.general_plugins).
"""

__version__ = "0.1.0"
