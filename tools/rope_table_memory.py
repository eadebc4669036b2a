"""Bytes of parameters and buffers of a model shape built on the meta device (no memory, no weights), and
how many KV-cache tokens the RoPE tables' bytes are worth.

    PYTHONPATH=packages/atom-core/src python tools/rope_table_memory.py [--shape qwen3-8b] [--max-model-len 40960]

Run it against two checkouts to compare (the shapes are MODELS.md's). Prints one line per tensor kind.
"""

from __future__ import annotations

import argparse

import torch
import transformers

SHAPES = {
    "qwen3-0.6b": dict(hidden_size=1024, num_hidden_layers=28, num_attention_heads=16, num_key_value_heads=8,
                       head_dim=128, intermediate_size=3072, vocab_size=151936, tie_word_embeddings=True),
    "qwen3-8b": dict(hidden_size=4096, num_hidden_layers=36, num_attention_heads=32, num_key_value_heads=8,
                     head_dim=128, intermediate_size=12288, vocab_size=151936, tie_word_embeddings=False),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", choices=sorted(SHAPES), default="qwen3-8b")
    ap.add_argument("--max-model-len", type=int, default=40960, help="what the host passes as max_positions")
    ap.add_argument("--kv-dtype-bytes", type=int, default=2, help="bytes per KV element (bf16: 2)")
    args = ap.parse_args()
    config = transformers.Qwen3Config(max_position_embeddings=40960, rope_theta=1000000.0, **SHAPES[args.shape])
    config.architectures = ["Qwen3ForCausalLM"]
    from atom.models.registry import model_class_for_config

    torch.set_default_dtype(torch.bfloat16)  # the served dtype; the rope table stays float32
    with torch.device("meta"):
        model = model_class_for_config(config)(config, max_positions=args.max_model_len)
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    buffers = {n: b for n, b in model.named_buffers()}  # one entry per distinct tensor
    rope = sum(b.numel() * b.element_size() for n, b in buffers.items() if n.endswith("cos_sin"))
    kv_per_token = 2 * config.num_hidden_layers * config.num_key_value_heads * config.head_dim * args.kv_dtype_bytes
    mib = 1 << 20
    print(f"{args.shape} at max_model_len {args.max_model_len}:")
    print(f"  parameters      {params / mib:12.1f} MiB")
    print(f"  rope tables     {rope / mib:12.1f} MiB in {sum(n.endswith('cos_sin') for n in buffers)} table(s)")
    print(f"  other buffers   {(sum(b.numel() * b.element_size() for b in buffers.values()) - rope) / mib:12.1f} MiB")
    print(f"  KV cache        {kv_per_token} bytes per token: the rope tables hold {rope / kv_per_token:.0f} tokens' worth")


if __name__ == "__main__":
    main()
