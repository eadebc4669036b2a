#!/usr/bin/env python3
"""Merge the bench_<shape>.json files of tools/device/bench_vs_vllm.py into the markdown for BENCHMARKS.md.

  python3 tools/device/make_table.py bench-results/ [--out table.md]    (files or folders of bench_*.json)

For each shape and batch size: end-to-end output tok/s of ATOM (atom-server), vLLM's built-in model and
vLLM running ATOM's model through the atom-vllm plugin; their ratios to vLLM; decode ms/step of each and
the share of the decode roofline it reaches. The roofline is the bytes one decode step must read
(weights without the input embedding, the experts a batch touches, the KV cache at the mean context)
over the device-to-device copy rate measured in the same device call (PERF.md's method); under tensor
parallelism (bench_<shape>_tp<N>[_ep]) each of the N GPUs reads 1/N of those bytes. The alt engines
(atom-alt, atom-alt2: ATOM with one switch changed; atom-vllm-alt: vLLM+ATOM with one) get a table each
against the engine they alter, paired by round.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import statistics
import sys
from typing import Any

# each alt engine of bench_vs_vllm.py and the engine it alters (its env pairs added): their own table
ALT_OF = {"atom-alt": "atom", "atom-alt2": "atom", "atom-vllm-alt": "atom-vllm"}
ALTS = tuple(ALT_OF)
ENGINES = ("atom", "vllm", "atom-vllm", "atom-base", *ALTS)
LABEL = {"atom": "ATOM", "vllm": "vLLM", "atom-vllm": "vLLM+ATOM", "atom-base": "ATOM bf16", "atom-alt": "ATOM alt",
         "atom-alt2": "ATOM alt2", "atom-vllm-alt": "vLLM+ATOM alt"}
# PERF.md (H100 80GB, 2,970 GB/s): batch-1 decode roofline in ms/step, for reference next to this device's.
PERF_MD_H100_BS1_MS = {"qwen3-0.6b": 0.40, "qwen3-8b": 5.10, "qwen3-30b-a3b": 2.05}


def variant(bench: dict[str, Any]) -> str:
    """'' for the bf16 runs; e.g. 'fp8-kvfp8' for --quantization fp8 --kv-cache-dtype fp8, 'ckpt' for --materialize,
    '[ATOM_X=1]' for a call run with ATOM_* switches in its environment (their own table rows)."""
    parts = []
    if bench.get("quantization"):
        parts.append(str(bench["quantization"]))
    if bench.get("kv_cache_dtype") not in (None, "auto"):
        parts.append("kv" + str(bench["kv_cache_dtype"]).replace("_", ""))
    if str(bench.get("weights", "dummy")).startswith("materialized"):
        parts.append("ckpt")  # one random checkpoint on disk, loaded by every engine
    label = "-".join(parts)
    if bench.get("atom_env"):  # a call's ATOM_* switches: never merged with a call without them
        label = (label + " " if label else "") + f"[{bench['atom_env']}]"
    return label


def step_bytes(cfg: dict[str, Any], batch: int, context: float, dtype_bytes: int = 2, weight_bytes: float | None = None,
               kv_bytes: float | None = None) -> float:
    """Bytes one decode step reads: every weight but the input embedding (a gather of `batch` rows), the
    experts that `batch` tokens routed at random touch (E * (1 - (1 - k/E)^batch) per layer), and the K and
    V cache of `batch` sequences of `context` tokens. weight_bytes / kv_bytes: bytes per element of the
    decoder layers' linear weights (1 for FP8, plus its float32 per-channel scales) and of the KV cache; the
    LM head, norms and routers stay at dtype_bytes. MXFP4 experts (GPT-OSS's quantization_config) count
    17/32 byte a weight whatever weight_bytes is; sliding-window layers read at most their window of KV."""
    weight_bytes = dtype_bytes if weight_bytes is None else weight_bytes
    kv_bytes = dtype_bytes if kv_bytes is None else kv_bytes
    if cfg.get("kv_lora_rank"):  # DeepSeek-V2/V3: MLA + DeepSeekMoE
        return mla_step_bytes(cfg, batch, context, dtype_bytes, weight_bytes, kv_bytes)
    h, layers, v = cfg["hidden_size"], cfg["num_hidden_layers"], cfg["vocab_size"]
    heads = cfg["num_attention_heads"]
    kv, hd = cfg.get("num_key_value_heads") or heads, cfg.get("head_dim") or h // heads
    attn = h * heads * hd * 2 + h * kv * hd * 2  # q and o, k and v
    attn_rows = heads * hd + 2 * kv * hd + h  # output channels of qkv and o (one float32 scale each, FP8)
    scale = 4 if weight_bytes < dtype_bytes else 0
    router, expert_bytes = 0, 0.0
    experts = cfg.get("num_experts") or cfg.get("num_local_experts")
    if experts:
        e, k = experts, cfg["num_experts_per_tok"]
        touched = e * (1 - (1 - k / e) ** batch)
        inter = cfg.get("moe_intermediate_size") or cfg["intermediate_size"]
        router = h * e
        if (cfg.get("quantization_config") or {}).get("quant_method") == "mxfp4":  # 4 bits + a scale byte per 32
            mlp, mlp_rows = 0, 0
            expert_bytes = layers * touched * 3 * h * inter * (0.5 + 1 / 32)
        else:
            mlp, mlp_rows = touched * 3 * h * inter, touched * (2 * inter + h)
    else:
        mlp, mlp_rows = 3 * h * cfg["intermediate_size"], 2 * cfg["intermediate_size"] + h
    linear = layers * ((attn + mlp) * weight_bytes + (attn_rows + mlp_rows) * scale) + expert_bytes
    other = (layers * router + v * h) * dtype_bytes  # routers, the lm head (a tied embedding is read once, as the head)
    # sliding-window layers (GPT-OSS: every other one) read at most their window
    types = cfg.get("layer_types") or ["full_attention"] * layers
    if cfg.get("model_type") == "gpt_oss" and not cfg.get("layer_types"):  # its config's default
        types = [("sliding_attention", "full_attention")[i % 2] for i in range(layers)]
    window = cfg.get("sliding_window") or context
    seen = sum(min(context, window) if t == "sliding_attention" else context for t in types)
    kv_cache = batch * seen * 2 * kv * hd * kv_bytes
    return linear + other + kv_cache


def mla_step_bytes(cfg: dict[str, Any], batch: int, context: float, dtype_bytes: int = 2,
                   weight_bytes: float | None = None, kv_bytes: float | None = None) -> float:
    """step_bytes of a DeepSeek-V2/V3 model: MLA's projections (q or q_a/q_b, kv_a, kv_b, o), dense MLPs in the
    first_k_dense_replace layers, then per MoE layer the router, the shared experts and the routed experts
    the batch touches; the latent cache (kv_lora_rank + qk_rope_head_dim values per token and layer).
    weight_bytes / kv_bytes as in step_bytes (FP8 scales not counted here)."""
    weight_bytes = dtype_bytes if weight_bytes is None else weight_bytes
    kv_bytes = dtype_bytes if kv_bytes is None else kv_bytes
    h, layers, v = cfg["hidden_size"], cfg["num_hidden_layers"], cfg["vocab_size"]
    heads, lora, rope = cfg["num_attention_heads"], cfg["kv_lora_rank"], cfg["qk_rope_head_dim"]
    nope, vd, q_lora = cfg["qk_nope_head_dim"], cfg["v_head_dim"], cfg.get("q_lora_rank")
    q = h * q_lora + q_lora * heads * (nope + rope) if q_lora else h * heads * (nope + rope)
    attn = q + h * (lora + rope) + lora * heads * (nope + vd) + heads * vd * h
    dense = min(cfg.get("first_k_dense_replace") or 0, layers)
    e, k = cfg["n_routed_experts"], cfg["num_experts_per_tok"]
    touched = e * (1 - (1 - k / e) ** batch)
    inter = cfg["moe_intermediate_size"]
    linear = layers * attn + dense * 3 * h * cfg["intermediate_size"] + (layers - dense) * (
        (touched + (cfg.get("n_shared_experts") or 0)) * 3 * h * inter)
    other = (layers - dense) * h * e + v * h  # routers, the lm head
    latent = batch * context * layers * (lora + rope)
    return linear * weight_bytes + other * dtype_bytes + latent * kv_bytes


def roofline_ms(cfg: dict[str, Any], batch: int, context: float, gbps: float, dtype_bytes: int = 2,
                weight_bytes: float | None = None, kv_bytes: float | None = None) -> float:
    return step_bytes(cfg, batch, context, dtype_bytes, weight_bytes, kv_bytes) / (gbps * 1e9) * 1e3


CROSSCHECK_DRIVER = "vllm.benchmarks.latency (vllm bench latency)"


def crosscheck_line(xc: dict[str, Any]) -> str:
    """One line for tools/device/vllm_crosscheck.py's result (vLLM's own driver against our vLLM harness)."""
    if "skipped" in xc or "error" in xc:
        return f"vLLM cross-check: {'skipped, ' + xc['skipped'] if 'skipped' in xc else 'failed, ' + xc['error']}"
    head = (f"vLLM cross-check at batch {xc['batch_size']}: {CROSSCHECK_DRIVER} median {xc['driver_median_s']:.3f} s "
            f"over {len(xc['driver_latencies_s'])} runs")
    if xc.get("ratio") is None:
        return head + "; no harness run at this batch size to compare"
    verdict = "agree" if xc["agree"] else "DISAGREE"
    return (f"{head}, our harness {xc['harness_median_s']:.3f} s over {len(xc['harness_s'])} runs: "
            f"harness / driver {xc['ratio']:.3f} ({verdict}, tolerance {xc['tolerance']:.0%})")


def load(paths: list[str]) -> list[dict[str, Any]]:
    files = []
    for p in paths:
        files += sorted(glob.glob(os.path.join(p, "bench_*.json"))) if os.path.isdir(p) else [p]
    benches = []
    for f in files:
        with open(f) as fh:
            benches.append(json.load(fh))
    return merge(benches)


def merge(benches: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One entry per shape, variant (fp8 rows: variant()) and device session, never across sessions (two
    machines, or two starts of one, differ by more than the engines do): the rounds of every call of that
    session, in order. A file from before sessions were recorded is a session of its own."""
    by_key: dict[tuple[str, str, str], dict[str, Any]] = {}
    for b in sorted(benches, key=lambda b: (b.get("date", ""), b.get("time", ""))):
        session = b.get("session") or f"{b.get('date', '?')} {b.get('time', '?')}"
        m = by_key.setdefault((b["shape"], variant(b), session),
                              {**b, "session": session, "engines": {}, "commands": [], "repeats": []})
        m["commands"].append(b["command"])
        for k in ("device", "bandwidth_gbps", "config", "dtype", "input_len", "output_len", "quantization",
                  "kv_cache_dtype"):
            m[k] = b.get(k) if b.get(k) is not None else m.get(k)
        for e, rep in b["engines"].items():
            if rep.get("runs") or not m["engines"].get(e, {}).get("runs"):
                m["engines"][e] = rep
        m["repeats"] += b.get("repeats") or [b["engines"]]
        if b.get("crosscheck") and (m.get("crosscheck") is None or m["crosscheck"].get("ratio") is None):
            m["crosscheck"] = b["crosscheck"]  # a later call's "done earlier" does not hide the measured one
    merged = list(by_key.values())
    sessions: dict[str, int] = {}
    for m in merged:
        m["label"] = m["shape"] + (f" {variant(m)}" if variant(m) else "")
        sessions[m["label"]] = sessions.get(m["label"], 0) + 1
    for m in merged:  # a shape measured in several sessions: one row group per session, labelled
        if sessions[m["label"]] > 1:
            m["label"] += f" ({m['session']})"
    return merged


def _runs(report: dict[str, Any] | None) -> dict[int, dict[str, Any]]:
    if not report or "runs" not in report:
        return {}
    return {r["batch_size"]: r for r in report["runs"]}


def _median(xs: list[float]) -> float | None:
    return statistics.median(xs) if xs else None


def _f(x: float | None, fmt: str = ",.0f", suffix: str = "") -> str:
    return "-" if x is None else f"{x:{fmt}}{suffix}"


def rows(benches: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per shape (and session) and batch size: each engine's values over the rounds (fresh processes,
    interleaved), and the ratios to vLLM paired by round."""
    out = []
    for b in benches:
        shape, gbps = b.get("label", b["shape"]), b.get("bandwidth_gbps")
        rounds = [{e: _runs(rnd.get(e)) for e in ENGINES} for rnd in (b.get("repeats") or [b["engines"]])]
        sizes = sorted({bs for rnd in rounds for r in rnd.values() for bs in r})
        for bs in sizes:
            row: dict[str, Any] = dict(shape=shape, batch=bs)
            for e in ENGINES:
                got = [rnd[e][bs] for rnd in rounds if bs in rnd[e]]
                row[f"{e}_tok_s_all"] = [r["output_tok_s"] for r in got]
                # a step time of 0 or less is no measurement: (run time - the prefill-only run's time) / steps, where
                # the prefill-only run compiled kernels the timed run then had (vLLM 0.24's MXFP4 MoE, 2026-12-05)
                row[f"{e}_ms_step_all"] = [r["ms_per_step"] for r in got if (r.get("ms_per_step") or 0) > 0]
                row[f"{e}_tok_s"] = _median(row[f"{e}_tok_s_all"])
                row[f"{e}_ms_step"] = _median(row[f"{e}_ms_step_all"])
                row[f"{e}_prefill_ms"] = _median([r["prefill_ms"] for r in got if r.get("prefill_ms")])
                if e != "vllm":  # paired by round: never a ratio of two different rounds' luck
                    row[f"{e}_ratio_all"] = [rnd[e][bs]["output_tok_s"] / rnd["vllm"][bs]["output_tok_s"]
                                             for rnd in rounds if bs in rnd[e] and bs in rnd["vllm"]]
            any_run = next(rnd[e][bs] for rnd in rounds for e in ENGINES if bs in rnd[e])
            context = any_run["input_len"] + any_run["output_len"] / 2
            nbytes = 4 if b.get("dtype") in ("float32", "float") else 2
            wbytes = 1 if b.get("quantization") == "fp8" else None
            kvbytes = 1 if str(b.get("kv_cache_dtype") or "auto").startswith("fp8") else None
            # tensor parallel: each of the N GPUs reads 1/N of the bytes, at the same time (collectives not counted)
            tp = b.get("tensor_parallel_size") or 1
            row["roof_ms"] = (roofline_ms(b["config"], bs, context, gbps, nbytes, wbytes, kvbytes) / tp
                              if gbps and b.get("config") else None)
            # ATOM's FP8 run over its bf16 one (atom-base), paired by round like the ratios to vLLM
            row["atom_base_ratio_all"] = [
                rnd["atom"][bs]["output_tok_s"] / rnd["atom-base"][bs]["output_tok_s"]
                for rnd in rounds if bs in rnd["atom"] and bs in rnd["atom-base"]]
            # the same by decode step (bf16 ms over FP8 ms), without the prefill that the end-to-end tok/s carries
            # (qwen3-8b batch 1 on the H100, 2026-12-07: 1.696x end to end, 1.701x a step; both print as 1.70x at
            # two decimals, so the base table gives three)
            steps = [(rnd["atom"][bs].get("ms_per_step") or 0, rnd["atom-base"][bs].get("ms_per_step") or 0)
                     for rnd in rounds if bs in rnd["atom"] and bs in rnd["atom-base"]]
            row["atom_base_step_ratio_all"] = [base / fp8 for fp8, base in steps if fp8 > 0 and base > 0]
            # ATOM over ATOM with --alt-env / --alt2-env (atom-alt, atom-alt2), vLLM+ATOM over vLLM+ATOM with
            # --vllm-alt-env (atom-vllm-alt), paired by round (these replace the alt engines' ratios to vLLM)
            for alt, base in ALT_OF.items():
                row[f"{alt}_ratio_all"] = [
                    rnd[base][bs]["output_tok_s"] / rnd[alt][bs]["output_tok_s"]
                    for rnd in rounds if bs in rnd[base] and bs in rnd[alt]]
            row["rounds"] = len(rounds)
            out.append(row)
    return out


def _spread(xs: list[float], fmt: str = ",.0f", suffix: str = "") -> str:
    """median, and [min-max] when there are several values."""
    if not xs:
        return "-"
    med = f"{statistics.median(xs):{fmt}}{suffix}"
    return med if len(xs) == 1 else f"{med} [{min(xs):{fmt}}-{max(xs):{fmt}}{suffix}] n={len(xs)}"


# A decode step faster than its roofline by more than the copy probe's noise: the engine did not read what the
# workload needs (qwen3-30b-a3b FP8 under dummy weights, 2026-12-06: vLLM at 144-153%).
ROOF_LIMIT = 1.05


def _ratio(a: float | None, b: float | None) -> str:
    return "-" if not a or not b else f"{a / b:.2f}x"


def _share(roof: float | None, ms: float | None) -> str:
    return "-" if not roof or not ms or ms <= 0 else f"{roof / ms:.0%}"


def table(benches: list[dict[str, Any]]) -> str:
    head = ("| shape | batch | ATOM tok/s | vLLM tok/s | vLLM+ATOM tok/s | ATOM / vLLM | vLLM+ATOM / vLLM "
            "| ATOM ms/step | vLLM ms/step | vLLM+ATOM ms/step | roofline ms/step | ATOM % roof | vLLM % roof "
            "| vLLM+ATOM % roof |")
    lines = [head, "|" + "---|" * head.count(" | ") + "---|"]
    all_rows = rows(benches)
    for r in all_rows:
        lines.append(" | ".join([
            f"| {r['shape']}", str(r["batch"]), _spread(r["atom_tok_s_all"]), _spread(r["vllm_tok_s_all"]),
            _spread(r["atom-vllm_tok_s_all"]), _spread(r["atom_ratio_all"], ".2f", "x"),
            _spread(r["atom-vllm_ratio_all"], ".2f", "x"),
            _f(r["atom_ms_step"], ".2f"), _f(r["vllm_ms_step"], ".2f"), _f(r["atom-vllm_ms_step"], ".2f"),
            _f(r["roof_ms"], ".2f"), _share(r["roof_ms"], r["atom_ms_step"]), _share(r["roof_ms"], r["vllm_ms_step"]),
            _share(r["roof_ms"], r["atom-vllm_ms_step"]) + " |"]))
    base = [r for r in all_rows if r.get("atom-base_tok_s")]
    if base:
        lines += ["", "| shape | batch | ATOM tok/s | ATOM bf16 tok/s (same call) | ratio, end to end "
                  "| ratio, decode step |", "|---|---|---|---|---|---|"]
        lines += [f"| {r['shape']} | {r['batch']} | {_spread(r['atom_tok_s_all'])} | "
                  f"{_spread(r['atom-base_tok_s_all'])} | {_spread(r['atom_base_ratio_all'], '.3f', 'x')} | "
                  f"{_spread(r['atom_base_step_ratio_all'], '.3f', 'x')} |" for r in base]
    for name, base in ALT_OF.items():
        alt = [r for r in all_rows if r.get(f"{name}_tok_s")]
        if not alt:
            continue
        envs = sorted({str(rnd[name].get("alt_env")) for b in benches
                       for rnd in (b.get("repeats") or [b["engines"]]) if rnd.get(name)})
        label, of = LABEL[name], LABEL[base]
        lines += ["", f"{label}: {of} with {' / '.join(envs)}", "",
                  f"| shape | batch | {of} tok/s | {label} tok/s (same call) | {of} / {label} | {of} ms/step "
                  f"| {label} ms/step |",
                  "|---|---|---|---|---|---|---|"]
        lines += [f"| {r['shape']} | {r['batch']} | {_spread(r[f'{base}_tok_s_all'])} | "
                  f"{_spread(r[f'{name}_tok_s_all'])} | {_spread(r[f'{name}_ratio_all'], '.2f', 'x')} | "
                  f"{_f(r[f'{base}_ms_step'], '.2f')} | {_f(r[f'{name}_ms_step'], '.2f')} |" for r in alt]
    return "\n".join(lines)


def _problems(benches: list[dict[str, Any]]) -> list[str]:
    notes = []
    for b in benches:
        reports = [(i, e, rnd[e]) for i, rnd in enumerate(b.get("repeats") or [b["engines"]]) for e in ENGINES
                   if rnd.get(e) is not None]
        for i, e, rep in reports:
            where = f"- {b['shape']} {LABEL[e]} round {i + 1}"
            if "error" in rep:
                notes.append(f"{where}: {rep['error']}")
            if e in ("atom-vllm", "atom-vllm-alt") and rep.get("atom_model_built") is False:
                notes.append(f"{where}: the log shows no 'ATOM built' line: vLLM may have run its own model; "
                             "treat that column as vLLM's")
            if e == "vllm" and rep.get("atom_model_built") is True:
                notes.append(f"{where}: ATOM's model was built although the plugin was disabled")
            if e == "vllm" and rep.get("atom_importable"):
                notes.append(f"{where}: atom was importable in vLLM's baseline ({rep['atom_importable']})")
            for bs, run in sorted(_runs(rep).items()):  # rows() leaves these out of the ms/step medians
                if "ms_per_step" in run and (run["ms_per_step"] or 0) <= 0:
                    notes.append(f"{where} batch {bs}: no decode step time ({run['ms_per_step']:.2f} ms: the "
                                 "prefill-only run took longer than the full run); left out of the ms/step median")
        xc = b.get("crosscheck") or {}
        if "error" in xc or xc.get("agree") is False:
            notes.append(f"- {b['shape']}: {crosscheck_line(xc)}")
    for b in benches:  # faster than the copy rate allows: the engine read less than the workload needs
        config = b.get("config") or {}
        moe = any(config.get(k) for k in ("num_experts", "n_routed_experts", "num_local_experts"))
        why = " (an MoE shape: dummy routers send a batch to a few experts; run it with --materialize)" if moe else ""
        for r in rows([b]):
            for e in ("atom", "vllm", "atom-vllm"):
                ms, roof = r.get(f"{e}_ms_step"), r.get("roof_ms")
                if ms and roof and roof / ms > ROOF_LIMIT:
                    notes.append(f"- {r['shape']} {LABEL[e]} batch {r['batch']}: {roof / ms:.0%} of the roofline, "
                                 f"fewer bytes than the workload reads{why}; not a comparable figure")
    return notes


def markdown(benches: list[dict[str, Any]]) -> str:
    if not benches:
        return "no results\n"
    first = benches[0]
    versions: dict[str, str] = {}
    for b in benches:
        for rep in b["engines"].values():
            versions.update({k: v for k, v in (rep.get("versions") or {}).items() if v})
    gbps = sorted({round(b["bandwidth_gbps"]) for b in benches if b.get("bandwidth_gbps")})
    dates = sorted({b["date"] for b in benches})
    cmds = [c for b in benches for c in b.get("commands", [b.get("command", "?")])]
    out = [f"## {first.get('device', '?')}: ATOM vs vLLM, offline throughput", "",
           f"- date: {', '.join(dates)}",
           "- versions: " + ", ".join(f"{k} {v}" for k, v in sorted(versions.items())),
           f"- workload: random {first.get('input_len', 128)}-token prompts, {first.get('output_len', 128)} new "
           "tokens, greedy, EOS ignored, bf16, random weights (load_format=dummy), prefix caching off; per batch "
           "size a full and a prefill-only warm-up, then the median of 3 runs; tok/s = output tokens / end-to-end time",
           "- rows marked fp8: --quantization fp8 (the random bf16 weights quantized at load time: ATOM per output "
           "channel with per-token activations, vLLM 0.24 per tensor); kvfp8: --kv-cache-dtype fp8 (scales 1.0); "
           "their roofline counts one byte per linear weight (+ float32 channel scales) and per KV element",
           "- each engine ran in fresh processes, interleaved (A B C A B C); cells give the median over those "
           "processes, [min-max] n=processes; ratios are paired by round and never across device sessions "
           "(sessions: " + ", ".join(sorted({str(b.get("session")) for b in benches})) + ")",
           f"- device-to-device copy rate measured in the same call(s): {', '.join(f'{g:,} GB/s' for g in gbps) or '-'}",
           *[f"- {b['label'] if 'label' in b else b['shape']}: {crosscheck_line(b['crosscheck'])}" for b in benches
             if b.get("crosscheck")],
           "- roofline ms/step: bytes one decode step must read (weights without the input embedding, the experts "
           "a random batch touches, KV at the mean context) / that copy rate; % roof = roofline / measured ms/step. "
           "PERF.md's H100 batch-1 rooflines for reference: "
           + ", ".join(f"{k} {v:.2f} ms" for k, v in PERF_MD_H100_BS1_MS.items()),
           "- commands (tools/device/README.md has the full sequence):", ""]
    out += [f"      {c}" for c in cmds]
    out += ["", table(benches), ""]
    problems = _problems(benches)
    if problems:
        out += ["Problems seen:", *problems, ""]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("paths", nargs="+", help="bench_<shape>.json files or folders holding them")
    p.add_argument("--out", default=None, help="write the markdown here (default: print it)")
    ns = p.parse_args(argv)
    text = markdown(load(ns.paths))
    if ns.out:
        with open(ns.out, "w") as f:
            f.write(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
