"""Token sampling from logits with per-row parameters.

temperature 0 means greedy. top_k <= 0 (or >= vocab) and top_p >= 1 and min_p <= 0 mean "off".
Rows with a torch.Generator (per-request seed) draw from it, so a seeded request gives the same tokens
whatever else is in the batch.
"""

from __future__ import annotations

import torch

from atom.ops.registry import define_op, register

# Host-side op (the runner calls it on logits, outside the model): not a custom op (per-row torch.Generators
# have no schema type); its self-check is greedy rows, where every implementation must give the argmax.
define_op("sample", custom_op=False, example=lambda t, static: (
    t.randn(4, 1000, dtype=torch.float32), torch.zeros(4, dtype=torch.float32, device=t.device)))


def apply_top_k_top_p_min_p(
    logits: torch.Tensor, top_k: torch.Tensor | None, top_p: torch.Tensor | None, min_p: torch.Tensor | None
) -> torch.Tensor:
    """Mask (to -inf) what top-k, top-p and min-p filter out. logits: [B, V] float32."""
    vocab = logits.shape[-1]
    if min_p is not None and bool((min_p > 0).any()):
        probs = torch.softmax(logits, dim=-1)
        threshold = probs.max(dim=-1, keepdim=True).values * min_p[:, None]
        logits = logits.masked_fill(probs < threshold, float("-inf"))
    need_k = top_k is not None and bool(((top_k > 0) & (top_k < vocab)).any())
    need_p = top_p is not None and bool((top_p < 1.0).any())
    if not (need_k or need_p):
        return logits
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    if need_k:
        k = torch.where((top_k > 0) & (top_k < vocab), top_k, vocab).long()
        kth = sorted_logits.gather(1, (k - 1)[:, None])
        sorted_logits = sorted_logits.masked_fill(sorted_logits < kth, float("-inf"))
    if need_p:
        probs = torch.softmax(sorted_logits, dim=-1)
        cum_before = probs.cumsum(dim=-1) - probs  # mass strictly above each token
        sorted_logits = sorted_logits.masked_fill(cum_before >= top_p[:, None], float("-inf"))
    return torch.full_like(logits, float("-inf")).scatter(1, order, sorted_logits)


def apply_token_bitmask(logits: torch.Tensor, bitmask: torch.Tensor, rows: torch.Tensor | None = None) -> None:
    """Structured outputs: mask (to -inf, in place) the tokens a grammar does not allow. bitmask: int32
    [k, ceil(V / 32)] (xgrammar's layout: bit j of word i allows token 32 i + j); rows: the k rows of logits
    it applies to (None: the first k). Batched and shape-static: one device op chain for every grammar row."""
    vocab = logits.shape[-1]
    k = bitmask.shape[0]
    shifts = torch.arange(32, dtype=torch.int32, device=bitmask.device)
    allowed = ((bitmask.unsqueeze(-1) >> shifts) & 1).to(torch.bool).flatten(1)
    if allowed.shape[1] < vocab:  # ids past the bitmask are never allowed
        allowed = torch.nn.functional.pad(allowed, (0, vocab - allowed.shape[1]), value=False)
    allowed = allowed[:, :vocab]
    if rows is None:
        logits[:k].masked_fill_(~allowed, float("-inf"))
    else:
        logits[rows] = logits[rows].masked_fill(~allowed, float("-inf"))


@register("sample", "torch", cuda_graph=False)
def sample(
    logits: torch.Tensor,
    temperature: torch.Tensor,
    top_k: torch.Tensor | None = None,
    top_p: torch.Tensor | None = None,
    min_p: torch.Tensor | None = None,
    generators: list[torch.Generator | None] | None = None,
) -> torch.Tensor:
    """logits [B, V] -> token ids [B] (int64)."""
    logits = logits.float()
    greedy = temperature <= 1e-5
    tokens = logits.argmax(dim=-1)
    if bool(greedy.all()):
        return tokens
    temp = torch.where(greedy, torch.ones_like(temperature), temperature).float()
    scaled = apply_top_k_top_p_min_p(logits / temp[:, None], top_k, top_p, min_p)
    probs = torch.softmax(scaled, dim=-1)
    # Exponential-race sampling: argmax(p / E) with E ~ Exp(1) draws from p without a CDF walk.
    noise = torch.empty_like(probs)
    seeded = [i for i, g in enumerate(generators or []) if g is not None]
    noise.exponential_()
    for i in seeded:
        noise[i].exponential_(generator=generators[i])
    sampled = (probs / noise).argmax(dim=-1)
    return torch.where(greedy, tokens, sampled)
