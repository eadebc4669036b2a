"""Engine configuration: vLLM's argument names, defaults and CLI flags (each with help and its default)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
from dataclasses import dataclass
from typing import Any

from atom_server.generation_defaults import check_generation_config

DTYPES = ("auto", "float32", "float", "float16", "half", "bfloat16")
LOAD_FORMATS = ("auto", "safetensors", "gguf", "dummy")


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
    enable_expert_parallel: bool = False  # MoE experts sharded whole over the TP ranks (vLLM's flag)
    seed: int = 0
    enforce_eager: bool = False
    # One name or several (vLLM's --served-model-name); None: the --model string as given.
    served_model_name: str | list[str] | None = None
    trust_remote_code: bool = False
    load_format: str = "auto"
    device: str | None = None
    skip_tokenizer_init: bool = False  # token ids in and out only (benchmarks on config-only checkpoints)
    quantization: str | None = None  # None: the checkpoint's quantization_config (if any); "fp8": quantize
    kv_cache_dtype: str = "auto"  # auto | fp8 | fp8_e4m3
    generation_config: str = "auto"  # auto | vllm | folder with generation_config.json
    cpu_threads: int | None = None  # `atom serve` on CPU: the engine's torch threads (None: cpu_threads.plan)
    max_logprobs: int = 20  # most logprobs / prompt_logprobs a request may ask for; -1: no cap (vLLM's)
    scheduling_policy: str = "fcfs"  # fcfs | priority (requests' priority field; lower first), vLLM's
    profiler_dir: str | None = None  # torch profiler traces (/start_profile, /stop_profile); None: off
    # vLLM's speculative_config (a dict, or its JSON text): {"method": "mtp" | "ngram", "num_speculative_tokens":
    # K, ...}; see atom_server.engine.speculative
    speculative_config: dict[str, Any] | None = None
    startup_profile: bool = False  # log where start-up time goes, Triton JIT compiles included (startup.py)
    # vLLM's UsageContext, not a flag: "llm" (the offline LLM class, `atom bench throughput`) or "server"; it picks
    # the default max_num_batched_tokens (engine_core.default_max_num_batched_tokens)
    usage_context: str = "server"

    def __post_init__(self) -> None:
        if self.profiler_dir is None and os.environ.get("VLLM_TORCH_PROFILER_DIR"):
            self.profiler_dir = os.environ["VLLM_TORCH_PROFILER_DIR"]
        if isinstance(self.speculative_config, str):
            from atom_server.engine.speculative import parse_speculative_config

            parse_speculative_config(self.speculative_config)  # a clear error for bad JSON
            self.speculative_config = json.loads(self.speculative_config) or None
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
        if self.usage_context not in ("llm", "server"):
            raise bad("usage_context", "must be 'llm' or 'server'")
        positive("kv_cache_memory_bytes", optional=True)
        positive("cpu_threads", optional=True)
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise bad("gpu_memory_utilization", "must be in (0, 1]")
        if self.dtype not in DTYPES:
            raise bad("dtype", "must be one of auto, float32, float16, bfloat16")
        if self.load_format not in LOAD_FORMATS:
            raise bad("load_format", "must be one of auto, safetensors, gguf, dummy")
        if self.quantization is not None:
            from atom.quantization import supported_quantizations

            if self.quantization not in supported_quantizations():
                raise bad("quantization", f"must be one of {', '.join(supported_quantizations())} (or left unset)")
        from atom.loader.model_loader import KV_CACHE_DTYPES

        if self.kv_cache_dtype not in KV_CACHE_DTYPES:
            extra = " (ATOM's FP8 KV cache is e4m3)" if self.kv_cache_dtype == "fp8_e5m2" else ""
            raise bad("kv_cache_dtype", f"must be one of {', '.join(KV_CACHE_DTYPES)}{extra}")
        if not isinstance(self.max_logprobs, int) or isinstance(self.max_logprobs, bool) or self.max_logprobs < -1:
            raise bad("max_logprobs", "must be -1 (no cap) or an integer >= 0")
        if self.scheduling_policy not in ("fcfs", "priority"):
            raise bad("scheduling_policy", "must be fcfs or priority")
        names = self.served_model_name
        if names is not None:
            listed = [names] if isinstance(names, str) else list(names)
            if not listed or any(not isinstance(n, str) or not n.strip() for n in listed):
                raise bad("served_model_name", "must be one or more non-empty names")
        check_generation_config(self.generation_config)
        from atom_server.engine.speculative import parse_speculative_config

        spec = parse_speculative_config(self.speculative_config)
        if spec is not None and spec.is_mtp and self.tensor_parallel_size > 1:
            # the MTP layer's first pass reads where each row's verification stopped and the token it drew,
            # which only rank 0 knows; the workers would need them mid-step (not built yet)
            raise bad("speculative_config", "method 'mtp' does not run with tensor_parallel_size > 1 yet; "
                      "use method 'ngram' there, or tensor_parallel_size 1")

    def served_model_names(self) -> list[str]:
        """The names clients may use; the first is the one reported (vLLM). Default: --model as given."""
        names = self.served_model_name
        if names is None:
            return [self.model] if self.model else []
        return [names] if isinstance(names, str) else list(names)

    @staticmethod
    def add_cli_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
        from atom.loader.model_loader import KV_CACHE_DTYPES
        from atom.quantization import supported_quantizations

        d = {f.name: f.default for f in dataclasses.fields(EngineArgs)}
        add = parser.add_argument
        add("--model", type=str, default=None,
            help="HF checkpoint folder or .gguf file (default: the bundled SmolLM2-135M-Instruct)")
        add("--tokenizer", type=str, default=None, help="tokenizer folder (default: the model's own)")
        add("--dtype", type=str, default=d["dtype"], choices=DTYPES,
            help="dtype of weights and activations; auto: the checkpoint's, except float32 checkpoints, "
                 "which run in bfloat16 on GPUs (as vLLM)")
        add("--max-model-len", type=int, default=None,
            help="context length, prompt plus output (default: the model's max_position_embeddings, at most "
                 "8192 on CPU)")
        add("--block-size", type=int, default=d["block_size"], help="tokens per KV-cache block")
        add("--gpu-memory-utilization", type=float, default=d["gpu_memory_utilization"],
            help="fraction of the GPU's memory the engine may take (weights, activations, KV cache)")
        add("--kv-cache-memory-bytes", type=int, default=None,
            help="KV-cache size in bytes, instead of what --gpu-memory-utilization leaves (default: sized by "
                 "the engine)")
        add("--max-num-seqs", type=int, default=d["max_num_seqs"], help="most sequences in one batch")
        add("--max-num-batched-tokens", type=int, default=None,
            help="most tokens in one step (default, as vLLM's: 2048 on CPU, 8192 on GPUs; the offline LLM class "
                 "and `atom bench throughput`: 16384 on GPUs of 70 GiB or more other than the A100)")
        add("--enable-prefix-caching", action=argparse.BooleanOptionalAction, default=d["enable_prefix_caching"],
            help="reuse the KV cache of shared prompt prefixes")
        add("--disable-hybrid-kv-cache-manager", action="store_true",
            help="keep full-length KV caches for sliding-window layers too (default: those layers keep only "
                 "the window of each sequence, in a pool of their own)")
        add("--tensor-parallel-size", "-tp", type=int, default=d["tensor_parallel_size"],
            help="ranks that split the model: GPUs 0..N-1 (choose them with CUDA_VISIBLE_DEVICES), or processes "
                 "on CPU")
        add("--enable-expert-parallel", action="store_true",
            help="shard MoE layers by whole experts over the tensor-parallel ranks instead of slicing every expert")
        add("--seed", type=int, default=d["seed"], help="random seed of the engine (requests can set their own)")
        add("--enforce-eager", action="store_true",
            help="eager PyTorch only: no CUDA graphs on a GPU, no compiled forward (torch.compile) on CPU")
        add("--served-model-name", type=str, nargs="+", default=None, metavar="NAME",
            help="one or more names the API serves the model under; the first is the one reported "
                 "(default: the --model argument as given; SmolLM2-135M-Instruct for the bundled model)")
        add("--trust-remote-code", action="store_true", help="let transformers run the checkpoint's own code")
        add("--load-format", type=str, default=d["load_format"], choices=LOAD_FORMATS,
            help="weights format; dummy: random weights of the checkpoint's shapes (benchmarks)")
        add("--device", type=str, default=None, help="cpu or cuda (default: cuda when a GPU is present)")
        add("--skip-tokenizer-init", action="store_true",
            help="no tokenizer: prompts as token ids, outputs without text")
        add("--generation-config", type=str, default=d["generation_config"], metavar="auto|vllm|FOLDER",
            help="sampling defaults of requests that do not set them: auto takes temperature, top_p, top_k, "
                 "min_p, repetition/presence/frequency penalties and max_new_tokens from the model's "
                 "generation_config.json; vllm ignores it (neutral defaults); a folder: its "
                 "generation_config.json")
        add("--max-logprobs", type=int, default=d["max_logprobs"],
            help="most logprobs (logprobs, top_logprobs, prompt_logprobs) a request may ask for; -1: no cap")
        add("--scheduling-policy", type=str, default=d["scheduling_policy"], choices=("fcfs", "priority"),
            help="fcfs: first come, first served; priority: by the requests' priority field (lower first, ties "
                 "by arrival; the lowest-priority running request is preempted when the KV cache is full)")
        add("--profiler-dir", type=str, default=None, metavar="DIR",
            help="enable POST /start_profile and /stop_profile: torch profiler traces of the engine written to "
                 "DIR (default: $VLLM_TORCH_PROFILER_DIR, else profiling is off)")
        add("--speculative-config", type=str, default=None, metavar="JSON",
            help='speculative decoding, as vLLM: \'{"method": "mtp", "num_speculative_tokens": 3}\' drafts with the '
                 'checkpoint\'s MTP layer (DeepSeek-V3, GLM-4-MoE; K defaults to num_nextn_predict_layers); '
                 '\'{"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_max": 4, "prompt_lookup_min": 2}\' '
                 'drafts by prompt lookup (any model). Benchmarks only: "rejection_sample_method": "synthetic" with '
                 '"synthetic_acceptance_length" (or "synthetic_acceptance_rates") forces the acceptance: outputs are '
                 'then not the model\'s (default: off)')
        add("--startup-profile", action="store_true",
            help="log where start-up time goes: each phase, each captured CUDA-graph batch size, and every Triton "
                 "JIT compile (kernel, seconds, which specialisation made it compile again); also "
                 "ATOM_STARTUP_PROFILE=1")
        add("--cpu-threads", type=int, default=None,
            help="CPU only: torch threads of the engine; `atom serve` pins its engine process to that many "
                 "physical cores (default there: $OMP_NUM_THREADS if set, else the physical cores minus one for "
                 "the API server; offline LLM and benchmarks: torch's own default)")
        add("--quantization", "-q", type=str, default=None, choices=supported_quantizations(),
            help="method used to quantize the weights (default: the checkpoint's quantization_config, if any, "
                 "else unquantized in --dtype); fp8 on a float checkpoint quantizes its linear layers to FP8 "
                 "(per output channel) at load time")
        add("--kv-cache-dtype", type=str, default=d["kv_cache_dtype"], choices=KV_CACHE_DTYPES,
            help="KV-cache storage; auto: the model's dtype (or FP8 when the checkpoint's quantization declares "
                 "an FP8 KV cache); fp8 (= fp8_e4m3) stores e4m3 with per-tensor scales from the checkpoint "
                 "(k_scale / v_scale), 1.0 otherwise: half the bytes of bf16, twice the blocks")
        return parser

    @classmethod
    def from_cli_args(cls, ns: argparse.Namespace) -> EngineArgs:
        names = [f.name for f in dataclasses.fields(cls)]
        return cls(**{n: getattr(ns, n) for n in names if hasattr(ns, n)})


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows every flag's default, unless its help already says what the default is."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "(default" in text or action.default is None or action.default is argparse.SUPPRESS:
            return text
        return super()._get_help_string(action)
