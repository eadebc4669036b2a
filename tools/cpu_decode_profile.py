"""Where a CPU decode step's time goes: ATOM's model alone (no engine, no scheduler), paged KV cache, greedy.

    python tools/cpu_decode_profile.py /tmp/smollm2-135m-instruct --batch-sizes 1,32 --threads 1 --profile

Per batch size: prefill `batch` random prompts of --context tokens, then time --steps decode steps (forward +
LM head + argmax) and print ms/step (median, min-max), wall and this process's CPU time (with one thread,
CPU time leaves out the time other processes took the core: steadier on a shared machine). --profile adds torch.profiler's op table of a few
steps (self CPU time) and the share of the step spent outside torch ops (Python). --compile runs the
decode steps through atom-server's compiled CPU forward (atom_server.engine.cpu_compile) instead of eager.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from atom.forward_context import set_forward_context
from atom.layers.attention import PagedAttentionMetadata
from atom.layers.kv_cache import allocate_kv_caches, bind_kv_caches, kv_cache_specs
from atom.loader import load_model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model")
    ap.add_argument("--batch-sizes", default="1,32")
    ap.add_argument("--context", type=int, default=160, help="tokens already in the cache at the first step")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--compile", action="store_true", help="atom-server's compiled decode step")
    ap.add_argument("--rows", type=int, default=25, help="rows of the profiler table")
    ns = ap.parse_args()
    torch.set_num_threads(ns.threads)
    model, config = load_model(ns.model, dtype=ns.dtype, device="cpu", max_positions=4096)
    bs_list = [int(b) for b in ns.batch_sizes.split(",")]
    blocks_per_seq = -(-(ns.context + ns.steps * 4 + 8) // ns.block_size)
    caches = allocate_kv_caches(kv_cache_specs(model), max(bs_list) * blocks_per_seq + 1, ns.block_size, "cpu")
    bind_kv_caches(model, caches)
    gen = torch.Generator().manual_seed(0)
    compiled = None
    if ns.compile:
        from atom_server.engine.cpu_compile import CompiledForward

        compiled = CompiledForward(model)
        print(f"compiled in {compiled.warm_up(windowed=False):.1f} s", flush=True)
    for bs in bs_list:
        tables = torch.arange(bs * blocks_per_seq, dtype=torch.int32).view(bs, blocks_per_seq) + 1
        lens = torch.full((bs,), ns.context, dtype=torch.int32)

        def meta(q_lens: torch.Tensor, positions: torch.Tensor, row_of_token: torch.Tensor):
            slots = tables[row_of_token, positions // ns.block_size].long() * ns.block_size + positions % ns.block_size
            qsl = torch.zeros(bs + 1, dtype=torch.int32)
            qsl[1:] = torch.cumsum(q_lens, 0)
            return PagedAttentionMetadata(slots, tables, qsl, lens.clone(), int(q_lens.max()), int(lens.max()))

        with torch.inference_mode():
            # prefill in one batch
            ids = torch.randint(0, config.vocab_size, (bs * ns.context,), generator=gen)
            pos = torch.arange(ns.context).repeat(bs)
            rows = torch.arange(bs).repeat_interleave(ns.context)
            with set_forward_context(meta(torch.full((bs,), ns.context), pos, rows)):
                hidden = model(ids, pos)
            last = torch.arange(1, bs + 1) * ns.context - 1
            tok = model.compute_logits(hidden[last]).argmax(-1)

            def decode_step() -> None:
                nonlocal tok
                positions = lens.long()
                lens.add_(1)
                md = meta(torch.ones(bs, dtype=torch.int32), positions, torch.arange(bs))
                if compiled is not None:
                    md.traceable = True
                    _, tok = compiled.decode(tok, positions, md)
                    return
                with set_forward_context(md):
                    h = model(tok, positions)
                tok = model.compute_logits(h).float().argmax(-1)

            for _ in range(3):
                decode_step()
            times, cpu = [], []
            for _ in range(ns.steps):
                t, c = time.perf_counter(), time.process_time()
                decode_step()
                times.append((time.perf_counter() - t) * 1e3)
                cpu.append((time.process_time() - c) * 1e3)
            print(f"batch {bs}: {statistics.median(times):.2f} ms/step [{min(times):.2f}-{max(times):.2f}], CPU time "
                  f"{statistics.median(cpu):.2f} ms/step [{min(cpu):.2f}-{max(cpu):.2f}] over {ns.steps} steps at "
                  f"context {ns.context}", flush=True)
            if ns.profile:
                from torch.profiler import ProfilerActivity, profile

                n = 5
                t = time.perf_counter()
                with profile(activities=[ProfilerActivity.CPU]) as prof:
                    for _ in range(n):
                        decode_step()
                wall = (time.perf_counter() - t) * 1e3 / n
                avgs = prof.key_averages()
                ops = sum(e.self_cpu_time_total for e in avgs) / 1e3 / n
                calls = sum(e.count for e in avgs) / n
                print(f"  profiled: {wall:.2f} ms/step wall (profiler on), {ops:.2f} ms in {calls:.0f} op calls/step")
                print(avgs.table(sort_by="self_cpu_time_total", row_limit=ns.rows))


if __name__ == "__main__":
    main()
