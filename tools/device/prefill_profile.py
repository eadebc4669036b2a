"""Where a short prefill's time goes in atom-server's engine (run on the GPU machine).

At batch 1 with 128 prompt tokens the H100 rows of 2026-12-05 / 06 read 41-55 ms a prefill for FP8 qwen3-8b and
20 ms for bf16, against vLLM's 9.1 ms (its piecewise CUDA graphs): with 127 decode steps of ~4 ms that is 7% of
batch 1's tok/s. For each engine configuration this prints the prefill-only wall time (max_tokens=1, median of
--repeats), the host time of the engine's phases on the way (perf_counter wrappers), and, from one profiled
prefill, the GPU time its kernels took against the wall (so: host-bound or GPU-bound), the kernel count, the
host-side calls that wait for the GPU (synchronize, copies to the host, item), and the ops taking the most host
time.

    PYTHONPATH=packages/atom-core/src:packages/atom-server/src python3 tools/device/prefill_profile.py \
        --preset qwen3-8b --configs 'fp8={"quantization":"fp8","kv_cache_dtype":"fp8"};bf16={}' --out $OUT/prefill.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from atom_server.bench import PRESETS, preset_checkpoint
from atom_server.llm import LLM
from atom_server.sampling_params import SamplingParams
from decode_profile import TIMES, wrap  # tools/device: the same perf_counter wrappers

SYNC_NAMES = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize", "aten::item",
              "aten::_local_scalar_dense", "cudaMemcpy", "Memcpy DtoH")


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def prompts(vocab: int, bs: int, input_len: int, seed: int) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    return [{"prompt_token_ids": torch.randint(0, vocab, (input_len,), generator=g).tolist()} for _ in range(bs)]


def one_config(label: str, preset: str, engine_args: dict, bs: int, input_len: int, repeats: int, stack: bool) -> dict:
    from torch.profiler import ProfilerActivity, profile

    model = preset_checkpoint(preset) if preset in PRESETS else preset
    args = dict(max_model_len=input_len + 8, max_num_seqs=max(bs, 1), enable_prefix_caching=False,
                skip_tokenizer_init=True)
    args.update(engine_args)
    t = time.perf_counter()
    # a preset: random weights (dummy); a folder: its own weights (e.g. materialize_checkpoint.py's)
    llm = LLM(model, load_format="dummy" if preset in PRESETS else "auto", seed=0, **args)
    init_s = time.perf_counter() - t
    eng = llm.llm_engine
    vocab = eng.runner.vocab_size
    params = SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True)
    for i in range(3):  # warm-up: JIT compiles, autotune, allocator
        llm.generate(prompts(vocab, bs, input_len, 100 + i), params, use_tqdm=False)
    sync()
    r = eng.runner
    wrap(eng, "step", "engine.step")
    wrap(r, "execute", "runner.execute")
    wrap(r, "_forward", "runner._forward")
    wrap(r.model, "compute_logits", "model.compute_logits")
    wrap(r, "_sample_rows", "runner._sample_rows")
    walls = []
    for i in range(repeats):
        ps = prompts(vocab, bs, input_len, 200 + i)
        sync()
        t = time.perf_counter()
        llm.generate(ps, params, use_tqdm=False)
        sync()
        walls.append((time.perf_counter() - t) * 1e3)
    phases = {k: dict(calls=len(v) / repeats, ms=sum(v) * 1e3 / repeats) for k, v in TIMES.items()}
    TIMES.clear()
    ps = prompts(vocab, bs, input_len, 999)
    sync()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA], with_stack=stack) as prof:
        t = time.perf_counter()
        llm.generate(ps, params, use_tqdm=False)
        sync()
        prof_wall = (time.perf_counter() - t) * 1e3
    kernels_us, kernels, host, gpu = 0.0, 0, [], []
    syncs = {}
    for ev in prof.key_averages():
        dev = getattr(ev, "self_device_time_total", None)
        dev = ev.self_cuda_time_total if dev is None else dev
        if ev.device_type == torch.autograd.DeviceType.CUDA or (dev > 0 and ev.cpu_time_total == 0):
            kernels_us += dev
            kernels += ev.count
            gpu.append(dict(name=ev.key, calls=ev.count, us=dev))
        else:
            host.append(dict(name=ev.key, calls=ev.count, self_cpu_us=ev.self_cpu_time_total,
                             cpu_us=ev.cpu_time_total))
        if any(s in ev.key for s in SYNC_NAMES):
            syncs[ev.key] = dict(calls=ev.count, cpu_us=ev.cpu_time_total)
    host.sort(key=lambda h: -h["self_cpu_us"])
    gpu.sort(key=lambda g: -g["us"])
    res = dict(label=label, preset=preset, engine_args=engine_args, batch_size=bs, input_len=input_len,
               init_s=init_s, prefill_ms=statistics.median(walls), prefill_ms_all=walls, phases_ms=phases,
               profiled_wall_ms=prof_wall, gpu_kernel_ms=kernels_us / 1e3, kernels=kernels, syncs=syncs,
               top_host=host[:30], top_kernels=gpu[:30])
    print(f"[{label}] bs={bs} input {input_len}: prefill {res['prefill_ms']:.2f} ms "
          f"[{min(walls):.2f}-{max(walls):.2f}]; profiled {prof_wall:.1f} ms wall, "
          f"GPU kernels {kernels_us / 1e3:.2f} ms "
          f"in {kernels} kernels", flush=True)
    for k, v in phases.items():
        print(f"[{label}]   {k:<24} {v['calls']:>5.1f} calls  {v['ms']:8.2f} ms", flush=True)
    for k, v in syncs.items():
        print(f"[{label}]   sync {k:<40} {v['calls']:>5} calls  {v['cpu_us'] / 1e3:8.2f} ms", flush=True)
    for g in gpu[:12]:  # where a long prefill's GPU time goes (batch 128: GEMMs, attention, quantization)
        print(f"[{label}]   gpu  {g['name'][:60]:<60} {g['calls']:>6}  {g['us'] / 1e3:8.2f} ms", flush=True)
    for h in host[:18]:
        print(f"[{label}]   host {h['name'][:60]:<60} {h['calls']:>6}  self {h['self_cpu_us'] / 1e3:7.2f} ms  "
              f"total {h['cpu_us'] / 1e3:7.2f} ms", flush=True)
    if stack:
        res["stacks"] = prof.key_averages(group_by_stack_n=6).table(sort_by="self_cpu_time_total", row_limit=25)
        print(res["stacks"], flush=True)
    del llm, eng, r
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return res


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="qwen3-8b")
    ap.add_argument("--configs", default='fp8={"quantization":"fp8","kv_cache_dtype":"fp8"};bf16={}',
                    help="label=JSON engine args, separated by ';'")
    ap.add_argument("--batch-size", type=int, default=1)
    ap.add_argument("--input-len", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--stack", action="store_true", help="group host time by Python stack (slower)")
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    results = []
    for part in a.configs.split(";"):
        label, _, js = part.partition("=")
        results.append(one_config(label.strip(), a.preset, json.loads(js or "{}"), a.batch_size, a.input_len,
                                  a.repeats, a.stack))
        import gc

        gc.collect()
    if a.out:
        with open(a.out, "w") as f:
            device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
            json.dump(dict(device=device, results=results), f, indent=1)


if __name__ == "__main__":
    main()
