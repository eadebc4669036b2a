"""Throughput cost of structured outputs: one batch of 32 requests with and without a JSON schema.

    python tools/bench_structured.py [--model PATH] [--batch 32] [--max-tokens 48] [--device cpu]

Default model: the bundled SmolLM2-135M GGUF. Both runs are greedy, prefill included, over the same 32
prompts; "plain" runs with ignore_eos and the schema run ends where each JSON object is complete, so the
figure to compare is generated tokens per second (and the time per decode step). A second part times the
host side of a grammar row per step: filling its next-token bitmask (xgrammar, scheduler side) and applying
the bitmasks of the batch to the logits (atom.ops.sampling.apply_token_bitmask, the runner's device op).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

SCHEMA = {"type": "object",
          "properties": {"name": {"type": "string", "maxLength": 24},
                         "age": {"type": "integer", "minimum": 0, "maximum": 120},
                         "tags": {"type": "array", "items": {"enum": ["red", "green", "blue"]}, "maxItems": 3},
                         "address": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20},
                                                                      "zip": {"type": "string", "maxLength": 8}},
                                     "required": ["city"]}},
          "required": ["name", "age", "tags", "address"]}


def run(llm, prompts, params) -> tuple[float, int, int]:
    started = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    elapsed = time.perf_counter() - started
    return elapsed, sum(len(o.outputs[0].token_ids) for o in outs), max(len(o.outputs[0].token_ids) for o in outs)


def main() -> None:
    from atom_server import LLM, SamplingParams
    from atom_server.default_model import resolve_model_path
    from atom_server.sampling_params import StructuredOutputsParams

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--max-tokens", type=int, default=48)
    ap.add_argument("--device", default=None)
    ns = ap.parse_args()
    model = ns.model or resolve_model_path()
    llm = LLM(model, max_model_len=512, max_num_seqs=ns.batch, device=ns.device)
    tok = llm.get_tokenizer()
    prompts = []
    for i in range(ns.batch):
        text = tok.apply_chat_template([{"role": "user", "content": f"Describe person number {i} as JSON."}],
                                       tokenize=False, add_generation_prompt=True)
        prompts.append({"prompt_token_ids": tok(text, add_special_tokens=False)["input_ids"]})
    plain = SamplingParams(temperature=0.0, max_tokens=ns.max_tokens, ignore_eos=True)
    schema = SamplingParams(temperature=0.0, max_tokens=ns.max_tokens,
                            structured_outputs=StructuredOutputsParams(json=SCHEMA))
    run(llm, prompts[:2], schema)  # warm-up: the grammar compiler and the compiled schema are cached after this
    rows = []
    for name, params in (("plain", plain), ("json_schema", schema), ("plain", plain), ("json_schema", schema)):
        elapsed, tokens, longest = run(llm, prompts, params)
        rows.append((name, elapsed, tokens, longest))
        print(f"{name:12s} batch {ns.batch}: {tokens:5d} tokens in {elapsed:6.2f} s = {tokens / elapsed:7.1f} "
              f"tok/s, {1000 * elapsed / longest:6.1f} ms per step ({longest} steps)", flush=True)
    best = {n: max(t / e for m, e, t, _ in rows if m == n) for n in ("plain", "json_schema")}
    print(f"json_schema / plain throughput: {best['json_schema'] / best['plain']:.2f}")

    core = llm.llm_engine.core
    grammars = core.grammar_compiler.matchers(StructuredOutputsParams(json=SCHEMA), ns.batch)
    fills = []
    for _ in range(50):
        t = time.perf_counter()
        data = core.grammar_compiler.fill_bitmask(grammars)
        fills.append(time.perf_counter() - t)
    from atom.ops.sampling import apply_token_bitmask

    words = torch.frombuffer(bytearray(data), dtype=torch.int32).view(ns.batch, -1)
    logits = torch.randn(ns.batch, core.vocab_size)
    applies = []
    for _ in range(50):
        t = time.perf_counter()
        apply_token_bitmask(logits, words)
        applies.append(time.perf_counter() - t)
    print(f"per step, batch {ns.batch}: bitmask fill {1e3 * statistics.median(fills):.3f} ms "
          f"({1e6 * statistics.median(fills) / ns.batch:.1f} us per row), apply on {logits.device} "
          f"{1e3 * statistics.median(applies):.3f} ms, StepInput bitmask {len(data) / 1024:.0f} KiB")


if __name__ == "__main__":
    main()
