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
    # vLLM's flag: full-length caches for sliding-window layers too (default: they keep only the window)
    disable_hybrid_kv_cache_manager: bool = False
    tensor_parallel_size: int = 1
    seed: int = 0
    enforce_eager: bool = False
    served_model_name: str | None = None
    trust_remote_code: bool = False
    load_format: str = "auto"
    device: str | None = None
    skip_tokenizer_init: bool = False  # token ids in and out only (benchmarks on config-only checkpoints)

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
        parser.add_argument("--disable-hybrid-kv-cache-manager", action="store_true",
                            help="keep full-length KV caches for sliding-window layers (default: only the window)")
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
        return parser

    @classmethod
    def from_cli_args(cls, ns: argparse.Namespace) -> EngineArgs:
        names = [f.name for f in dataclasses.fields(cls)]
        return cls(**{n: getattr(ns, n) for n in names if hasattr(ns, n)})
