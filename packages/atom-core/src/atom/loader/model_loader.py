"""Build an ATOM model from a checkpoint: HF folder (safetensors), a GGUF file, or random weights."""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Iterable

import torch

from atom.layers.attention import AttentionFactory, paged_attention_factory_for
from atom.models.registry import model_class_for_config
from atom.quantization import QuantizationConfig, process_weights_after_loading, quantization_config_for

logger = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "float": torch.float32, "float16": torch.float16, "half": torch.float16,
           "bfloat16": torch.bfloat16}


# vLLM's --kv-cache-dtype names that ATOM's paged attention stores
KV_CACHE_DTYPES = ("auto", "fp8", "fp8_e4m3")


def check_kv_cache_dtype(name: str) -> None:
    if name not in KV_CACHE_DTYPES:
        extra = " (ATOM's FP8 KV cache is e4m3)" if name == "fp8_e5m2" else ""
        raise ValueError(f"kv_cache_dtype {name!r} is not supported{extra}; choose one of {', '.join(KV_CACHE_DTYPES)}")


def kv_cache_torch_dtype(kv_cache_dtype: str | torch.dtype | None, quant_config: QuantizationConfig | None = None,
                         device: torch.device | str | None = None) -> torch.dtype | None:
    """The KV cache's element type for vLLM's --kv-cache-dtype (None: the model's dtype).

    auto: the model's dtype, unless the checkpoint's quantization declares an FP8 KV cache (compressed-tensors
    kv_cache_scheme), which vLLM then uses too; fp8 / fp8_e4m3: e4m3 (float8_e4m3fnuz on MI300 GPUs)."""
    if isinstance(kv_cache_dtype, torch.dtype):
        return kv_cache_dtype
    name = kv_cache_dtype or "auto"
    check_kv_cache_dtype(name)
    scheme = getattr(quant_config, "kv_cache_scheme", None)
    if name == "auto" and not (scheme and scheme.get("type") == "float" and scheme.get("num_bits") == 8):
        return None
    from atom.ops.quant_fp8 import default_fp8_dtype

    on_gpu = device is not None and torch.device(device).type == "cuda"
    return default_fp8_dtype() if on_gpu else torch.float8_e4m3fn


def is_gguf(path: str) -> bool:
    return path.endswith(".gguf") and os.path.isfile(path)


def load_config(model: str, trust_remote_code: bool = False):
    """The transformers config of an HF folder or a GGUF file, with a clear error when it is missing."""
    if is_gguf(model):
        from atom.loader.gguf import gguf_config

        return gguf_config(model)
    if not os.path.isdir(model):
        raise FileNotFoundError(f"model path {model!r} is neither a folder nor a .gguf file "
                                "(ATOM loads local checkpoints only; no hub downloads)")
    if not os.path.exists(os.path.join(model, "config.json")):
        raise FileNotFoundError(f"{model} has no config.json")
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(model, trust_remote_code=trust_remote_code)
    except ValueError as e:
        raise ValueError(f"cannot read {os.path.join(model, 'config.json')}: {e}") from e


def resolve_dtype(config, dtype: str | torch.dtype = "auto", device: str | torch.device | None = None) -> torch.dtype:
    """The model's dtype; "auto" follows the checkpoint, except that a float32 (or unstated) checkpoint runs in
    bf16 on a GPU (vLLM's rule) and stays float32 on CPU; `device` is where the model will run (default: the
    accelerator when there is one), so a CPU model in a GPU process is float32 too."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype != "auto":
        if dtype not in _DTYPES:
            raise ValueError(f"unsupported dtype {dtype!r}; choose auto, {', '.join(_DTYPES)}")
        return _DTYPES[dtype]
    # `dtype` only: reading `torch_dtype` makes transformers 5 print a deprecation warning on every start
    # (it maps a checkpoint's torch_dtype to `dtype` when it reads config.json).
    cfg_dtype = getattr(config, "dtype", None) or vars(config).get("torch_dtype")
    if isinstance(cfg_dtype, str):
        cfg_dtype = _DTYPES.get(cfg_dtype, None)
    if cfg_dtype in (None, torch.float32):
        # As vLLM: float32 checkpoints run in bf16 on GPUs; keep float32 on CPU for exactness.
        on_cpu = torch.device(device).type == "cpu" if device is not None else not torch.cuda.is_available()
        return torch.float32 if on_cpu else torch.bfloat16
    return cfg_dtype


@contextlib.contextmanager
def default_dtype(dtype: torch.dtype):
    prev = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(prev)


def checkpoint_weights(model: str, progress: bool = True) -> Iterable[tuple[str, torch.Tensor]]:
    if is_gguf(model):
        from atom.loader.gguf import iterate_gguf

        return iterate_gguf(model, progress=progress)
    from atom.loader.safetensors_files import iterate_safetensors

    return iterate_safetensors(model, progress=progress)


DUMMY_LOW, DUMMY_HIGH, DUMMY_SEED = -1e-3, 1e-3, 1234


@torch.no_grad()
def dummy_weight_(tensor: torch.Tensor, low: float = DUMMY_LOW, high: float = DUMMY_HIGH,
                  seed: int = DUMMY_SEED, int_range: tuple[int, int] | None = None) -> None:
    """vLLM's dummy-weight rule for one tensor (`initialize_single_dummy_weight`, vLLM 0.24 and 0.32): a
    generator on the tensor's own device seeded with `seed` for this tensor alone, then uniform_(low, high)
    in the tensor's dtype (through float16 for 8-bit types). Integer tensors are left as they are unless their
    layer gives an `int_range` (packed data such as MXFP4 codes and scales: garbage there could decode to
    inf/NaN), drawn uniformly in [low, high) by the same seeded generator. The values
    depend only on the tensor's size, dtype and device, so ATOM and vLLM draw identical weights wherever
    their layouts agree (and every rank of a sharded model draws the same rule)."""
    if tensor.device.type == "meta" or (not torch.is_floating_point(tensor) and int_range is None):
        return
    gen = torch.Generator(device=tensor.device)
    gen.manual_seed(seed)
    if not torch.is_floating_point(tensor):
        low_int, high_int = int_range
        tensor.copy_(torch.randint(low_int, high_int, tensor.shape, generator=gen, dtype=tensor.dtype,
                                   device=tensor.device))
        return
    if torch.finfo(tensor.dtype).bits < 16:  # uniform_ has no 8-bit kernels
        tmp = torch.empty_like(tensor, dtype=torch.float16)
        tmp.uniform_(low, high, generator=gen)
        tensor.copy_(tmp)
    else:
        tensor.uniform_(low, high, generator=gen)


def dummy_weights_(module: torch.nn.Module, seed: int = DUMMY_SEED) -> None:
    """Random weights for benchmarks, as vLLM's `load_format=dummy` makes them: every floating parameter and
    persistent buffer (norm weights and routers included) uniform in [-1e-3, 1e-3], drawn where it lives
    (on the GPU: no host generation and copy); integer parameters with a `dummy_range` (their layer's sane
    values, e.g. MXFP4 codes and scales) uniform in it. Non-persistent buffers (the RoPE table) keep their
    values."""
    seen: set[int] = set()
    for sub in module.modules():
        tensors = list(sub.named_parameters(recurse=False)) + [
            (n, b) for n, b in sub.named_buffers(recurse=False) if n not in sub._non_persistent_buffers_set]
        for _, t in tensors:
            if t is None or id(t) in seen:  # tied weights: drawn once
                continue
            seen.add(id(t))
            dummy_weight_(t.data, seed=seed, int_range=getattr(t, "dummy_range", None))


def load_model(
    model: str,
    dtype: str | torch.dtype = "auto",
    device: str | torch.device | None = None,
    attn_factory: AttentionFactory | None = None,
    load_format: str = "auto",
    max_positions: int | None = None,
    config=None,
    trust_remote_code: bool = False,
    progress: bool = True,
    quantization: str | None = None,
    quant_config: QuantizationConfig | None = None,
    run_mtp: bool = False,
    kv_cache_dtype: str | torch.dtype | None = None,
    timings: dict[str, float] | None = None,
):
    """Returns (model, config). load_format: auto | safetensors | gguf | dummy (random weights).
    `timings`, when given, receives the seconds of each part: build, weights (loading or the dummy draw),
    post_load (the quantization methods' processing).

    run_mtp: build the checkpoint's MTP layers to draft with (speculative decoding, method "mtp"); the first
    one gets its attention from attn_factory like the model's layers (see deepseek_v2.MTPKeepingCausalLM).

    The quantization scheme comes from the checkpoint's quantization_config (or `quantization`, a
    quant_method name forcing one, e.g. "fp8" on a float checkpoint, or a ready `quant_config` from a host);
    after the weights are in, every layer's quantization method processes them once (the post-load hook).
    kv_cache_dtype (vLLM's names: auto, fp8, fp8_e4m3; or a torch dtype) sets the cache of ATOM's paged
    attention when no `attn_factory` is given: K/V pages, or the latent cache of a multi-head latent attention
    model (DeepSeek-V2/V3)."""
    config = config if config is not None else load_config(model, trust_remote_code)
    cls = model_class_for_config(config)
    device = torch.device(device) if device is not None else torch.device("cpu")
    torch_dtype = resolve_dtype(config, dtype, device)
    if quant_config is None:
        quant_config = quantization_config_for(config, quantization)
    # Only schemes are passed: a model class that predates the seam still builds unquantized.
    extra = {"quant_config": quant_config} if quant_config is not None else {}
    if attn_factory is None:
        kv_dtype = kv_cache_torch_dtype(kv_cache_dtype, quant_config, device)
        # None: every model builds its default attention (multi-head or latent) in the model's dtype
        if kv_dtype is not None and getattr(cls, "uses_mla", False):
            # here, not at the top: atom.layers.mla imports atom.quantization, which imports this module
            from atom.layers.mla import paged_mla_factory_for

            extra["mla_factory"] = paged_mla_factory_for(kv_dtype)  # the FP8 latent cache
        elif kv_dtype is not None:
            attn_factory = paged_attention_factory_for(kv_dtype)
    elif kv_cache_dtype not in (None, "auto"):
        raise ValueError("kv_cache_dtype applies to ATOM's paged attention; with an attn_factory the host sets "
                         "the KV cache's dtype")
    if run_mtp:
        if not getattr(cls, "supports_mtp", False):
            raise ValueError(f"{cls.__name__} has no MTP layers to draft with (speculative method 'mtp' needs a "
                             "DeepSeek-V3 / GLM-4-MoE style checkpoint with num_nextn_predict_layers); the 'ngram' "
                             "method works with every model")
        extra["run_mtp"] = True
    clock = _Clock(device, timings)
    with default_dtype(torch_dtype), torch.device(device):
        net = cls(config, attn_factory=attn_factory, max_positions=max_positions, **extra)
    clock.lap("build")
    if load_format == "dummy":
        dummy_weights_(net)
    else:
        loaded = net.load_weights(checkpoint_weights(model, progress=progress))
        expected = {n for n, _ in net.named_parameters(remove_duplicate=False)}
        missing = sorted(expected - loaded)
        if missing:
            raise ValueError(f"checkpoint {model} lacks tensors for: {', '.join(missing[:10])}"
                             + (f" and {len(missing) - 10} more" if len(missing) > 10 else ""))
    clock.lap("weights")
    with torch.device(device):
        process_weights_after_loading(net)
    clock.lap("post_load")
    net.eval()
    return net, config


class _Clock:
    """Laps of load_model into `timings` (synchronising the device first, so a lap holds its own work)."""

    def __init__(self, device: torch.device, timings: dict[str, float] | None):
        self.device, self.timings = device, timings
        self.last = time.perf_counter()

    def lap(self, name: str) -> None:
        if self.timings is None:
            return
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        now = time.perf_counter()
        self.timings[name] = now - self.last
        self.last = now
