"""ATOM's models and attention inside unmodified SGLang.

- `atom_sglang.models`: the package to name in SGLANG_EXTERNAL_MODEL_PACKAGE.
- `atom_sglang.plugin:register`: the `sglang.srt.plugins` entry point; registers the "atom" attention backend.
"""

__version__ = "0.1.0"
