"""The API server's own tokenizer (prompts, chat templates, /tokenize): HF folder or GGUF file,
built the way the engine builds it (atom.loader.gguf for GGUF files)."""

from __future__ import annotations

import os


def load_tokenizer(model: str, tokenizer: str | None = None, trust_remote_code: bool = False):
    source = tokenizer or model
    if source.endswith(".gguf") and os.path.isfile(source):
        from atom.loader.gguf import gguf_tokenizer

        return gguf_tokenizer(source)
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code)
