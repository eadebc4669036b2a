"""ATOM's own inference engine and OpenAI-compatible server."""

from atom_server.config import EngineArgs
from atom_server.sampling_params import SamplingParams


def __getattr__(name: str):
    # LLM pulls in torch and the model code; keep `import atom_server` light for the CLI and the API server.
    if name == "LLM":
        from atom_server.llm import LLM

        return LLM
    raise AttributeError(name)


__all__ = ["LLM", "EngineArgs", "SamplingParams"]
