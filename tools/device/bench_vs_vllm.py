#!/usr/bin/env python3
"""ATOM vs vLLM on one GPU machine, in one call: the PERF.md workload on preset shapes.

  bash tools/device/bench_vs_vllm.sh --shapes qwen3-0.6b [--engines atom,vllm,atom-vllm] [--budget-s 500]
      [--tp 2 [--ep]]   (tensor / expert parallel over the first N GPUs, the same for every engine)
  bash tools/device/bench_vs_vllm.sh --shapes qwen3-8b --quantization fp8 --kv-cache-dtype fp8 --engines atom,vllm,atom-base

(the .sh sets up /tmp/site first; tools/device/README.md has the whole sequence of device calls.)
For each shape: one config-only checkpoint (atom_server.bench.preset_checkpoint) shared by the engines,
then each engine in its own fresh process, --repeats times interleaved (A B C A B C ...), under a time budget:
  atom       atom-server's offline engine (`python -m atom_server.bench_cli throughput`)
  vllm       vLLM's built-in model (tools/device/vllm_throughput.py) from a PYTHONPATH without any atom
             package (setup_device.sh keeps the atom wheels in their own site; the script refuses to run
             when atom is importable)
  atom-vllm  vLLM running ATOM's model through the atom-vllm plugin (the same script, plugin on)
  atom-base  atom-server without --quantization / --kv-cache-dtype (ATOM's bf16 next to its FP8 run)
  atom-alt   atom-server with the environment of --alt-env added (an A/B of one switch, e.g.
             --alt-env ATOM_FP8_SCALED_MM=0, in the same call and rounds)
  atom-alt2  the same with --alt2-env (a second switch in the same rounds)
  atom-vllm-alt  atom-vllm with the environment of --vllm-alt-env added (the same A/B inside vLLM+ATOM, e.g.
             --engines atom-vllm,atom-vllm-alt --vllm-alt-env ATOM_ATTN_DECODE_PROGRAMS_PER_SM=1; plugin on,
             from atom-vllm's site)
--quantization fp8 and --kv-cache-dtype fp8 go to every engine but atom-base (random bf16 weights quantized
at load time: ATOM per output channel, vLLM 0.24 per tensor; both read one byte per weight).
Every engine draws the same random weights (ATOM's load_format=dummy is vLLM's rule), or, with --materialize,
loads one random checkpoint written to disk first (MoE shapes: the same routing in every engine). Writes
$OUT/bench_<shape>_<HHMMSS>.json (after every run, so a cut-off call keeps what finished) with the device
session it ran in (make_table.py pairs engines of one session only) and the matching .log, and prints
the table of make_table.py (medians and min-max spread over the repeats).
Once per device session (--crosscheck once), after a shape whose vllm engine measured, vLLM's own driver (`vllm bench
latency`, tools/device/vllm_crosscheck.py) times one batch size of the same setup from the same atom-free site,
and the JSON records its times against our harness's (issue 16's method: our vLLM figures checked by vLLM's code).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

BANDWIDTH_PROBE = r"""
import json, torch
n = 1 << 30  # 2 GiB of bf16, random (never time on zeros)
a = torch.randn(n, dtype=torch.bfloat16, device="cuda"); b = torch.empty_like(a)
for _ in range(3): b.copy_(a)
s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
times = []
for _ in range(10):
    torch.cuda.synchronize(); s.record(); b.copy_(a); e.record(); e.synchronize(); times.append(s.elapsed_time(e))
ms = sorted(times)[len(times) // 2]
print(json.dumps({"bandwidth_gbps": 2 * a.numel() * a.element_size() / ms / 1e6,
                  "device": torch.cuda.get_device_name(0), "torch": torch.__version__}))
"""


def write_tokenizer(folder: str, vocab_size: int | None = None) -> None:
    """A WordLevel tokenizer beside the config: vLLM runs with skip_tokenizer_init, but some of its start-up
    checks look for tokenizer files in the model folder (12 words do). With vocab_size, one word per id
    ("w<id>"), so servers can detokenize every id a random-weight model samples (online serving benchmarks)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<unk>", "<|endoftext|>"] + "the a of to and in is it you that".split()
    if vocab_size:
        words = ["<unk>", "<|endoftext|>"] + [f"w{i}" for i in range(2, vocab_size)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<|endoftext|>",
                            pad_token="<|endoftext|>").save_pretrained(folder)


def make_checkpoint(shape: str, root: str) -> tuple[str, str, dict]:
    """(name, folder, config) for a preset shape, or for a config folder given as a path (CPU dry runs)."""
    from atom_server.bench import preset_checkpoint

    if os.path.isdir(shape):
        name, folder = os.path.basename(os.path.normpath(shape)), shape
    else:
        name, folder = shape, os.path.join(root, shape)
        os.makedirs(folder, exist_ok=True)
        preset_checkpoint(shape, folder)
    if not os.path.exists(os.path.join(folder, "tokenizer.json")):
        write_tokenizer(folder)
    with open(os.path.join(folder, "config.json")) as f:
        return name, folder, json.load(f)


def wants_materialize(mode: str, config: dict, engines: list[str]) -> bool:
    """--materialize on / off, or auto: on for an MoE config that vLLM (with or without ATOM) runs, where dummy
    routers leave the routing to each engine's rounding of near-uniform logits."""
    moe = any(config.get(k) for k in ("num_experts", "n_routed_experts", "num_local_experts"))
    return mode == "on" or (mode == "auto" and moe and bool({"vllm", "atom-vllm", "atom-vllm-alt"} & set(engines)))


def run_logged(cmd: list[str], env: dict[str, str], log, timeout_s: float, tag: str) -> tuple[int | None, str]:
    """Run cmd in its own process group, echo its output with a tag into stdout and the log; kill the whole
    group (vLLM's engine-core children too) at the timeout and when it ends. Returns (rc or None, output)."""
    log.write(f"\n===== {tag}: {' '.join(cmd)}\n")
    log.flush()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            errors="replace", start_new_session=True)
    lines: list[str] = []

    def pump() -> None:  # a thread, so the deadline holds however the child writes
        for line in proc.stdout:
            lines.append(line)
            log.write(line)
            sys.stdout.write(f"[{tag}] {line}")

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    timed_out = False
    try:
        proc.wait(timeout_s)
    except subprocess.TimeoutExpired:
        timed_out = True
    finally:
        _kill_group(proc)
        reader.join(10)
        log.flush()
        sys.stdout.flush()
    return (None if timed_out else proc.returncode), "".join(lines)


def _kill_group(proc: subprocess.Popen) -> None:
    for sig, wait_s in ((signal.SIGTERM, 15), (signal.SIGKILL, 5)):
        try:
            os.killpg(proc.pid, sig)  # the group this script started for proc; nothing else
        except ProcessLookupError:
            return
        try:
            proc.wait(wait_s)
        except subprocess.TimeoutExpired:
            continue
        # the leader is gone; its children may still be up for a moment
        time.sleep(1)


ATOM_MODULES = ("atom", "atom_server", "atom_vllm", "atom_sglang")


def has_atom(entry: str) -> bool:
    """Whether a PYTHONPATH entry provides an atom package (a source tree or an installed wheel)."""
    if not os.path.isdir(entry):
        return False
    names = os.listdir(entry)
    return any(n in ATOM_MODULES for n in names) or any(n.startswith("atom_") and n.endswith(".dist-info")
                                                        for n in names)


def without_atom(pythonpath: str) -> str:
    """PYTHONPATH less every entry that provides atom: vLLM's baseline must not even see atom installed."""
    return os.pathsep.join(e for e in pythonpath.split(os.pathsep) if e and not has_atom(e))


def atom_env_of_call(environ: dict[str, str] | None = None) -> str:
    """The call's own ATOM_* settings as sorted NAME=VALUE pairs ('' for none); the device scripts' own variables
    (ATOM_SITE*, ATOM_TEST_*, ATOM_GPU_TEST_*) are no engine settings."""
    environ = os.environ if environ is None else environ
    return " ".join(f"{k}={v}" for k, v in sorted(environ.items()) if k.startswith("ATOM_")
                    and not k.startswith(("ATOM_SITE", "ATOM_TEST_", "ATOM_GPU_TEST_")))


def session_id() -> str:
    """The device session: one id per machine start (a fresh machine has an empty /tmp). make_table.py
    compares engines only within one session: two machines (or two starts of one) differ by more than the
    engines do."""
    path = "/tmp/atom-bench-session"
    if not os.path.exists(path):
        import uuid

        with open(path, "w") as f:
            f.write(f"{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:8]}")
    with open(path) as f:
        return f.read().strip()


# the alt engines: each is the engine it alters plus NAME=VALUE pairs of its flag in the environment
ALT_ENV_FLAGS = {"atom-alt": "--alt-env", "atom-alt2": "--alt2-env", "atom-vllm-alt": "--vllm-alt-env"}
ALT_OF = {"atom-alt": "atom", "atom-alt2": "atom", "atom-vllm-alt": "atom-vllm"}
ALT_ENGINES = tuple(ALT_ENV_FLAGS)
ATOM_ENGINES = ("atom", "atom-base", "atom-alt", "atom-alt2")
ENGINES = ("atom", "vllm", "atom-vllm", "atom-base", *ALT_ENGINES)
# names --vllm-alt-env may not set: they would turn the plugin off or change the site atom-vllm-alt runs from,
# and the A/B would no longer be one ATOM switch inside the same vLLM+ATOM
VLLM_ALT_FIXED = ("ATOM_DISABLE_VLLM_PLUGIN", "PYTHONPATH")


def alt_env(engine: str, ns: argparse.Namespace) -> str:
    """The NAME=VALUE pairs an alt engine adds to the environment ('' for the others)."""
    return {"atom-alt": ns.alt_env, "atom-alt2": ns.alt2_env, "atom-vllm-alt": ns.vllm_alt_env}.get(engine, "")


def engine_command(engine: str, model: str, ns: argparse.Namespace, out_json: str) -> tuple[list[str], dict]:
    common = ["--input-len", str(ns.input_len), "--output-len", str(ns.output_len),
              "--warmup-runs", str(ns.warmup_runs),
              "--batch-sizes", ns.batch_sizes, "--dtype", ns.dtype, "--output-json", out_json,
              "--tensor-parallel-size", str(ns.tp)] + (["--enable-expert-parallel"] if ns.ep else [])
    env = dict(os.environ)
    quant = []
    if engine != "atom-base":
        quant += ["--quantization", ns.quantization] if ns.quantization else []
        quant += ["--kv-cache-dtype", ns.kv_cache_dtype] if ns.kv_cache_dtype != "auto" else []
    for pair in alt_env(engine, ns).split():
        name, _, value = pair.partition("=")
        env[name] = value
    if engine in ATOM_ENGINES:
        cmd = [sys.executable, "-m", "atom_server.bench_cli", "throughput", "--model", model, "--load-format",
               ns.load_format, "--gpu-memory-utilization", str(ns.gpu_memory_utilization), *common, *quant,
               *ns.atom_args.split()]
    else:
        cmd = [sys.executable, os.path.join(HERE, "vllm_throughput.py"), "--model", model, "--load-format", ns.load_format,
               "--gpu-memory-utilization", str(ns.gpu_memory_utilization), *common, *quant, *ns.vllm_args.split()]
        if engine == "vllm":
            env["ATOM_DISABLE_VLLM_PLUGIN"] = "1"  # belt and braces: atom is not importable at all
            env["PYTHONPATH"] = without_atom(env.get("PYTHONPATH", ""))
            cmd.append("--expect-no-atom")
        else:  # atom-vllm and atom-vllm-alt: the plugin on, from the PYTHONPATH this script was given
            env.pop("ATOM_DISABLE_VLLM_PLUGIN", None)
    return cmd, env


CROSSCHECK_MARKER = "/tmp/atom-bench-crosscheck"  # written once a cross-check compared both drivers (per machine start)


def crosscheck_batch(ns: argparse.Namespace) -> int:
    sizes = [int(b) for b in ns.batch_sizes.split(",")]
    if ns.crosscheck_batch is not None:
        return ns.crosscheck_batch
    return 32 if 32 in sizes else max(sizes)


def crosscheck_command(model: str, ns: argparse.Namespace, harness: list[str], out_json: str) -> tuple[list[str], dict]:
    """vllm_crosscheck.py with the vllm engine's setup, from the vllm engine's environment (no atom)."""
    cmd = [sys.executable, os.path.join(HERE, "vllm_crosscheck.py"), "--model", model, "--batch-size",
           str(crosscheck_batch(ns)), "--input-len", str(ns.input_len), "--output-len", str(ns.output_len),
           "--dtype", ns.dtype, "--load-format", ns.load_format, "--gpu-memory-utilization",
           str(ns.gpu_memory_utilization), "--tensor-parallel-size", str(ns.tp), "--output-json", out_json,
           "--expect-no-atom", "--harness-json", *harness]
    cmd += ["--enable-expert-parallel"] if ns.ep else []
    cmd += ["--quantization", ns.quantization] if ns.quantization else []
    cmd += ["--kv-cache-dtype", ns.kv_cache_dtype] if ns.kv_cache_dtype != "auto" else []
    cmd += ["--enforce-eager"] if "--enforce-eager" in ns.vllm_args.split() else []
    env = dict(os.environ)
    env["ATOM_DISABLE_VLLM_PLUGIN"] = "1"
    env["PYTHONPATH"] = without_atom(env.get("PYTHONPATH", ""))
    return cmd, env


def run_crosscheck(bench: dict, model: str, ns: argparse.Namespace, tag: str, log, left: float) -> dict | None:
    """vLLM's own driver against this call's vllm runs (see the module docstring); None when not due."""
    if ns.crosscheck == "off" or "vllm" not in ns.engines.split(","):
        return None
    if ns.crosscheck == "once" and os.path.exists(CROSSCHECK_MARKER):
        with open(CROSSCHECK_MARKER) as f:
            return dict(skipped=f"done earlier in this session ({f.read().strip()})")
    harness = []
    for rnd, reports in enumerate(bench["repeats"]):
        rep = reports.get("vllm")
        if rep and rep.get("runs") and "error" not in rep:
            harness.append(os.path.join("/tmp/bench_parts", f"crosscheck_harness_{tag}_{rnd}.json"))
            with open(harness[-1], "w") as f:
                json.dump(rep, f)
    if not harness:
        return dict(skipped="no vllm run measured in this call")
    if left < ns.min_engine_s:
        return dict(skipped=f"{left:.0f} s of the budget left")
    out_json = os.path.join("/tmp/bench_parts", f"crosscheck_{tag}.json")
    if os.path.exists(out_json):
        os.remove(out_json)
    cmd, env = crosscheck_command(model, ns, harness, out_json)
    started = time.monotonic()
    rc, text = run_logged(cmd, env, log, min(ns.engine_timeout_s, left), "crosscheck")
    if rc != 0 or not os.path.exists(out_json):
        lines = text.strip().splitlines()
        why = "timed out" if rc is None else f"exit status {rc}"
        return dict(error=f"{why} after {time.monotonic() - started:.0f} s: " + " / ".join(lines[-3:])[-600:])
    with open(out_json) as f:
        result = json.load(f)
    if result.get("ratio") is not None:
        with open(CROSSCHECK_MARKER, "w") as f:
            f.write(f"{bench['session']}, {bench['shape']} at {bench['time']}")
    return result


def run_engine(engine: str, model: str, ns: argparse.Namespace, tag: str, log, timeout_s: float,
               rnd: int) -> dict:
    """One fresh process of one engine; its report (partial when cut short) with took_s and any error."""
    out_json = os.path.join("/tmp/bench_parts", f"{engine}_{tag}_{rnd}.json")
    if os.path.exists(out_json):
        os.remove(out_json)
    cmd, env = engine_command(engine, model, ns, out_json)
    started = time.monotonic()
    rc, text = run_logged(cmd, env, log, timeout_s, f"{engine} #{rnd + 1}")
    took = time.monotonic() - started
    rep: dict = {}
    if os.path.exists(out_json):  # written after every batch size: partial when cut short
        with open(out_json) as f:
            rep = json.load(f)
    if rc != 0:
        why = "timed out" if rc is None else f"exit status {rc}"
        lines = text.strip().splitlines()
        errors = [ln for ln in lines if "Error" in ln or "error" in ln] or lines
        rep["error"] = f"{why} after {took:.0f} s: " + " / ".join(errors[-3:])[-600:]
    rep["took_s"] = took
    if engine in ALT_ENGINES:
        rep["alt_env"] = alt_env(engine, ns)
    if engine not in ATOM_ENGINES:
        rep["atom_model_built"] = "ATOM built atom_vllm.models" in text
    return rep


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The flags, checked before any engine starts (a malformed one would otherwise cost a device call)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shapes", default="qwen3-0.6b",
                   help="comma-separated presets (qwen3-0.6b,qwen3-8b,qwen3-30b-a3b,deepseek-v2-lite) or config "
                        "folders")
    p.add_argument("--engines", default="atom,vllm,atom-vllm")
    p.add_argument("--batch-sizes", default="1,32,128")
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--gpu-memory-utilization", type=float, default=0.85)
    p.add_argument("--repeats", type=int, default=3,
                   help="fresh-process runs of each engine, interleaved (A B C A B C ...); the table shows medians "
                        "and the min-max spread")
    p.add_argument("--budget-s", type=float, default=500, help="stop starting engines past this many seconds")
    p.add_argument("--engine-timeout-s", type=float, default=240, help="most seconds one engine may take")
    p.add_argument("--min-engine-s", type=float, default=90, help="skip an engine with less time than this left")
    p.add_argument("--quantization", default=None, help="fp8: every engine but atom-base quantizes at load time")
    p.add_argument("--kv-cache-dtype", default="auto", help="fp8: every engine but atom-base stores an FP8 KV cache")
    p.add_argument("--tp", type=int, default=1, help="tensor_parallel_size of every engine")
    p.add_argument("--ep", action="store_true", help="expert parallelism in every engine (MoE shapes)")
    p.add_argument("--alt-env", default="", help="for the atom-alt engine: NAME=VALUE pairs, space-separated")
    p.add_argument("--alt2-env", default="", help="for the atom-alt2 engine: NAME=VALUE pairs, space-separated")
    p.add_argument("--vllm-alt-env", default="",
                   help="for the atom-vllm-alt engine (atom-vllm with these): NAME=VALUE pairs, space-separated")
    p.add_argument("--atom-args", default="", help="extra flags for atom bench throughput")
    p.add_argument("--warmup-runs", type=int, default=1,
                   help="untimed full + prefill-only runs per batch size, in every engine")
    p.add_argument("--vllm-args", default="", help="extra flags for vllm_throughput.py (e.g. --enforce-eager)")
    p.add_argument("--materialize", nargs="?", const="on", default="auto", choices=["auto", "on", "off"],
                   help="every engine loads one random checkpoint written to disk (materialize_checkpoint.py) instead "
                        "of drawing dummy weights: the same MoE routing in every engine. auto (the default): on for "
                        "an MoE shape that a vLLM engine runs (dummy routers give near-uniform logits, and vLLM's "
                        "batches then read a few experts: qwen3-30b-a3b FP8 at batch 32 ran at 153%% of the roofline "
                        "on 2026-12-06), off otherwise (ATOM against ATOM routes alike)")
    p.add_argument("--router-scale", type=float, default=1.0, help="with --materialize: the routers' uniform bound")
    p.add_argument("--crosscheck", choices=["once", "off", "always"], default="once",
                   help="vLLM's own driver (vllm bench latency) against our vllm runs: once per device session (the "
                        "first shape whose vllm engine measured), never, or after every shape")
    p.add_argument("--crosscheck-batch", type=int, default=None,
                   help="the batch size of the cross-check (default: 32 when measured, else the largest)")
    p.add_argument("--out", default=os.environ.get("OUT") or "/tmp/bench-out")
    ns = p.parse_args(argv)
    if ns.crosscheck_batch is not None and str(ns.crosscheck_batch) not in ns.batch_sizes.split(","):
        p.error(f"--crosscheck-batch {ns.crosscheck_batch} is not one of --batch-sizes {ns.batch_sizes}")
    unknown = [e for e in ns.engines.split(",") if e not in ENGINES]
    if unknown:  # an unknown name would run as atom-vllm (the last branch of engine_command)
        p.error(f"unknown engine(s) {','.join(unknown)}; the engines are {','.join(ENGINES)}")
    for engine, flag in ALT_ENV_FLAGS.items():
        pairs = alt_env(engine, ns).split()
        bad = [pair for pair in pairs if not pair.partition("=")[0] or "=" not in pair]
        if bad:
            p.error(f"{flag} takes NAME=VALUE pairs, got {' '.join(bad)!r}")
        if engine in ns.engines.split(",") and not pairs:
            p.error(f"the {engine} engine needs {flag} NAME=VALUE ... (what it changes against {ALT_OF[engine]})")
    fixed = [pair for pair in ns.vllm_alt_env.split() if pair.partition("=")[0] in VLLM_ALT_FIXED]
    if fixed:
        p.error(f"--vllm-alt-env may not set {' '.join(fixed)!r}: atom-vllm-alt runs with the plugin on, from "
                "atom-vllm's site")
    if ns.warmup_runs < 0:
        p.error("--warmup-runs must be >= 0")
    return ns


def main(argv: list[str] | None = None) -> int:
    ns = parse_args(argv)
    t0 = time.monotonic()
    os.makedirs(ns.out, exist_ok=True)
    parts = "/tmp/bench_parts"
    os.makedirs(parts, exist_ok=True)
    import make_table

    probe = subprocess.run([sys.executable, "-c", BANDWIDTH_PROBE], capture_output=True, text=True, timeout=120)
    hw = json.loads(probe.stdout.strip().splitlines()[-1]) if probe.returncode == 0 else {}
    print("device:", hw or probe.stderr[-2000:], flush=True)
    benches = []
    for shape in ns.shapes.split(","):
        shape, model, config = make_checkpoint(shape, "/tmp/bench_models")
        ns.load_format = "dummy"
        materialize = wants_materialize(ns.materialize, config, ns.engines.split(","))
        if materialize:
            # in its own process: the weights it builds on the GPU stay reserved by the caching allocator of
            # the process that built them (on 2026-12-02 this process kept 48 GiB, and vLLM, asking for 85% of
            # the GPU at start, refused to run)
            t = time.monotonic()
            out_dir = model + "-weights"
            subprocess.run([sys.executable, os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                                         "materialize_checkpoint.py"), model, out_dir,
                            "--router-scale", str(ns.router_scale)], check=True, timeout=900)
            model = out_dir
            ns.load_format = "auto"
            print(f"materialized random weights in {model} ({time.monotonic() - t:.0f} s)", flush=True)
        par = (f"_tp{ns.tp}" if ns.tp > 1 else "") + ("_ep" if ns.ep else "")
        bench = dict(shape=shape + par, device=hw.get("device"), bandwidth_gbps=hw.get("bandwidth_gbps"),
                     date=time.strftime("%Y-%m-%d"), time=time.strftime("%H:%M:%S"), input_len=ns.input_len, output_len=ns.output_len,
                     dtype=ns.dtype, config=config, quantization=ns.quantization, kv_cache_dtype=ns.kv_cache_dtype,
                     tensor_parallel_size=ns.tp, expert_parallel=ns.ep, warmup_runs=ns.warmup_runs,
                     weights=f"materialized (routers ±{ns.router_scale})" if materialize else "dummy",
                     command="bash tools/device/bench_vs_vllm.sh " + " ".join(sys.argv[1:] if argv is None else argv),
                     engines={})
        variant = make_table.variant(bench)
        variant = "_" + variant if variant else ""
        stem = f"bench_{shape}{par}{variant}_{time.strftime('%H%M%S')}"  # calls keep their files
        path = os.path.join(ns.out, stem + ".json")
        bench["session"] = session_id()
        # the ATOM_* switches this call ran every ATOM engine with (`ATOM_MX_FRAG=1 bash bench_vs_vllm.sh ...`):
        # make_table.py keeps calls with different ones apart (on 2026-12-05 a call's "atom" with ATOM_MX_FRAG=1
        # was merged with another call's plain "atom")
        bench["atom_env"] = atom_env_of_call()
        bench["repeats"] = []  # one {engine: report} per round; "engines" keeps the first round's (older readers)
        with open(os.path.join(ns.out, stem + ".log"), "w") as log:
            for rnd in range(ns.repeats):
                bench["repeats"].append({})
                for engine in ns.engines.split(","):
                    left = ns.budget_s - (time.monotonic() - t0)
                    if left < ns.min_engine_s:
                        print(f"[{engine}] round {rnd + 1} skipped, {left:.0f} s left", flush=True)
                        if rnd == 0:
                            bench["engines"][engine] = dict(error=f"skipped: {left:.0f} s of the budget left")
                        continue
                    rep = run_engine(engine, model, ns, shape + par, log, min(ns.engine_timeout_s, left), rnd)
                    bench["repeats"][rnd][engine] = rep
                    if rnd == 0:
                        bench["engines"][engine] = rep
                    with open(path, "w") as f:
                        json.dump(bench, f, indent=1)
            xc = run_crosscheck(bench, model, ns, shape + par, log, ns.budget_s - (time.monotonic() - t0))
            if xc is not None:
                bench["crosscheck"] = xc
        benches.append(bench)
        with open(path, "w") as f:
            json.dump(bench, f, indent=1)
    print()
    print(make_table.markdown(benches))
    print(f"total {time.monotonic() - t0:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
