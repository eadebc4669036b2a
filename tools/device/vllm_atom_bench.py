#!/usr/bin/env python3
"""vLLM with and without ATOM (atom-vllm) on random-weight Qwen3 shapes; prints a ratio table.

  python3 tools/device/vllm_atom_bench.py [--models 0.6b,8b] [--bs 1,32,128] [--eager] [--workdir DIR]

Workload as in PERF.md: random 128-token prompts, 128 new tokens, greedy, ignore EOS, bf16, dummy
(random) weights from config-only checkpoints. For each model one engine process runs vLLM's built-in
class (ATOM_DISABLE_VLLM_PLUGIN=1), another ATOM's; each checks which class vLLM built. Results go to
$OUT/vllm_atom_bench.json. Set VLLM_USE_FLASHINFER_SAMPLER=0 where flashinfer is not installed.

atom-vllm must be discoverable as a vLLM plugin (entry points). When it is not pip-installed (e.g. on the
GPU machine with vLLM carried into /tmp/site), this script writes a dist-info shim declaring the two entry
points and puts it, with packages/atom-core/src and packages/atom-vllm/src, on the engines' PYTHONPATH.
Works with vLLM 0.24 (GPU) and 0.32 (CPU; use --models tiny there for a smoke run).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
OUT = os.environ.get("OUT") or "/tmp/vllm_atom_out"
PROMPT, NEW, VOCAB = 128, 128, 151936

SHAPES = {
    "0.6b": dict(hidden_size=1024, num_hidden_layers=28, num_attention_heads=16, num_key_value_heads=8,
                 head_dim=128, intermediate_size=3072, vocab_size=VOCAB, tie_word_embeddings=True),
    "8b": dict(hidden_size=4096, num_hidden_layers=36, num_attention_heads=32, num_key_value_heads=8,
               head_dim=128, intermediate_size=12288, vocab_size=VOCAB, tie_word_embeddings=False),
    "30b-a3b": dict(hidden_size=2048, num_hidden_layers=48, num_attention_heads=32, num_key_value_heads=4,
                    head_dim=128, intermediate_size=6144, moe_intermediate_size=768, num_experts=128,
                    num_experts_per_tok=8, norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[],
                    vocab_size=VOCAB, tie_word_embeddings=False),
    # CPU smoke run of this script only.
    "tiny": dict(hidden_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                 intermediate_size=256, vocab_size=VOCAB, tie_word_embeddings=False),
}


def write_config(name: str, d: str) -> str:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, Qwen3Config, Qwen3MoeConfig

    if os.path.exists(os.path.join(d, "config.json")):
        return d
    os.makedirs(d, exist_ok=True)
    shape = SHAPES[name]
    moe = "num_experts" in shape
    c = (Qwen3MoeConfig if moe else Qwen3Config)(max_position_embeddings=40960, rms_norm_eps=1e-6, bos_token_id=1,
                                                 eos_token_id=1, pad_token_id=1, **shape)
    c.dtype = "bfloat16"
    c.architectures = ["Qwen3MoeForCausalLM" if moe else "Qwen3ForCausalLM"]
    c.save_pretrained(d)
    words = ["<unk>", "<|endoftext|>"] + "the a of to and in is it you that".split()
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<|endoftext|>",
                            pad_token="<|endoftext|>").save_pretrained(d)
    return d


def plugin_env(workdir: str) -> dict[str, str]:
    """Environment for engine processes in which vLLM discovers atom-vllm's entry points."""
    from importlib.metadata import entry_points

    env = dict(os.environ)
    if any(ep.value.startswith("atom_vllm") for ep in entry_points(group="vllm.general_plugins")):
        return env
    shim = os.path.join(workdir, "shim")
    info = os.path.join(shim, "atom_vllm-0.1.0.dist-info")
    os.makedirs(info, exist_ok=True)
    with open(os.path.join(info, "METADATA"), "w") as f:
        f.write("Metadata-Version: 2.1\nName: atom-vllm\nVersion: 0.1.0\n")
    with open(os.path.join(info, "entry_points.txt"), "w") as f:
        f.write("[vllm.platform_plugins]\natom = atom_vllm.plugin:platform_plugin\n\n"
                "[vllm.general_plugins]\natom = atom_vllm.plugin:register\n")
    paths = [shim, os.path.join(REPO, "packages/atom-core/src"), os.path.join(REPO, "packages/atom-vllm/src")]
    env["PYTHONPATH"] = os.pathsep.join(paths + [p for p in [env.get("PYTHONPATH")] if p])
    return env


def _registered_class(llm) -> str:
    """module.Class vLLM resolves the checkpoint's architecture to (the same registry in every process)."""
    from vllm import ModelRegistry

    arch = llm.llm_engine.vllm_config.model_config.architectures[0]
    entry = ModelRegistry.models[arch]
    cls = getattr(entry, "model_cls", None)
    return (f"{cls.__module__}.{cls.__qualname__}" if cls is not None
            else f"{entry.module_name}.{entry.class_name}")


def engine(d: str, name: str, bss: list[int], eager: bool) -> None:
    """One engine: prints 'ROW {json}' per batch size and 'INFO {json}' once."""
    import numpy as np
    import vllm
    from vllm import LLM, SamplingParams

    t = time.time()
    llm = LLM(model=d, skip_tokenizer_init=True, max_model_len=1024, gpu_memory_utilization=0.85, seed=0,
              dtype="bfloat16", enable_prefix_caching=False, enforce_eager=eager, load_format="dummy")
    info = dict(vllm=vllm.__version__, init_s=time.time() - t, model_class=_registered_class(llm))
    print("INFO " + json.dumps(info), flush=True)
    rng = np.random.default_rng(0)
    vocab = SHAPES[name]["vocab_size"]

    def prompts(bs):
        return [{"prompt_token_ids": rng.integers(0, vocab, PROMPT).tolist()} for _ in range(bs)]

    sp = SamplingParams(temperature=0.0, max_tokens=NEW, min_tokens=NEW, ignore_eos=True, detokenize=False)
    sp1 = SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True, detokenize=False)
    for bs in bss:
        llm.generate(prompts(bs), sp, use_tqdm=False)  # warm-up
        pre, full = [], []
        for _ in range(3):
            p = prompts(bs)
            t = time.perf_counter()
            llm.generate(p, sp1, use_tqdm=False)
            pre.append(time.perf_counter() - t)
        for _ in range(3):
            p = prompts(bs)
            t = time.perf_counter()
            outs = llm.generate(p, sp, use_tqdm=False)
            full.append(time.perf_counter() - t)
            assert sum(len(o.outputs[0].token_ids) for o in outs) == bs * NEW
        pm, fm = sorted(pre)[1], sorted(full)[1]  # medians of 3
        row = dict(model=name, bs=bs, prefill_ms=pm * 1e3, e2e_tok_s=bs * NEW / fm,
                   ms_per_step=(fm - pm) / (NEW - 1) * 1e3, pre_all=pre, full_all=full)
        print("ROW " + json.dumps(row), flush=True)


def run_engine(d: str, name: str, bss: list[int], eager: bool, atom: bool, env: dict[str, str]) -> dict:
    env = dict(env)
    if atom:
        env.pop("ATOM_DISABLE_VLLM_PLUGIN", None)
    else:
        env["ATOM_DISABLE_VLLM_PLUGIN"] = "1"
    cmd = [sys.executable, os.path.abspath(__file__), "--engine", d, "--models", name,
           "--bs", ",".join(map(str, bss))] + (["--eager"] if eager else [])
    proc = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    info, rows = None, []
    for line in proc.stdout.splitlines():
        if line.startswith("INFO "):
            info = json.loads(line[5:])
        elif line.startswith("ROW "):
            rows.append(json.loads(line[4:]))
    if proc.returncode != 0 or info is None:
        sys.stderr.write(proc.stdout[-8000:])
        raise SystemExit(f"engine {'atom' if atom else 'builtin'} {name} failed (rc={proc.returncode})")
    expect = "atom_vllm." if atom else "vllm.model_executor."
    if not info["model_class"].startswith(expect):
        raise SystemExit(f"{'atom' if atom else 'builtin'} run built {info['model_class']}, expected {expect}*")
    return {"info": info, "rows": rows}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="0.6b,8b")
    ap.add_argument("--bs", default="1,32,128")
    ap.add_argument("--eager", action="store_true", help="enforce_eager (no torch.compile / CUDA graphs)")
    ap.add_argument("--workdir", default="/tmp/vllm_atom_bench")
    ap.add_argument("--engine", help=argparse.SUPPRESS)  # internal: run one engine on this checkpoint dir
    a = ap.parse_args()
    bss = [int(x) for x in a.bs.split(",")]
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("VLLM_NO_USAGE_STATS", "1")
    if a.engine:
        engine(a.engine, a.models, bss, a.eager)
        return
    env = plugin_env(a.workdir)
    results = {}
    for name in a.models.split(","):
        d = write_config(name, os.path.join(a.workdir, name))
        results[name] = {"builtin": run_engine(d, name, bss, a.eager, False, env),
                         "atom": run_engine(d, name, bss, a.eager, True, env)}
    os.makedirs(OUT, exist_ok=True)
    with open(os.path.join(OUT, "vllm_atom_bench.json"), "w") as f:
        json.dump(results, f, indent=1)
    print(f"\n{'model':<8} {'bs':>4} {'vLLM tok/s':>11} {'ATOM tok/s':>11} {'ratio':>6} "
          f"{'vLLM step ms':>13} {'ATOM step ms':>13} {'vLLM prefill ms':>16} {'ATOM prefill ms':>16}")
    for name, r in results.items():
        for b, t in zip(r["builtin"]["rows"], r["atom"]["rows"]):
            print(f"{name:<8} {b['bs']:>4} {b['e2e_tok_s']:>11.1f} {t['e2e_tok_s']:>11.1f} "
                  f"{t['e2e_tok_s'] / b['e2e_tok_s']:>6.2f} {b['ms_per_step']:>13.2f} {t['ms_per_step']:>13.2f} "
                  f"{b['prefill_ms']:>16.1f} {t['prefill_ms']:>16.1f}")
        print(f"{name:<8} classes: {r['builtin']['info']['model_class']} vs {r['atom']['info']['model_class']}; "
              f"init {r['builtin']['info']['init_s']:.0f} s vs {r['atom']['info']['init_s']:.0f} s")


if __name__ == "__main__":
    main()
