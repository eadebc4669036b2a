#!/usr/bin/env python3
"""Greedy parity of vLLM's built-in models vs ATOM's (atom-vllm plugin) on the GPU, CUDA graphs on.

  python3 tools/device/vllm_parity.py [ARCH,...]  # after tools/device/setup_device.sh (vLLM + atom in /tmp/site)

For each architecture (Llama, Qwen3, Qwen3-MoE; DeepSeek-V2, DeepSeek-V3 and GLM-4-MoE when named, e.g.
`deepseek_v2,deepseek_v3,glm4_moe`: MoE, so vLLM needs the c3 carry) it writes a small random checkpoint with transformers
(bf16; initializer_range large enough that logits are peaked, so greedy ties are rare), runs vLLM offline
twice in fresh processes — ATOM_DISABLE_VLLM_PLUGIN=1 (vLLM's own class) and plugin on (ATOM's class,
checked in the log) — on the same 16 random prompts x 48 greedy tokens, and reports exact sequence
matches, the first divergence, and the top-2 logprob gap where they diverge (bf16 kernels differ, so a
divergence on a near-tie is expected; one on a clear margin is a bug). Writes $OUT/vllm_parity.json.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

OUT = os.environ.get("OUT") or "/tmp/vllm_parity"
N_PROMPTS, PROMPT_LEN, NEW, VOCAB = 16, 40, 48, 2048
SOLO = 4  # prompts also generated one at a time (a prefill that vLLM runs in a piecewise CUDA graph)


def make_tokenizer(d: str) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<unk>", "<eos>"] + [f"w{i}" for i in range(VOCAB - 2)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<eos>", pad_token="<eos>",
                            bos_token="<eos>").save_pretrained(d)


def make_checkpoint(arch: str, d: str) -> None:
    import torch
    from transformers import (AutoModelForCausalLM, DeepseekV2Config, DeepseekV3Config, Glm4MoeConfig, LlamaConfig,
                              Qwen3Config, Qwen3MoeConfig)

    common = dict(hidden_size=512, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=2,
                  head_dim=64, vocab_size=VOCAB, max_position_embeddings=1024, initializer_range=0.08,
                  bos_token_id=1, eos_token_id=1, pad_token_id=1, tie_word_embeddings=False)
    if arch == "llama":
        cfg = LlamaConfig(intermediate_size=1024, **common)
    elif arch == "qwen3":
        cfg = Qwen3Config(intermediate_size=1024, **common)
    elif arch == "qwen3_moe":
        cfg = Qwen3MoeConfig(intermediate_size=1024, moe_intermediate_size=256, num_experts=16,
                             num_experts_per_tok=4, norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[],
                             **common)
    elif arch in ("deepseek_v2", "deepseek_v3"):  # V2-Lite's latent width (576: every Hopper MLA backend)
        mla = dict(common, num_key_value_heads=8, head_dim=64, kv_lora_rank=512, qk_rope_head_dim=64,
                   qk_nope_head_dim=128, v_head_dim=128, intermediate_size=1024, moe_intermediate_size=256,
                   n_routed_experts=16, num_experts_per_tok=4, n_shared_experts=1, first_k_dense_replace=1)
        if arch == "deepseek_v2":
            cfg = DeepseekV2Config(**mla, q_lora_rank=None, topk_method="greedy", n_group=1, topk_group=1,
                                   norm_topk_prob=False)
        else:
            cfg = DeepseekV3Config(**mla, q_lora_rank=256, topk_method="noaux_tc", scoring_func="sigmoid", n_group=4,
                                   topk_group=2, norm_topk_prob=True, routed_scaling_factor=2.5)
    elif arch == "glm4_moe":
        cfg = Glm4MoeConfig(intermediate_size=1024, moe_intermediate_size=256, n_routed_experts=16,
                            num_experts_per_tok=4, n_shared_experts=1, first_k_dense_replace=1, n_group=2, topk_group=1,
                            norm_topk_prob=True, use_qk_norm=True, attention_bias=True, partial_rotary_factor=0.5,
                            **common)
    else:
        raise ValueError(f"unknown architecture {arch!r}")
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg).to(torch.bfloat16)
    model.save_pretrained(d)
    make_tokenizer(d)


def run_engine(d: str, out_json: str) -> None:
    import numpy as np
    from vllm import LLM, SamplingParams

    llm = LLM(model=d, dtype="bfloat16", max_model_len=256, gpu_memory_utilization=0.3, seed=0,
              enable_prefix_caching=False)  # CUDA graphs on (vLLM's default)
    rng = np.random.default_rng(0)
    prompts = [{"prompt_token_ids": rng.integers(2, VOCAB, PROMPT_LEN).tolist()} for _ in range(N_PROMPTS)]
    sp = SamplingParams(temperature=0.0, max_tokens=NEW, ignore_eos=True, logprobs=2, detokenize=False)
    outs = llm.generate(prompts, sp, use_tqdm=False)
    # and the first SOLO prompts alone: a 40-token prefill fits a capture size, so vLLM runs it as a piecewise
    # CUDA graph (the 640-token batch above prefills eagerly); stop 39 fixed a KV write that only this path missed
    outs += [llm.generate([p], sp, use_tqdm=False)[0] for p in prompts[:SOLO]]
    res = []
    for o in outs:
        c = o.outputs[0]
        gaps = []
        for tok, lp in zip(c.token_ids, c.logprobs):
            vals = sorted((v.logprob for v in lp.values()), reverse=True)
            gaps.append(vals[0] - vals[1] if len(vals) > 1 else float("inf"))
        res.append({"tokens": list(c.token_ids), "gaps": gaps})
    with open(out_json, "w") as f:
        json.dump(res, f)


def compare(a: list, b: list) -> dict:
    exact, divs = 0, []
    for x, y in zip(a, b):
        if x["tokens"] == y["tokens"]:
            exact += 1
            continue
        i = next(i for i, (p, q) in enumerate(zip(x["tokens"], y["tokens"])) if p != q)
        divs.append({"pos": i, "gap_builtin": round(x["gaps"][i], 4), "gap_atom": round(y["gaps"][i], 4)})
    return {"exact": exact, "total": len(a), "divergences": divs}


def main(archs: list[str]) -> None:
    os.makedirs(OUT, exist_ok=True)
    report = {}
    for arch in archs:
        d = f"/tmp/parity_{arch}"
        if not os.path.exists(os.path.join(d, "config.json")):
            make_checkpoint(arch, d)
        runs = {}
        for mode in ("builtin", "atom"):
            env = dict(os.environ)
            if mode == "builtin":
                env["ATOM_DISABLE_VLLM_PLUGIN"] = "1"
            path = f"/tmp/parity_{arch}_{mode}.json"
            p = subprocess.run([sys.executable, __file__, "run", d, path], env=env, capture_output=True, text=True,
                               timeout=300)
            log = p.stdout + p.stderr
            with open(os.path.join(OUT, f"parity_{arch}_{mode}.log"), "w") as f:
                f.write(log)
            if p.returncode != 0:
                print(f"{arch} {mode}: FAILED rc={p.returncode}\n{log[-3000:]}", flush=True)
                runs = None
                break
            runs[mode] = {"data": json.load(open(path)), "atom_built": "ATOM built" in log}
        if runs is None:
            report[arch] = {"error": "engine failed"}
            continue
        r = compare(runs["builtin"]["data"], runs["atom"]["data"])
        r["atom_class_used"] = runs["atom"]["atom_built"]
        r["builtin_had_atom"] = runs["builtin"]["atom_built"]
        report[arch] = r
        print(f"PARITY {arch:<10} exact {r['exact']}/{r['total']}  atom class used: {r['atom_class_used']}  "
              f"divergences: {r['divergences']}", flush=True)
    with open(os.path.join(OUT, "vllm_parity.json"), "w") as f:
        json.dump(report, f, indent=1)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "run":
        run_engine(sys.argv[2], sys.argv[3])
    else:
        main(sys.argv[1].split(",") if len(sys.argv) > 1 else ["llama", "qwen3", "qwen3_moe"])
