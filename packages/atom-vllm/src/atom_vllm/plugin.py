"""vLLM entry point `register` (group vllm.general_plugins).

vLLM calls it in every process it starts (API server, engine core, workers, the model-inspection
subprocess), so it is cheap and idempotent. ATOM ships no vLLM platform plugin: it changes nothing in
vLLM's platforms (kernels are chosen by atom-core's registry, ATOM_KERNEL_BACKEND).
"""

from __future__ import annotations

import logging
import os

from atom_vllm.switches import REMOVED_SWITCHES, atom_attention_enabled, check_vllm_version, plugin_disabled

# Under the "vllm" logger tree so the line goes through vLLM's own handler and format.
logger = logging.getLogger("vllm.atom_vllm")

MODELS_MODULE = "atom_vllm.models"

# vLLM architecture names that vLLM maps to the same built-in class as one of ATOM's architectures *and*
# that use the same HF config and checkpoint layout. Other vLLM aliases of Llama/Mistral (InternLM3 with
# its `qkv_bias`, IQuestCoder, TeleChat3, Ministral3) read config fields ATOM does not, so vLLM keeps them.
ALIASES = {"LLaMAForCausalLM": "LlamaForCausalLM"}

# atom-core architectures that atom_vllm.models has no class for yet: vLLM keeps serving them with its own
# model (empty today; other work adds to it, union the entries when merging).
NOT_IN_VLLM_YET: frozenset[str] = frozenset()

_registered: list[str] | None = None


def _same_builtin(registry, alias: str, canonical: str) -> bool:
    """True when vLLM's registry maps `alias` to the very class it maps `canonical` to."""
    a, c = registry.models.get(alias), registry.models.get(canonical)
    key = lambda m: (getattr(m, "module_name", None), getattr(m, "class_name", None))  # noqa: E731
    return a is not None and c is not None and key(a) == key(c) and key(a) != (None, None)


def architectures(registry=None) -> dict[str, str]:
    """vLLM architecture name -> class name in atom_vllm.models, for everything ATOM serves."""
    from atom.models import supported_architectures

    archs = {arch: arch for arch in supported_architectures() if arch not in NOT_IN_VLLM_YET}
    if registry is not None:
        for alias, canonical in ALIASES.items():
            if canonical in archs and _same_builtin(registry, alias, canonical):
                archs[alias] = canonical
    return archs


def clear_registry_caches() -> None:
    """Drop vLLM's in-process caches of loaded/inspected model classes.

    They are `functools.lru_cache`s keyed by (architecture, registered entry). The on-disk cache
    ($VLLM_CACHE_ROOT/modelinfos/<module>-<class>.json) is keyed by the registered module and validated
    against a hash of that module's source (of the whole package for a package's __init__), so ATOM's
    entries (atom_vllm/models/) go stale by themselves when that code changes and vLLM's built-in entries
    are never consulted for an architecture ATOM took over: nothing to delete there.
    """
    from vllm.model_executor.models import registry as vllm_registry

    for name in ("_try_load_model_cls", "_try_inspect_model_cls"):
        fn = getattr(vllm_registry, name, None)
        if fn is not None and hasattr(fn, "cache_clear"):
            fn.cache_clear()


def _describe_platform() -> str:
    from atom.platform import device_kind, kernel_backend

    try:
        backend = kernel_backend()
    except RuntimeError as e:  # a bad ATOM_KERNEL_BACKEND: say so here, the model build will raise
        backend = f"unusable ({e})"
    return f"platform {device_kind()}, kernel backend {backend}"


def register() -> list[str]:
    """Register ATOM's models with vLLM's ModelRegistry; returns the architectures taken over."""
    global _registered
    if _registered is not None:
        return list(_registered)
    if plugin_disabled():
        logger.info("atom-vllm is disabled (ATOM_DISABLE_VLLM_PLUGIN=1); vLLM runs its own models")
        _registered = []
        return []
    ok, reason = check_vllm_version()
    if not ok:
        logger.warning("atom-vllm is off: %s", reason)
        _registered = []
        return []

    from vllm import ModelRegistry

    archs = architectures(ModelRegistry)
    for arch, cls_name in archs.items():
        ModelRegistry.register_model(arch, f"{MODELS_MODULE}:{cls_name}")
    clear_registry_caches()
    for name, why in REMOVED_SWITCHES.items():
        if name in os.environ:
            logger.warning("%s is set but has no effect: %s", name, why)
    from vllm.platforms import current_platform

    logger.info("ATOM took over %s on %s; attention: vLLM's Attention layer running %s", ", ".join(sorted(archs)),
                _describe_platform(), "ATOM's kernels (ATOM_VLLM_ATTENTION=0: vLLM's backend)"
                if atom_attention_enabled(current_platform.is_cpu())
                else "vLLM's backend (ATOM_VLLM_ATTENTION=1: ATOM's kernels)")
    _registered = sorted(archs)
    return list(_registered)
