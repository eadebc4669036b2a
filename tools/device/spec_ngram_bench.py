"""n-gram speculative decoding on a repetitive workload: real acceptance and speed-up against no speculation.

Greedy decoding of prompts that repeat a passage (code-edit / summarise-the-document shape, where prompt lookup
pays), with K = 0 and the given K values; prints tok/s, acceptance rate and mean acceptance length per K, the
steps by path (graph replays: decode, verify; eager), and checks the outputs equal K = 0's. Default model: the
bundled SmolLM2-135M-Instruct.

  python tools/device/spec_ngram_bench.py [--model PATH] [--ks 2,4] [--batch-sizes 1,8] [--output-len 128] [--repeats 3]
"""

from __future__ import annotations

import argparse
import time

from atom_server import LLM, SamplingParams

PASSAGE = ("def add(a, b):\n    return a + b\n\ndef sub(a, b):\n    return a - b\n\n"
           "def mul(a, b):\n    return a * b\n\n")


def _paths(llm: LLM) -> dict[str, int]:
    """Steps by path so far: graph replays by kind (decode, verify) and eager steps."""
    runner = llm.llm_engine.runner
    graphs = runner.graphs
    return {**(dict(graphs.replays) if graphs is not None else {}), "eager": runner.eager_steps}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None)
    ap.add_argument("--ks", default="2,4")
    ap.add_argument("--batch-sizes", default="1,8")
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--device", default=None)
    ap.add_argument("--repeats", type=int, default=3, help="timed runs per (K, batch): the median and min-max")
    ns = ap.parse_args()
    ks = [0] + [int(k) for k in ns.ks.split(",")]
    sizes = [int(b) for b in ns.batch_sizes.split(",")]
    params = SamplingParams(temperature=0.0, max_tokens=ns.output_len, ignore_eos=True)
    prompts = [f"Repeat the following code exactly, {i} times:\n" + PASSAGE * 3 for i in range(max(sizes))]
    base: dict[int, list] = {}
    for k in ks:
        spec = None if k == 0 else {"method": "ngram", "num_speculative_tokens": k, "prompt_lookup_max": 4,
                                    "prompt_lookup_min": 2}
        extra = {"device": ns.device} if ns.device else {}
        llm = LLM(ns.model, max_model_len=1024, max_num_seqs=max(sizes), speculative_config=spec, **extra)
        for b in sizes:
            llm.generate(prompts[:b], SamplingParams(temperature=0.0, max_tokens=8), use_tqdm=False)  # warm-up
            before = llm.llm_engine.stats()
            paths_before = _paths(llm)
            times = []
            for _ in range(ns.repeats):  # the same greedy work each time: the median and the spread
                t = time.perf_counter()
                outs = llm.generate(prompts[:b], params, use_tqdm=False)
                times.append(time.perf_counter() - t)
            times.sort()
            dt = times[len(times) // 2]
            after = llm.llm_engine.stats()
            tokens = [o.outputs[0].token_ids for o in outs]
            if k == 0:
                base[b] = tokens
            same = tokens == base[b]
            d = {n: after.get(n, 0) - before.get(n, 0) for n in ("spec_decode_num_drafts",
                                                                   "spec_decode_num_draft_tokens",
                                                                   "spec_decode_num_accepted_tokens")}
            rate = d["spec_decode_num_accepted_tokens"] / max(d["spec_decode_num_draft_tokens"], 1)
            mean_len = 1 + d["spec_decode_num_accepted_tokens"] / max(d["spec_decode_num_drafts"], 1)
            paths = {n: v - paths_before.get(n, 0) for n, v in _paths(llm).items()}
            spread = f"[{b * ns.output_len / times[-1]:.1f}-{b * ns.output_len / times[0]:.1f}]"
            print(f"K={k} batch={b}: {b * ns.output_len / dt:8.1f} tok/s {spread} n={len(times)}  acceptance {rate:.2f}  "
                  f"mean acceptance length {mean_len:.2f}  same as K=0: {same}  steps {paths}", flush=True)
        llm.llm_engine.shutdown()
        del llm


if __name__ == "__main__":
    main()
