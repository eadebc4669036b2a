"""Vocabulary-parallel input embedding and LM head (tied or untied)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from atom.distributed import get_tp_group
from atom.ops import cpu_linear


class VocabParallelEmbedding(nn.Module):
    """Each rank holds a contiguous slice of the (padded) vocabulary; lookups are masked and all-reduced."""

    def __init__(self, num_embeddings: int, embedding_dim: int, params_dtype: torch.dtype | None = None):
        super().__init__()
        tp = get_tp_group()
        self.tp_rank, self.tp_size = tp.rank, tp.world_size
        self.num_embeddings = num_embeddings
        self.per_rank = -(-num_embeddings // self.tp_size)
        self.vocab_start = self.tp_rank * self.per_rank
        self.vocab_end = min(self.vocab_start + self.per_rank, num_embeddings)
        dtype = params_dtype or torch.get_default_dtype()
        self.weight = nn.Parameter(torch.empty(self.per_rank, embedding_dim, dtype=dtype), requires_grad=False)
        self.weight.weight_loader = self.weight_loader

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id=None) -> None:
        if loaded.shape[0] != self.num_embeddings or loaded.shape[1] != param.shape[1]:
            raise ValueError(
                f"shape mismatch for embedding: checkpoint {tuple(loaded.shape)}, "
                f"model ({self.num_embeddings}, {param.shape[1]})"
            )
        shard = loaded[self.vocab_start : self.vocab_end]
        param.data[: shard.shape[0]].copy_(shard)
        param.data[shard.shape[0] :].zero_()

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.tp_size == 1:
            return F.embedding(input_ids, self.weight)
        mask = (input_ids < self.vocab_start) | (input_ids >= self.vocab_end)
        local = (input_ids - self.vocab_start).masked_fill(mask, 0)
        out = F.embedding(local, self.weight).masked_fill(mask[..., None], 0)
        return get_tp_group().all_reduce(out)


class ParallelLMHead(VocabParallelEmbedding):
    """logits = hidden @ W^T; W is the embedding's when tied. Gathers the vocab shards for TP > 1."""

    def __init__(self, num_embeddings: int, embedding_dim: int, params_dtype=None,
                 tie_to: VocabParallelEmbedding | None = None):
        super().__init__(num_embeddings, embedding_dim, params_dtype)
        if tie_to is not None:
            self.weight = tie_to.weight

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = cpu_linear.linear(hidden, self.weight, None, self)
        if self.tp_size > 1:
            logits = get_tp_group().all_gather(logits, dim=-1)
        return logits[..., : self.num_embeddings]
