"""Offline throughput: random prompts of input_len tokens, output_len new tokens each (greedy, EOS ignored),
one batch per size; prints a table and returns one dict per batch size.

`model` is a checkpoint (folder or .gguf) or one of PRESETS (the shapes in /work/shared/MODELS.md,
random weights: speed does not depend on weight values).
"""

from __future__ import annotations

import json
import os
import random
import tempfile
import time
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
}
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


def run_throughput(model: str | None, input_len: int = 128, output_len: int = 128,
                   batch_sizes: tuple[int, ...] | list[int] = (1, 32, 128), load_format: str = "auto",
                   seed: int = 0, **engine_args: Any) -> list[dict[str, Any]]:
    from atom_server.llm import LLM
    from atom_server.sampling_params import SamplingParams

    if model in PRESETS:
        model = preset_checkpoint(model)
        load_format = "dummy"
    engine_args.setdefault("max_model_len", input_len + output_len)
    engine_args.setdefault("max_num_seqs", max(batch_sizes))
    engine_args.setdefault("enable_prefix_caching", False)  # random prompts share nothing; keep it honest
    llm = LLM(model, load_format=load_format, skip_tokenizer_init=load_format == "dummy", **engine_args)
    vocab = llm.llm_engine.runner.vocab_size
    rng = random.Random(seed)
    params = SamplingParams(temperature=0.0, max_tokens=output_len, ignore_eos=True)

    def prompts(n: int) -> list[dict[str, list[int]]]:
        return [{"prompt_token_ids": [rng.randrange(vocab) for _ in range(input_len)]} for _ in range(n)]

    llm.generate(prompts(min(batch_sizes)), params.clone(max_tokens=min(4, output_len)), use_tqdm=False)  # warm-up
    rows = []
    for bs in batch_sizes:
        batch = prompts(bs)
        _sync()
        start = time.perf_counter()
        outs = llm.generate(batch, params, use_tqdm=False)
        _sync()
        elapsed = time.perf_counter() - start
        generated = sum(len(o.outputs[0].token_ids) for o in outs)
        rows.append(dict(model=llm.llm_engine.served_model_name, batch_size=bs, input_len=input_len,
                         output_len=output_len, elapsed_s=elapsed, output_tokens=generated,
                         output_tok_s=generated / elapsed, total_tok_s=(generated + bs * input_len) / elapsed,
                         device=str(llm.llm_engine.device), dtype=str(llm.llm_engine.dtype).replace("torch.", ""),
                         kernel_backend=llm.llm_engine.kernel_backend))
    print(format_table(rows))
    return rows


def format_table(rows: list[dict[str, Any]]) -> str:
    head = f"{'batch':>6} {'in':>6} {'out':>6} {'time s':>9} {'out tok/s':>11} {'total tok/s':>12}"
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r['batch_size']:>6} {r['input_len']:>6} {r['output_len']:>6} {r['elapsed_s']:>9.2f} "
                     f"{r['output_tok_s']:>11.1f} {r['total_tok_s']:>12.1f}")
    return "\n".join(lines)
