"""Count, on a CPU, the Triton compiles a GPU start-up would do: every kernel launch of the decode graphs of each
captured batch size (and of a few prefills) is keyed exactly as Triton's JIT keys it, with Triton's own binder
(types, constexprs, an int equal to 1 turned into a constant, divisibility by 16 of ints and pointers,
do_not_specialize honoured), plus num_warps/num_stages. A key not seen before is one compile on the GPU.

    python tools/triton_specializations.py --preset qwen3-30b-a3b --layers 2 --max-num-seqs 128 \\
        --max-model-len 256 --prefill-lens 128,255,256

Runs the model under Triton's interpreter with ATOM's Triton kernels (ATOM_KERNEL_BACKEND=triton), random
weights, `--layers` layers of the preset (specialisation does not depend on depth), the graphs' own input
buffers (ATOM_DECODE_GRAPHS=static). By default the kernels are only keyed, not run (fast; their outputs are
garbage, which no host code reads); --execute runs them too. Device properties the wrappers read are set to
an H200's (--sms 132, 227 KiB of shared memory per block), so tile and split choices match the device's.
The device-side truth is `atom bench throughput --startup-profile` (atom.ops.compile_log).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported
os.environ.setdefault("ATOM_KERNEL_BACKEND", "triton")
os.environ["ATOM_DECODE_GRAPHS"] = "static"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="qwen3-0.6b")
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--max-num-seqs", type=int, default=128)
    p.add_argument("--max-model-len", type=int, default=256)
    p.add_argument("--prefill-lens", default="128,255", help="prompt lengths of single-sequence prefills to key")
    p.add_argument("--sms", type=int, default=132, help="multiprocessors of the emulated GPU (H200: 132)")
    p.add_argument("--smem-kib", type=int, default=227, help="shared memory per block of the emulated GPU")
    p.add_argument("--kv-mib", type=int, default=512, help="KV cache of the CPU runner (must hold max_model_len)")
    p.add_argument("--execute", action="store_true", help="run the kernels too (slow)")
    p.add_argument("--json", default=None, help="write the census here")
    ns = p.parse_args(argv)

    import numpy as np
    import torch
    import triton
    from triton.backends.compiler import BaseBackend
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction, create_function_from_signature

    import atom.ops.triton_kernels as tk
    from atom.ops.compile_log import Compile, CompileLog
    from atom.ops.triton_kernels import common
    from atom_server.bench import PRESETS, _COMMON
    from atom_server.engine.model_runner import ModelRunner

    common.shared_memory_limit = lambda device: ns.smem_kib * 1024  # fit_tile reads it from common
    for mod in list(sys.modules.values()):
        if getattr(mod, "__name__", "").startswith(tk.__name__) and hasattr(mod, "num_sms"):
            mod.num_sms = lambda device: ns.sms

    log = CompileLog()
    seen: set = set()
    binders: dict = {}

    def binder_of(fn: InterpretedFunction):
        if fn.fn not in binders:
            kw = {k: v for k, v in fn.kwargs.items() if k in ("do_not_specialize", "do_not_specialize_on_alignment")}
            jf = JITFunction(fn.fn, **kw)
            binders[fn.fn] = create_function_from_signature(jf.signature, jf.params, BaseBackend)
        return binders[fn.fn]

    real_run = InterpretedFunction.run

    def keyed_run(self, *args, grid, warmup, **kwargs):
        opts = {k: kwargs[k] for k in ("num_warps", "num_stages") if k in kwargs}
        launch = {k: v for k, v in kwargs.items() if k not in ("num_warps", "num_stages", "num_ctas")}
        _, spec, _ = binder_of(self)(*args, **launch)
        key = (self.fn.__qualname__, tuple(map(str, spec)), tuple(sorted(opts.items())))
        if key not in seen:
            seen.add(key)
            names = [n for n in self.arg_names]
            desc = {n: (f"={v}" if t == "constexpr" else t + (":16" if v == "D" else ""))
                    for n, (t, v) in zip(names, spec)}
            desc.update({k: str(v) for k, v in opts.items()})
            log.compiles.append(Compile(self.fn.__qualname__, log.label, 0.0, desc))
        if ns.execute:
            return real_run(self, *args, grid=grid, warmup=warmup, **kwargs)
        return None

    InterpretedFunction.run = keyed_run

    folder = tempfile.mkdtemp(prefix="atom-spec-")
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump({**_COMMON, **PRESETS[ns.preset], "num_hidden_layers": ns.layers}, f)
    log.label = "build"
    runner = ModelRunner(folder, dtype="bfloat16", device=torch.device("cpu"), block_size=16,
                         max_model_len=ns.max_model_len, max_num_seqs=ns.max_num_seqs,
                         max_num_batched_tokens=8192, kv_cache_memory_bytes=ns.kv_mib << 20, gpu_memory_utilization=0.9,
                         load_format="dummy")
    g = runner.graphs
    with torch.inference_mode():
        for bs in reversed(g.sizes):  # the capture order of cuda_graphs.py
            log.label = f"graph bs={bs}"
            g.replay(bs, bs)
        vocab = runner.vocab_size
        for n in [int(x) for x in ns.prefill_lens.split(",") if x]:
            log.label = f"prefill {n} tokens"
            tables = runner.tables
            tables.table[0, :] = np.arange(tables.table.shape[1]) % runner.num_blocks
            tables.num_blocks[0] = -(-n // 16)
            if tables.windowed:  # sliding-window layers' own pool (gpt-oss)
                tables.window[0, :] = np.arange(tables.window.shape[1]) % runner.num_window_blocks
                tables.window_num_blocks[0] = -(-n // 16)
            qsl = np.array([0, n])
            pos = np.arange(n)
            rows = np.zeros(n, dtype=np.int64)
            slots = tables.slots(rows, pos)
            window_slots = tables.slots(rows, pos, window=True) if tables.windowed else None
            runner._forward(np.random.randint(0, vocab, n), pos, slots, window_slots, qsl, np.array([n]),
                            np.array([0]))
    InterpretedFunction.run = real_run
    print(f"{ns.preset} ({ns.layers} layers), decode graphs for batch sizes {g.sizes}, max_model_len "
          f"{ns.max_model_len}, {ns.sms} SMs; Triton {triton.__version__}")
    print(log.format(top=40, timed=False))
    if ns.json:
        with open(ns.json, "w") as f:
            json.dump(log.report(), f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
