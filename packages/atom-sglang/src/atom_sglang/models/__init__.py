"""SGLANG_EXTERNAL_MODEL_PACKAGE=atom_sglang.models: one module per family, each with its `EntryClass`.

SGLang imports every module here and drops (with only a log line) any that fails to import, so the
modules import nothing that can fail on a supported install; the version check runs when a model is built.
"""
