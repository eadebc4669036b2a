"""A minimal paged-KV driver for tests: prefill a batch of prompts, then decode step by step.

It plays the host's part (block allocation, metadata) with the simplest possible policy, so model tests
exercise the same PagedAttention path atom-server uses, with a block size smaller than the prompts.
MLA layers (DeepSeek) get their latent caches from their specs (PagedMLAAttention).
"""

from __future__ import annotations

import torch

from atom.forward_context import set_forward_context
from atom.layers.attention import PagedAttentionMetadata, attention_specs, bind_kv_caches
from atom.layers.mla import bind_mla_kv_caches, mla_attention_specs


class PagedHarness:
    def __init__(self, model, num_blocks: int = 256, block_size: int = 4, dtype=None, device="cpu"):
        self.model, self.block_size = model, block_size
        specs = attention_specs(model)
        dtype = dtype or next(model.parameters()).dtype
        self.caches = [
            (torch.zeros(num_blocks, block_size, s.num_kv_heads, s.head_dim, dtype=dtype, device=device),
             torch.zeros(num_blocks, block_size, s.num_kv_heads, s.head_dim, dtype=dtype, device=device))
            for s in specs
        ]
        bind_kv_caches(model, self.caches)
        # MLA layers: one latent tensor per layer, shaped and typed by its spec
        self.mla_caches = {s.layer_idx: s.allocate(num_blocks, block_size, device)
                           for s in mla_attention_specs(model)}
        bind_mla_kv_caches(model, self.mla_caches)
        self.free = list(range(num_blocks))[::-1]
        self.tables: list[list[int]] = []
        self.lens: list[int] = []
        self.device = device

    def _slot(self, seq: int, pos: int) -> int:
        blocks = self.tables[seq]
        while len(blocks) <= pos // self.block_size:
            blocks.append(self.free.pop())
        return blocks[pos // self.block_size] * self.block_size + pos % self.block_size

    @torch.no_grad()
    def step(self, chunks: list[list[int]], seqs: list[int]) -> torch.Tensor:
        """Feed chunks[i] as the next tokens of sequence seqs[i]; returns logits of each chunk's last token."""
        ids, pos, slots, qsl = [], [], [], [0]
        for seq, chunk in zip(seqs, chunks):
            start = self.lens[seq]
            for j, t in enumerate(chunk):
                ids.append(t)
                pos.append(start + j)
                slots.append(self._slot(seq, start + j))
            self.lens[seq] += len(chunk)
            qsl.append(qsl[-1] + len(chunk))
        width = max(len(self.tables[s]) for s in seqs)
        tables = [self.tables[s] + [0] * (width - len(self.tables[s])) for s in seqs]
        dev = self.device
        md = PagedAttentionMetadata(
            slot_mapping=torch.tensor(slots, dtype=torch.int64, device=dev),
            block_tables=torch.tensor(tables, dtype=torch.int32, device=dev),
            query_start_loc=torch.tensor(qsl, dtype=torch.int32, device=dev),
            seq_lens=torch.tensor([self.lens[s] for s in seqs], dtype=torch.int32, device=dev),
            max_query_len=max(len(c) for c in chunks),
            max_seq_len=max(self.lens[s] for s in seqs),
        )
        with set_forward_context(md):
            hidden = self.model(torch.tensor(ids, device=dev), torch.tensor(pos, device=dev))
        last = torch.tensor(qsl[1:], device=dev) - 1
        return self.model.compute_logits(hidden[last])

    def add(self, n: int) -> list[int]:
        start = len(self.tables)
        self.tables += [[] for _ in range(n)]
        self.lens += [0] * n
        return list(range(start, start + n))
