"""Verification of draft tokens: what a row keeps of its k drafts after the target scored them in one forward.

A verify row computes k + 1 positions: its last committed token, then drafts d_1..d_k. The target's logits at
position j (0-based) give the distribution of the token after it, so p_j scores d_{j+1} and p_k is the
distribution after the last draft. A row keeps a accepted drafts plus one token of its own (the bonus), so it
advances 1..k + 1 tokens.

- Greedy rows: d_{j+1} is accepted while it equals argmax p_j; the row emits argmax p_0..p_a: exactly the tokens
  greedy decoding without speculation produces.
- Sampled rows (standard rejection sampling, Leviathan et al. / Chen et al.): d_{j+1}, drawn from the draft
  distribution q_{j+1}, is accepted with probability min(1, p_j(d) / q_{j+1}(d)); at the first rejection the row
  draws from normalize(max(p_j - q_{j+1}, 0)) and stops; after k acceptances it draws its bonus from p_k. Every
  emitted token is then distributed exactly as the target's sampler would draw it. q is one-hot at d for
  deterministic drafters (n-gram, greedy MTP drafts); the MTP drafter of a sampled row draws its drafts from
  its head's distribution and hands q over. p is the distribution the target's sampler draws from (temperature,
  top-k, top-p, min-p applied), so sampling parameters keep their meaning.
- Synthetic rows (benchmarks): the number of accepted drafts is drawn from the configured rates, whatever the
  tokens; the bonus is the target's own token at that position.

Everything is batched over rows (padded to the longest row's k); seeded rows draw from their own generators,
so their draws do not depend on the rest of the batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from atom.ops.sampling import apply_top_k_top_p_min_p
from atom_server.engine.step_input import SamplingInputs


@dataclass
class Verdict:
    """Per row: the tokens it emits (accepted drafts, then one of its own) and where their logits are (indices
    into the verified positions, for logprobs)."""

    num_accepted: list[int]
    tokens: list[list[int]]


def padded_index(num_drafts: list[int], device) -> tuple[torch.Tensor, torch.Tensor]:
    """Flat logits rows of each row's k + 1 positions, padded to the longest: (index [R, K + 1], valid [R, K + 1]).
    Rows are laid out one after another (row r's positions start at the sum of the earlier rows' k + 1)."""
    counts = torch.tensor(num_drafts, dtype=torch.int64, device=device) + 1
    starts = torch.cumsum(counts, 0) - counts
    width = int(max(num_drafts)) + 1
    offs = torch.arange(width, device=device)
    valid = offs[None, :] < counts[:, None]
    index = starts[:, None] + torch.minimum(offs[None, :], counts[:, None] - 1)
    return index, valid


def target_probs(logits: torch.Tensor, sampling: SamplingInputs) -> torch.Tensor:
    """The distribution the sampler draws from: logits [N, V] / temperature, filtered (top-k, top-p, min-p);
    sampling: one entry per row of logits."""
    dev = logits.device

    def opt(values, dtype):
        return None if values is None else torch.tensor(values, dtype=dtype, device=dev)

    t = torch.tensor(sampling.temperature, dtype=torch.float32, device=dev)
    t = torch.where(t <= 1e-5, torch.ones_like(t), t)
    scaled = apply_top_k_top_p_min_p(logits.float() / t[:, None], opt(sampling.top_k, torch.int64),
                                     opt(sampling.top_p, torch.float32), opt(sampling.min_p, torch.float32))
    return torch.softmax(scaled, dim=-1)


def draw(probs: torch.Tensor, generators: list[torch.Generator | None] | None) -> torch.Tensor:
    """One token per row of probs [R, V] (exponential race: argmax p / E, E ~ Exp(1)); row i draws from
    generators[i] when given."""
    noise = torch.empty_like(probs)
    noise.exponential_()
    for i, g in enumerate(generators or []):
        if g is not None:
            noise[i].exponential_(generator=g)
    return (probs / noise).argmax(dim=-1)


def _uniform(shape: tuple[int, int], device, generators: list[torch.Generator | None] | None) -> torch.Tensor:
    u = torch.rand(shape, device=device)
    for i, g in enumerate(generators or []):
        if g is not None:
            u[i] = torch.rand(shape[1], device=device, generator=g)
    return u


def verify_greedy(logits: torch.Tensor, drafts: list[list[int]]) -> Verdict:
    """logits [sum(k + 1), V] of the rows' positions, row after row; drafts: each row's k drafts."""
    best = logits.argmax(dim=-1).tolist()
    starts = [0]
    for d in drafts:
        starts.append(starts[-1] + len(d) + 1)
    return accept_greedy([best[a:b] for a, b in zip(starts, starts[1:])], drafts)


def accept_greedy(best: list[list[int]], drafts: list[list[int]]) -> Verdict:
    """Greedy verification from the target's argmax at each row's k + 1 positions (best; a CUDA graph computes
    them): a row keeps its drafts while each equals the argmax before it, then the argmax where it stops."""
    accepted = []
    for b, d in zip(best, drafts):
        a = 0
        while a < len(d) and d[a] == b[a]:
            a += 1
        accepted.append(a)
    return Verdict(accepted, [b[:a + 1] for b, a in zip(best, accepted)])


def verify_sampled(probs: torch.Tensor, drafts: list[list[int]], draft_probs: list[torch.Tensor | None],
                   generators: list[torch.Generator | None] | None) -> Verdict:
    """Rejection sampling. probs [sum(k + 1), V]: the target's distributions at the rows' positions (row after
    row); drafts: each row's k drafts; draft_probs: per row None (q one-hot at the drafts) or [k, V], the
    distributions the drafts were drawn from; generators: per row (None: the global generator)."""
    dev = probs.device
    num = [len(d) for d in drafts]
    rows = len(drafts)
    index, valid = padded_index(num, dev)
    p = probs[index]  # [R, K + 1, V]
    width = index.shape[1]
    k = width - 1
    d = torch.tensor([r + [0] * (k - len(r)) for r in drafts], dtype=torch.int64, device=dev)  # [R, K]
    q = torch.zeros(rows, k, probs.shape[-1], dtype=probs.dtype, device=dev)
    if k:
        q.scatter_(2, d[..., None], 1.0)  # one-hot unless the drafter gave its distribution
        for r, qr in enumerate(draft_probs):
            if qr is not None and num[r]:
                q[r, :num[r]] = qr[:num[r]].to(q.dtype)
    p_d = p[:, :k].gather(2, d[..., None])[..., 0]  # p_j(d_{j+1})
    q_d = q.gather(2, d[..., None])[..., 0]
    u = _uniform((rows, max(k, 1)), dev, generators)[:, :k]
    accept = (u * q_d < p_d) & valid[:, 1:]
    accepted = torch.cumprod(accept.to(torch.int64), dim=1).sum(dim=1)  # [R]
    ar = torch.arange(rows, device=dev)
    at = p[ar, accepted]  # the target's distribution where the row stops
    rejected = accepted < torch.tensor(num, device=dev)
    if k:
        q_at = q[ar, accepted.clamp(max=k - 1)]
        residual = (at - q_at).clamp(min=0)
        mass = residual.sum(dim=-1, keepdim=True)
        # p <= q everywhere means p == q: a rejection cannot happen then (kept exact against rounding)
        residual = torch.where(mass > 0, residual / mass.clamp(min=1e-30), at)
        at = torch.where(rejected[:, None], residual, at)
    last = draw(at, generators).tolist()
    accepted = accepted.tolist()
    return Verdict(accepted, [drafts[r][:a] + [last[r]] for r, a in enumerate(accepted)])


def synthetic_accepted(rates: tuple[float, ...], num_drafts: list[int], generator: torch.Generator) -> list[int]:
    """Benchmarks: accepted drafts per row drawn from unconditional per-position rates (position j is accepted
    with probability rates[j] / rates[j - 1] given that j - 1 was), capped at each row's drafts."""
    out = []
    for k in num_drafts:
        a = 0
        prev = 1.0
        while a < k:
            r = rates[a]
            cond = r / prev if prev > 0 else 0.0
            if cond < 1.0 and float(torch.rand((), generator=generator)) >= cond:
                break
            prev = r
            a += 1
        out.append(a)
    return out
