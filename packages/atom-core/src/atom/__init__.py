"""ATOM core: model implementations, fused ops and kernel bindings shared by every ATOM host."""

from atom_core_guard import check_installed as _check_installed

__version__ = "0.1.0"
__atom_core__ = True  # what atom_core_guard.require_atom_core() looks for

_check_installed()
