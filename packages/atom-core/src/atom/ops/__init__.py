"""Op families. Each op has a pure-torch reference (the test oracle) and optional triton / aiter
implementations; `atom.ops.registry.resolve(name)` picks one, once, when a layer is built."""

from atom.ops.registry import available_impls, resolve

__all__ = ["available_impls", "resolve"]
