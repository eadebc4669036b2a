"""Per-step state the host sets around a model forward (attention metadata, KV caches).

Models never read it; attention implementations supplied by a host do.
"""

from __future__ import annotations

import contextlib
from typing import Any

_current: Any = None


def get_forward_context() -> Any:
    return _current


@contextlib.contextmanager
def set_forward_context(ctx: Any):
    global _current
    prev, _current = _current, ctx
    try:
        yield ctx
    finally:
        _current = prev
