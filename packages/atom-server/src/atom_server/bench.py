"""Offline throughput: random prompts of input_len tokens, output_len new tokens each (greedy, EOS ignored),
one batch per size (warm-up, then the median of `repeats`); prints a table and returns one dict per batch size.

`model` is a checkpoint (folder or .gguf) or one of PRESETS (the shapes in /work/shared/MODELS.md,
random weights: speed does not depend on weight values).
"""

from __future__ import annotations

import json
import os
import random
import tempfile
import time
from collections.abc import Callable
from typing import Any

import torch

PRESETS: dict[str, dict[str, Any]] = {
    "qwen3-0.6b": dict(model_type="qwen3", architectures=["Qwen3ForCausalLM"], hidden_size=1024,
                       num_hidden_layers=28, num_attention_heads=16, num_key_value_heads=8, head_dim=128,
                       intermediate_size=3072, vocab_size=151936, tie_word_embeddings=True),
    "qwen3-8b": dict(model_type="qwen3", architectures=["Qwen3ForCausalLM"], hidden_size=4096,
                     num_hidden_layers=36, num_attention_heads=32, num_key_value_heads=8, head_dim=128,
                     intermediate_size=12288, vocab_size=151936, tie_word_embeddings=False),
    "qwen3-30b-a3b": dict(model_type="qwen3_moe", architectures=["Qwen3MoeForCausalLM"], hidden_size=2048,
                          num_hidden_layers=48, num_attention_heads=32, num_key_value_heads=4, head_dim=128,
                          intermediate_size=6144, moe_intermediate_size=768, num_experts=128,
                          num_experts_per_tok=8, norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[],
                          vocab_size=151936, tie_word_embeddings=False),
    # deepseek-ai/DeepSeek-V2-Lite's config: 15.7B parameters, 2.4B active (MLA without q_lora, 64 routed experts
    # top-6 + 2 shared, the first layer dense); its tokenizer ids
    "deepseek-v2-lite": dict(model_type="deepseek_v2", architectures=["DeepseekV2ForCausalLM"], hidden_size=2048,
                             num_hidden_layers=27, num_attention_heads=16, num_key_value_heads=16, q_lora_rank=None,
                             kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128,
                             intermediate_size=10944, moe_intermediate_size=1408, n_routed_experts=64,
                             num_experts_per_tok=6, n_shared_experts=2, first_k_dense_replace=1, moe_layer_freq=1,
                             topk_method="greedy", n_group=1, topk_group=1, norm_topk_prob=False,
                             routed_scaling_factor=1.0, scoring_func="softmax", aux_loss_alpha=0.001,
                             seq_aux=True, ep_size=1, attention_bias=False, vocab_size=102400,
                             tie_word_embeddings=False, max_position_embeddings=163840, rope_theta=10000.0,
                             rope_scaling={"type": "yarn", "factor": 40, "original_max_position_embeddings": 4096,
                                           "beta_fast": 32, "beta_slow": 1, "mscale": 0.707,
                                           "mscale_all_dim": 0.707},
                             bos_token_id=100000, eos_token_id=100001),
    # openai/gpt-oss-20b's config (MXFP4 experts: random packed codes and scales under load_format dummy)
    "gpt-oss-20b": dict(model_type="gpt_oss", architectures=["GptOssForCausalLM"], hidden_size=2880,
                        num_hidden_layers=24, num_attention_heads=64, num_key_value_heads=8, head_dim=64,
                        intermediate_size=2880, num_local_experts=32, num_experts_per_tok=4, sliding_window=128,
                        attention_bias=True, swiglu_limit=7.0, vocab_size=201088, tie_word_embeddings=False,
                        max_position_embeddings=131072, rms_norm_eps=1e-5, rope_theta=150000.0,
                        rope_scaling={"rope_type": "yarn", "factor": 32.0, "beta_fast": 32.0, "beta_slow": 1.0,
                                      "truncate": False, "original_max_position_embeddings": 4096},
                        bos_token_id=199998, eos_token_id=200002,
                        quantization_config={"quant_method": "mxfp4", "modules_to_not_convert": [
                            "model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens",
                            "lm_head"]}),
}
# the same with one MTP layer (as DeepSeek-V3/R1 ship), for speculative decoding's mechanism benchmarks
# (--speculative-config with method mtp and a synthetic acceptance: random weights accept nothing on their own)
PRESETS["deepseek-v2-lite-mtp"] = dict(PRESETS["deepseek-v2-lite"], num_nextn_predict_layers=1)
# the same shape with bf16 experts (what a peer without an MXFP4 path on the GPU runs)
PRESETS["gpt-oss-20b-bf16"] = {k: v for k, v in PRESETS["gpt-oss-20b"].items() if k != "quantization_config"}
_COMMON = dict(max_position_embeddings=40960, rms_norm_eps=1e-6, rope_theta=1000000.0, hidden_act="silu",
               torch_dtype="bfloat16", bos_token_id=151643, eos_token_id=151645)


def preset_checkpoint(name: str, folder: str | None = None) -> str:
    """A config-only checkpoint folder for a preset shape (run it with load_format='dummy')."""
    folder = folder or tempfile.mkdtemp(prefix=f"atom-{name}-")
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump({**_COMMON, **PRESETS[name]}, f)
    return folder


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _median(xs: list[float]) -> float:
    xs = sorted(xs)
    n = len(xs)
    return xs[n // 2] if n % 2 else (xs[n // 2 - 1] + xs[n // 2]) / 2


def run_throughput(model: str | None, input_len: int = 128, output_len: int = 128,
                   batch_sizes: tuple[int, ...] | list[int] = (1, 32, 128), load_format: str = "auto",
                   seed: int = 0, repeats: int = 3, quiet: bool = False, warmup_runs: int = 1,
                   on_row: Callable[[list[dict[str, Any]]], None] | None = None, progress: bool = False,
                   **engine_args: Any) -> list[dict[str, Any]]:
    """Per batch size: `warmup_runs` full and prefill-only warm-up runs, then `repeats` prefill-only runs
    (max_tokens=1) and `repeats` full runs, each on fresh random prompts; the row holds the medians. ms/step =
    (full - prefill) / (out - 1). on_row(rows so far) is called after each batch size (so a run cut short keeps
    what it measured)."""
    from atom_server.llm import LLM

    if model is not None:  # rows name the model as given (a preset, or the path), not a temp folder
        engine_args.setdefault("served_model_name", model)
    if model in PRESETS:
        model = preset_checkpoint(model)
        load_format = "dummy"
    engine_args.setdefault("max_model_len", input_len + output_len)
    engine_args.setdefault("max_num_seqs", max(batch_sizes))
    engine_args.setdefault("enable_prefix_caching", False)  # random prompts share nothing; keep it honest
    engine_args.setdefault("skip_tokenizer_init", True)  # token ids in and out: no tokenizer needed
    start = time.perf_counter()
    llm = LLM(model, load_format=load_format, seed=seed, **engine_args)
    init_s = time.perf_counter() - start
    return measure_throughput(llm, input_len, output_len, batch_sizes, seed=seed, repeats=repeats, quiet=quiet,
                              on_row=on_row, progress=progress, init_s=init_s, warmup_runs=warmup_runs)


def measure_throughput(llm, input_len: int = 128, output_len: int = 128,
                       batch_sizes: tuple[int, ...] | list[int] = (1, 32, 128), seed: int = 0, repeats: int = 3,
                       quiet: bool = False, on_row: Callable[[list[dict[str, Any]]], None] | None = None,
                       progress: bool = False, init_s: float | None = None,
                       warmup_runs: int = 1) -> list[dict[str, Any]]:
    """run_throughput's measurement on an engine already built (an `LLM`): the same rows. Each row also says
    which path the timed full runs took (graph replays by kind, eager steps) and, with speculative decoding,
    their acceptance (spec_decode counters, mean acceptance length)."""
    from atom_server.sampling_params import SamplingParams

    engine = llm.llm_engine
    vocab = engine.runner.vocab_size
    graphs = getattr(engine.runner, "graphs", None)
    spec = getattr(engine, "speculative", None)
    # the settings a comparison with vLLM must show next to vLLM's own (tools/device/vllm_throughput.py)
    settings = dict(async_scheduling=bool(getattr(engine, "async_scheduling", False)),
                    multiprocessing=False,  # LLM() runs the engine core in the calling process
                    cuda_graphs=graphs is not None and getattr(graphs, "capture", False),
                    cudagraph_capture_sizes=list(getattr(graphs, "sizes", []) or []),
                    verify_capture_sizes=list(getattr(graphs, "verify_sizes", []) or []),
                    speculative=spec.describe() if spec is not None else None,
                    max_num_seqs=engine.args.max_num_seqs, tensor_parallel_size=engine.args.tensor_parallel_size)
    rng = random.Random(seed)
    full = SamplingParams(temperature=0.0, max_tokens=output_len, ignore_eos=True)
    first = full.clone(max_tokens=1)

    def prompts(n: int) -> list[dict[str, list[int]]]:
        return [{"prompt_token_ids": [rng.randrange(vocab) for _ in range(input_len)]} for _ in range(n)]

    def timed(n: int, params: SamplingParams) -> tuple[float, int]:
        batch = prompts(n)
        _sync()
        t = time.perf_counter()
        outs = llm.generate(batch, params, use_tqdm=False)
        _sync()
        return time.perf_counter() - t, sum(len(o.outputs[0].token_ids) for o in outs)

    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(batch_sizes) * (2 * warmup_runs + 2 * repeats), unit="run", dynamic_ncols=True)

    def tick(label: str, bs: int, params: SamplingParams) -> tuple[float, int]:
        if bar is not None:
            bar.set_description(f"batch {bs}: {label}")
        result = timed(bs, params)
        if bar is not None:
            bar.update(1)
        return result

    from atom_server import startup

    rows = []
    for bs in batch_sizes:
        startup.set_label(f"bs={bs} warm-up")  # Triton compiles of the first requests (--startup-profile)
        for _ in range(warmup_runs):
            tick("warm-up", bs, full)  # allocator, autotuning, CUDA graphs of this batch size
            tick("warm-up", bs, first)  # the prefill-only shape too (tools/device/vllm_throughput.py does the same)
        startup.set_label(f"bs={bs} timed runs")
        pre = [tick("prefill", bs, first)[0] for _ in range(repeats)]
        before = _path_counters(engine)
        runs = [tick("full", bs, full) for _ in range(repeats)]
        path = {k: v - before.get(k, 0) for k, v in _path_counters(engine).items()}
        totals = [t for t, _ in runs]
        generated = runs[0][1]
        if any(n != bs * output_len for _, n in runs):
            raise RuntimeError(f"batch {bs}: expected {bs * output_len} new tokens, got {[n for _, n in runs]}")
        elapsed, prefill = _median(totals), _median(pre)
        step = (elapsed - prefill) / (output_len - 1) if output_len > 1 else None
        rows.append(dict(model=engine.served_model_name, batch_size=bs, input_len=input_len,
                         output_len=output_len, elapsed_s=elapsed, output_tokens=generated,
                         output_tok_s=generated / elapsed, total_tok_s=(generated + bs * input_len) / elapsed,
                         prefill_ms=prefill * 1e3, ms_per_step=None if step is None else step * 1e3,
                         decode_tok_s=None if not step or step <= 0 else bs / step,
                         total_s_all=totals, prefill_s_all=pre, init_s=init_s,
                         device=str(engine.device), dtype=str(engine.dtype).replace("torch.", ""),
                         kernel_backend=engine.kernel_backend, settings=settings, steps=path))
        if spec is not None:
            drafts = path.get("spec_decode_num_drafts", 0)
            rows[-1]["mean_acceptance_length"] = (1 + path.get("spec_decode_num_accepted_tokens", 0) / drafts
                                                  if drafts else None)
        if on_row is not None:
            on_row(rows)
    if bar is not None:
        bar.close()
    if not quiet:
        print(format_table(rows))
    return rows


def _path_counters(engine) -> dict[str, int]:
    """What the steps so far ran on: graph replays by kind, eager steps, speculative decoding's counters."""
    runner = engine.runner
    graphs = getattr(runner, "graphs", None)
    out = {f"graph_replays.{k}": v for k, v in (graphs.replays.items() if graphs is not None else ())}
    out["eager_steps"] = getattr(runner, "eager_steps", 0)
    stats = engine.stats()
    out.update({k: v for k, v in stats.items() if k in ("spec_decode_num_drafts", "spec_decode_num_draft_tokens",
                                                        "spec_decode_num_accepted_tokens")})
    return out


def format_table(rows: list[dict[str, Any]]) -> str:
    head = (f"{'batch':>6} {'in':>6} {'out':>6} {'prefill ms':>11} {'total s':>9} {'ms/step':>9} "
            f"{'out tok/s':>11} {'total tok/s':>12}")
    lines = [head, "-" * len(head)]
    for r in rows:
        step = r.get("ms_per_step")
        step_s = f"{step:>9.2f}" if step is not None else f"{'-':>9}"
        lines.append(f"{r['batch_size']:>6} {r['input_len']:>6} {r['output_len']:>6} {r['prefill_ms']:>11.1f} "
                     f"{r['elapsed_s']:>9.3f} {step_s} {r['output_tok_s']:>11.1f} {r['total_tok_s']:>12.1f}")
    return "\n".join(lines)
