"""A minimal paged-KV driver for tests: prefill a batch of prompts, then decode step by step.

It plays the host's part (block allocation, metadata) with the simplest possible policy, so model tests
exercise the same PagedAttention path atom-server uses, with a block size smaller than the prompts.
"""

from __future__ import annotations

import torch

from atom.forward_context import set_forward_context
from atom.layers.attention import PagedAttentionMetadata
from atom.layers.kv_cache import allocate_kv_caches, bind_kv_caches, kv_cache_specs


class PagedHarness:
    def __init__(self, model, num_blocks: int = 256, block_size: int = 4, device="cpu"):
        self.model, self.block_size = model, block_size
        self.caches = allocate_kv_caches(kv_cache_specs(model), num_blocks, block_size, device)
        bind_kv_caches(model, self.caches)
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


TWO_PROMPTS = ([5, 9, 2, 77, 3, 14, 8, 40, 41], [4, 4, 60, 1, 2])


def prefill_then_decode(model, device, steps=((7, 8),)) -> torch.Tensor:
    """The logits of a prefill of TWO_PROMPTS (14 rows), then of one decode step (2 rows) per entry of steps (its
    tokens, one a sequence), as [2 * (1 + len(steps)), vocab] float32 on the CPU; 16 blocks of 4."""
    harness = PagedHarness(model, num_blocks=16, block_size=4, device=device)
    seqs = harness.add(2)
    out = [harness.step([list(p) for p in TWO_PROMPTS], seqs)]
    for tokens in steps:
        out.append(harness.step([[t] for t in tokens], seqs))
    return torch.cat(out).float().cpu()
