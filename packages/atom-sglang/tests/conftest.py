from __future__ import annotations

import os

# Set before sglang is imported anywhere: SGLang's model registry reads it at import time.
os.environ.setdefault("SGLANG_EXTERNAL_MODEL_PACKAGE", "atom_sglang.models")
