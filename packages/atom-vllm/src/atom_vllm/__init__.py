"""vLLM out-of-tree plugin: plain `vllm serve` runs ATOM's model implementations.

Entry points (see pyproject.toml): `atom_vllm.plugin:platform_plugin` and `atom_vllm.plugin:register`.
"""

__version__ = "0.1.0"
