"""ATOM's own inference engine and OpenAI-compatible server."""

try:
    from atom_core_guard import require_atom_core as _require_atom_core
except ModuleNotFoundError as _e:  # atom-core missing altogether
    raise ImportError("atom-server needs atom-core: install it from this repository (./packages/atom-core)") from _e

_require_atom_core("atom-server")  # a foreign `atom` package (PyPI's `atom`, old `atom-server`) fails here, clearly

__version__ = "0.1.0"

from atom_server.config import EngineArgs  # noqa: E402
from atom_server.sampling_params import SamplingParams  # noqa: E402


def __getattr__(name: str):
    # LLM pulls in torch and the model code; keep `import atom_server` light for the CLI and the API server.
    if name == "LLM":
        from atom_server.llm import LLM

        return LLM
    raise AttributeError(name)


__all__ = ["LLM", "EngineArgs", "SamplingParams"]
