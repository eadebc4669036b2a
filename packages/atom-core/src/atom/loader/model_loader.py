"""Build an ATOM model from a checkpoint: HF folder (safetensors), a GGUF file, or random weights."""

from __future__ import annotations

import contextlib
import logging
import os
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


def random_weights_(module: torch.nn.Module, seed: int = 0) -> None:
    """Fill every parameter with small random values (benchmarks: speed does not depend on weights)."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    for name, p in module.named_parameters():
        if name.endswith("norm.weight"):
            p.data.fill_(1.0)
            continue
        if not p.dtype.is_floating_point:  # packed data (MXFP4 codes, scales): its layer says what is sane
            low, high = getattr(p, "dummy_range", (0, 2))
            # drawn where it lives (gpt-oss-20b has 12.7 GB of it), from a generator seeded by `gen`
            local = torch.Generator(device=p.device).manual_seed(int(torch.randint(2**62, (1,), generator=gen)))
            p.data.copy_(torch.randint(low, high, p.shape, generator=local, dtype=p.dtype, device=p.device))
            continue
        values = torch.empty(p.shape, dtype=torch.float32).uniform_(-0.02, 0.02, generator=gen)
        p.data.copy_(values.to(p.dtype))


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
):
    """Returns (model, config). load_format: auto | safetensors | gguf | dummy (random weights).

    run_mtp: build the checkpoint's MTP layers to draft with (speculative decoding, method "mtp"); the first
    one gets its attention from attn_factory like the model's layers (see deepseek_v2.MTPKeepingCausalLM).

    The quantization scheme comes from the checkpoint's quantization_config (or `quantization`, a
    quant_method name forcing one, e.g. "fp8" on a float checkpoint, or a ready `quant_config` from a host);
    after the weights are in, every layer's quantization method processes them once (the post-load hook).
    kv_cache_dtype (vLLM's names: auto, fp8, fp8_e4m3; or a torch dtype) sets the cache of ATOM's paged
    attention when no `attn_factory` is given."""
    config = config if config is not None else load_config(model, trust_remote_code)
    cls = model_class_for_config(config)
    device = torch.device(device) if device is not None else torch.device("cpu")
    torch_dtype = resolve_dtype(config, dtype, device)
    if quant_config is None:
        quant_config = quantization_config_for(config, quantization)
    if attn_factory is None:
        kv_dtype = kv_cache_torch_dtype(kv_cache_dtype, quant_config, device)
        if kv_dtype is not None and getattr(config, "kv_lora_rank", None):
            raise ValueError(f"kv_cache_dtype {kv_cache_dtype!r}: ATOM has no FP8 latent cache for multi-head "
                             f"latent attention ({type(config).__name__}) yet; use kv_cache_dtype 'auto'")
        # None: every model builds its default attention (multi-head or latent) in the model's dtype
        attn_factory = paged_attention_factory_for(kv_dtype) if kv_dtype is not None else None
    elif kv_cache_dtype not in (None, "auto"):
        raise ValueError("kv_cache_dtype applies to ATOM's paged attention; with an attn_factory the host sets "
                         "the KV cache's dtype")
    # Only schemes are passed: a model class that predates the seam still builds unquantized.
    extra = {"quant_config": quant_config} if quant_config is not None else {}
    if run_mtp:
        if not getattr(cls, "supports_mtp", False):
            raise ValueError(f"{cls.__name__} has no MTP layers to draft with (speculative method 'mtp' needs a "
                             "DeepSeek-V3 / GLM-4-MoE style checkpoint with num_nextn_predict_layers); the 'ngram' "
                             "method works with every model")
        extra["run_mtp"] = True
    with default_dtype(torch_dtype), torch.device(device):
        net = cls(config, attn_factory=attn_factory, max_positions=max_positions, **extra)
    if load_format == "dummy":
        random_weights_(net)
    else:
        loaded = net.load_weights(checkpoint_weights(model, progress=progress))
        expected = {n for n, _ in net.named_parameters(remove_duplicate=False)}
        missing = sorted(expected - loaded)
        if missing:
            raise ValueError(f"checkpoint {model} lacks tensors for: {', '.join(missing[:10])}"
                             + (f" and {len(missing) - 10} more" if len(missing) > 10 else ""))
    with torch.device(device):
        process_weights_after_loading(net)
    net.eval()
    return net, config
