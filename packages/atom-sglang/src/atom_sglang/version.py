"""Which SGLang releases this package supports, and the check the plugin and the models run first."""

from __future__ import annotations

import importlib.metadata

from packaging.version import Version

MIN_SGLANG = Version("0.5.14")
MAX_SGLANG = Version("0.5.23")


class UnsupportedSGLangVersion(RuntimeError):
    pass


def sglang_version() -> Version | None:
    try:
        return Version(importlib.metadata.version("sglang"))
    except importlib.metadata.PackageNotFoundError:
        return None


def support_status(version: Version | None = None) -> tuple[bool, str]:
    """(supported, reason) for the given SGLang version (default: the installed one)."""
    version = version if version is not None else sglang_version()
    if version is None:
        return False, "sglang is not installed"
    # Compare release numbers only, so 0.5.23.post1 / rc builds of a supported release pass.
    release = Version(".".join(str(p) for p in version.release[:3]))
    if MIN_SGLANG <= release <= MAX_SGLANG:
        return True, f"sglang {version} is supported"
    return False, (f"atom-sglang supports sglang {MIN_SGLANG}..{MAX_SGLANG}, found sglang {version}; "
                   f"ATOM stays off (install a supported sglang or a matching atom-sglang release)")


def require_supported_sglang() -> None:
    ok, reason = support_status()
    if not ok:
        raise UnsupportedSGLangVersion(reason)
