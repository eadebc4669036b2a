"""Engine configuration: vLLM's argument names, defaults and CLI flags."""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass


@dataclass
class EngineArgs:
    model: str | None = None  # None: the bundled SmolLM2 GGUF (default_model.resolve_model_path)
    tokenizer: str | None = None
    dtype: str = "auto"
    max_model_len: int | None = None
    block_size: int = 16
    gpu_memory_utilization: float = 0.9
    kv_cache_memory_bytes: int | None = None
    max_num_seqs: int = 256
    max_num_batched_tokens: int | None = None
    enable_prefix_caching: bool = True
    tensor_parallel_size: int = 1
    seed: int = 0
    enforce_eager: bool = False
    served_model_name: str | None = None
    trust_remote_code: bool = False
    load_format: str = "auto"
    device: str | None = None
    skip_tokenizer_init: bool = False  # token ids in and out only (benchmarks on config-only checkpoints)
    quantization: str | None = None  # None: the checkpoint's quantization_config (if any); "fp8": quantize
    kv_cache_dtype: str = "auto"  # auto | fp8 | fp8_e4m3

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        def bad(name: str, why: str) -> ValueError:
            return ValueError(f"{name} {why}, got {getattr(self, name)!r}")

        def positive(name: str, optional: bool = False) -> None:
            v = getattr(self, name)
            if optional and v is None:
                return
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise bad(name, "must be a positive integer")

        positive("block_size")
        positive("max_num_seqs")
        positive("tensor_parallel_size")
        positive("max_model_len", optional=True)
        positive("max_num_batched_tokens", optional=True)
        positive("kv_cache_memory_bytes", optional=True)
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise bad("gpu_memory_utilization", "must be in (0, 1]")
        if self.dtype not in ("auto", "float32", "float", "float16", "half", "bfloat16"):
            raise bad("dtype", "must be one of auto, float32, float16, bfloat16")
        if self.load_format not in ("auto", "safetensors", "gguf", "dummy"):
            raise bad("load_format", "must be one of auto, safetensors, gguf, dummy")
        if self.quantization is not None:
            from atom.quantization import supported_quantizations

            if self.quantization not in supported_quantizations():
                raise bad("quantization", f"must be one of {', '.join(supported_quantizations())} (or left unset)")
        from atom.loader.model_loader import KV_CACHE_DTYPES

        if self.kv_cache_dtype not in KV_CACHE_DTYPES:
            extra = " (ATOM's FP8 KV cache is e4m3)" if self.kv_cache_dtype == "fp8_e5m2" else ""
            raise bad("kv_cache_dtype", f"must be one of {', '.join(KV_CACHE_DTYPES)}{extra}")
        if self.tensor_parallel_size != 1:
            raise bad("tensor_parallel_size", "must be 1 (tensor parallelism is not wired into atom-server yet)")

    @staticmethod
    def add_cli_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
        d = EngineArgs.__dataclass_fields__
        parser.add_argument("--model", type=str, default=None,
                            help="HF checkpoint folder or .gguf file (default: bundled SmolLM2-135M-Instruct)")
        parser.add_argument("--tokenizer", type=str, default=None, help="tokenizer folder (default: the model's)")
        parser.add_argument("--dtype", type=str, default=d["dtype"].default,
                            choices=["auto", "float32", "float", "float16", "half", "bfloat16"])
        parser.add_argument("--max-model-len", type=int, default=None)
        parser.add_argument("--block-size", type=int, default=d["block_size"].default)
        parser.add_argument("--gpu-memory-utilization", type=float, default=d["gpu_memory_utilization"].default)
        parser.add_argument("--kv-cache-memory-bytes", type=int, default=None)
        parser.add_argument("--max-num-seqs", type=int, default=d["max_num_seqs"].default)
        parser.add_argument("--max-num-batched-tokens", type=int, default=None)
        parser.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction,
                            default=d["enable_prefix_caching"].default)
        parser.add_argument("--tensor-parallel-size", "-tp", type=int, default=d["tensor_parallel_size"].default)
        parser.add_argument("--seed", type=int, default=d["seed"].default)
        parser.add_argument("--enforce-eager", action="store_true")
        parser.add_argument("--served-model-name", type=str, default=None)
        parser.add_argument("--trust-remote-code", action="store_true")
        parser.add_argument("--load-format", type=str, default=d["load_format"].default,
                            choices=["auto", "safetensors", "gguf", "dummy"])
        parser.add_argument("--device", type=str, default=None, help="cpu | cuda (default: what is present)")
        parser.add_argument("--skip-tokenizer-init", action="store_true",
                            help="no tokenizer: prompts as token ids, outputs without text")
        from atom.loader.model_loader import KV_CACHE_DTYPES
        from atom.quantization import supported_quantizations

        parser.add_argument("--quantization", "-q", type=str, default=None, choices=supported_quantizations(),
                            help="Method used to quantize the weights. If None, we first check the "
                                 "`quantization_config` attribute in the model config file. If that is None, we "
                                 "assume the model weights are not quantized and use `dtype` to determine the data "
                                 "type of the weights. fp8 on a float checkpoint quantizes its linear layers to FP8 "
                                 "(per output channel) at load time.")
        parser.add_argument("--kv-cache-dtype", type=str, default=d["kv_cache_dtype"].default, choices=KV_CACHE_DTYPES,
                            help="Data type for kv cache storage. If \"auto\", will use model data type (or FP8 "
                                 "when the checkpoint's quantization declares an FP8 KV cache). fp8 (=fp8_e4m3) "
                                 "stores e4m3 with per-tensor scales from the checkpoint (k_scale / v_scale), 1.0 "
                                 "otherwise: half the bytes of bf16, twice the blocks.")
        return parser

    @classmethod
    def from_cli_args(cls, ns: argparse.Namespace) -> EngineArgs:
        names = [f.name for f in dataclasses.fields(cls)]
        return cls(**{n: getattr(ns, n) for n in names if hasattr(ns, n)})
