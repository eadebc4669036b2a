"""The one tokenizer loader of atom-server (the engine's and the API server's): an HF folder, or the
tokenizer stored in a GGUF file (converted once and cached by atom.loader.gguf)."""

from __future__ import annotations

import os


def load_tokenizer(model: str, tokenizer: str | None = None, trust_remote_code: bool = False):
    source = tokenizer or model
    if source.endswith(".gguf") and os.path.isfile(source):
        from atom.loader.gguf import gguf_tokenizer

        return gguf_tokenizer(source)
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code)
