"""`sglang.srt.plugins` entry point: registers the "atom" attention backend (idempotent, version-guarded)."""

from __future__ import annotations

import logging

from packaging.version import Version

from atom_sglang.version import support_status

logger = logging.getLogger(__name__)

BACKEND_NAME = "atom"
_registered = False


def _add_cli_choice(name: str) -> None:
    try:
        from sglang.srt.server_args import add_attention_backend_choices
    except ImportError:  # moved between releases
        from sglang.srt.arg_groups.choices import add_attention_backend_choices
    choices = getattr(add_attention_backend_choices, "__self__", None)  # it is `list.extend` of the choices
    if choices is None or name not in choices:
        add_attention_backend_choices([name])


def register(version: Version | None = None) -> bool:
    """Register ATOM's attention backend with SGLang; returns whether ATOM is active in this process.

    `version` defaults to the installed sglang's (SGLang calls this with no argument).
    """
    global _registered
    ok, reason = support_status(version)
    if not ok:
        logger.warning("atom-sglang disabled: %s", reason)
        return False
    if _registered:
        return True
    from sglang.srt.layers.attention.attention_registry import ATTENTION_BACKENDS, register_attention_backend

    if BACKEND_NAME not in ATTENTION_BACKENDS:
        from atom_sglang.attention_backend import create_atom_backend

        register_attention_backend(BACKEND_NAME)(create_atom_backend)
    _add_cli_choice(BACKEND_NAME)
    _registered = True
    return True
