#!/usr/bin/env python3
"""atom-sglang on the GPU machine with SGLang 0.5.15 (carried: /work/shared/device/sglang-peer).

  tar -xJf .carry/sglang/sglang-site.tar.xz -C /tmp/sglsite && \
  PYTHONPATH=/tmp/sglsite:packages/atom-core/src:packages/atom-sglang/src:packages/atom-sglang/tests \
  python3 tools/device/sglang_gpu.py

1. Correctness, CUDA graphs on: `sglang.benchmark.one_batch --correctness-test` on tiny checkpoints of
   Llama, Qwen3 and Qwen3-MoE (float32) with SGLang's `triton` attention backend and with ATOM's `atom`
   backend; greedy text must equal transformers' greedy continuation of the same ids (computed here), and
   every logits row one_batch computed (prefill, extend over the cached prefix, decode steps; saved by
   run_one_batch.py) is compared with transformers' float32 logits on the GPU (max relative error per run).
2. Speed: one_batch on the qwen3-0.6b shape (random bf16 weights, load_format dummy), batch 1 and 32,
   input 128, output 32, for both backends; prints SGLang's own latency/throughput lines.
Writes $OUT/sglang_gpu.json and one log per run.
"""

from __future__ import annotations

import ast
import json
import os
import re
import subprocess
import sys
from pathlib import Path

OUT = Path(os.environ.get("OUT") or "/tmp/sglang_gpu")
WRAPPER = Path(__file__).resolve().parents[2] / "packages/atom-sglang/tests/run_one_batch.py"
ARCHS = ["LlamaForCausalLM", "Qwen3ForCausalLM", "Qwen3MoeForCausalLM"]
BACKENDS = os.environ.get("SGL_BACKENDS", "triton,atom").split(",")
EXTRA = os.environ.get("SGL_EXTRA_ARGS", "").split()  # e.g. --disable-prefill-cuda-graph


def _env() -> dict:
    return {**os.environ, "SGLANG_EXTERNAL_MODEL_PACKAGE": "atom_sglang.models", "PYTHONUNBUFFERED": "1"}


def _greedy(hf, ids: list[int], n: int) -> list[int]:
    import torch

    ids = list(ids)
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(hf(torch.tensor([ids])).logits[0, -1].argmax()))
    return ids


_HF: dict = {}  # arch -> the transformers model written as its checkpoint (both waves use it)
_TOK: dict = {}


def correctness(report: dict) -> None:
    from tiny_models import write_checkpoint, write_tokenizer

    # one_batch's three default prompts, then one prompt alone: SGLang 0.5.15's breakable prefill graphs
    # run single-request prefills only, so the second wave is what replays ATOM's model in a prefill graph
    prompt_file = Path("/tmp/sgl_one_prompt.txt")
    prompt_file.write_text("Today is a sunny day and I like")
    for wave in ("3 prompts", "1 prompt"):
        procs = {}
        for arch in ARCHS:
            base = Path(f"/tmp/sgl_{arch}")
            if arch not in _HF:
                _HF[arch] = write_checkpoint(arch, base / "model")
                _TOK[arch] = write_tokenizer(base / "tokenizer", _HF[arch].config.vocab_size)
            hf, tok = _HF[arch], _TOK[arch]
            for backend in BACKENDS:
                cmd = [sys.executable, str(WRAPPER), "--model-path", str(base / "model"), "--tokenizer-path",
                       str(base / "tokenizer"), "--attention-backend", backend, "--sampling-backend", "pytorch",
                       "--dtype", "float32", "--correctness-test", "--max-total-tokens", "4096",
                       "--mem-fraction-static", "0.1", "--cuda-graph-max-bs", "8", *EXTRA]
                if wave == "1 prompt":
                    cmd += ["--batch-size", "1", "--prompt-filename", str(prompt_file)]
                tag = f"{backend}{'_1prompt' if wave == '1 prompt' else ''}"
                dump = base / f"logits_{tag}.pt"
                env = {**_env(), "ATOM_SGL_DUMP_LOGITS": str(dump)}
                procs[(arch, tag)] = (subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE,
                                                       stderr=subprocess.STDOUT, text=True), hf, tok, dump)
        _collect(procs, report)



def _collect(procs: dict, report: dict) -> None:
    for (arch, backend), (proc, hf, tok, dump) in procs.items():
        out, _ = proc.communicate(timeout=420)
        (OUT / f"sgl_{arch}_{backend}.log").write_text(out)
        entry = {"rc": proc.returncode, "cuda_graph": "Capture cuda graph" in out or "cuda graph" in out.lower()}
        try:
            ids = ast.literal_eval(re.search(r"input_ids=(\[\[.*?\]\])", out).group(1))
            texts = re.findall(r"========== Prompt \d+ ==========\n(.*?) \n", out)
            greedy = [_greedy(hf, i, 16) for i in ids]
            matches = [t == tok.decode(g) for g, t in zip(greedy, texts)]
            entry.update(prompts=len(texts), greedy_matches=sum(matches))
            import torch
            from one_batch_logits import logit_errors

            calls = torch.load(dump)
            errors = logit_errors(hf.float(), ids, greedy, calls)
            entry.update(logit_calls=len(errors), max_rel_logit_err=max(errors),
                         graph_replays={k: sum(c["graph"] for c in calls if c["kind"] == k) for k in ("extend", "decode")})
        except Exception as e:  # noqa: BLE001 - report what broke
            entry["error"] = f"{type(e).__name__}: {e}; tail: {out[-1500:]}"
        report[f"{arch}/{backend}"] = entry
        print(f"CORRECTNESS {arch:<22} {backend:<7} {entry}", flush=True)


def speed(report: dict) -> None:
    from transformers import Qwen3Config

    d = Path("/tmp/sgl_qwen3_0.6b")
    cfg = Qwen3Config(hidden_size=1024, num_hidden_layers=28, num_attention_heads=16, num_key_value_heads=8,
                      head_dim=128, intermediate_size=3072, vocab_size=151936, tie_word_embeddings=True,
                      max_position_embeddings=40960, rms_norm_eps=1e-6)
    cfg.architectures = ["Qwen3ForCausalLM"]
    cfg.dtype = "bfloat16"
    cfg.save_pretrained(d)
    for backend in BACKENDS:
        cmd = [sys.executable, str(WRAPPER), "--model-path", str(d), "--load-format", "dummy",
               "--skip-tokenizer-init", "--attention-backend", backend, "--sampling-backend", "pytorch",
               "--dtype", "bfloat16", "--batch-size", "1", "32", "--input-len", "128", "--output-len", "32",
               "--mem-fraction-static", "0.5", "--cuda-graph-max-bs", "32"]
        p = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=300)
        out = p.stdout + p.stderr
        (OUT / f"sgl_speed_{backend}.log").write_text(out)
        lines = [ln for ln in out.splitlines() if re.search(r"(Prefill|Decode|Total)\.", ln)]
        report[f"speed/{backend}"] = {"rc": p.returncode, "lines": lines[-12:]}
        print(f"SPEED {backend} rc={p.returncode}\n  " + "\n  ".join(lines[-12:] or [out[-1500:]]), flush=True)


if __name__ == "__main__":
    OUT.mkdir(parents=True, exist_ok=True)
    report: dict = {}
    correctness(report)
    if os.environ.get("SGL_SKIP_SPEED") != "1":
        speed(report)
    (OUT / "sglang_gpu.json").write_text(json.dumps(report, indent=1))
