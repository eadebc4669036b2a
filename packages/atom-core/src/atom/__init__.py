"""ATOM core: model implementations, fused ops and kernel bindings shared by every ATOM host."""

__version__ = "0.1.0"
