"""Sampling without a full-vocabulary sort where the parameters allow it.

One kernel does greedy and temperature sampling in a single read of the logits: the exponential race
argmax(p / E), E ~ Exp(1), written as argmax(logit / T - log(-log U)) with U drawn in-kernel (Philox)
from a per-row seed. Greedy rows (T = 0) take the plain argmax in the same pass. Top-k rows sample from
the torch.topk candidates (top-p then applies to those, already sorted); min-p needs only a max. Only
rows asking for top-p without top-k fall back to the reference's full sort.

Seeds: unseeded rows draw theirs from torch's global generator; a row with its own torch.Generator draws
its seed from it, so a seeded request gets the same tokens whatever else is in the batch (the draws differ
from the torch reference's, the distribution and that guarantee do not).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from atom.ops.registry import register
from atom.ops.sampling import apply_top_k_top_p_min_p
from atom.ops.triton_kernels.common import num_sms
from atom.ops.triton_kernels.pdl import pdl_args, pdl_wait

_SEED_HIGH = 2**31 - 1
# Beyond this many candidates, torch.topk costs about what a sort does: use the reference path.
_MAX_TOPK_CANDIDATES = 4096


@triton.jit
def _race_step(row_ptr, j, hi, r, temp, inv_t, best, best_j):
    x = tl.load(row_ptr + j, mask=j < hi, other=float("-inf")).to(tl.float32)
    u = tl.random.uint_to_uniform_float(r)
    score = tl.where(temp > 0.0, x * inv_t - tl.log(-tl.log(u)), x)
    take = score > best  # strict: the earliest index wins ties, like torch.argmax
    return tl.where(take, score, best), tl.where(take, j, best_j)


@triton.jit
def _race_kernel(x_ptr, temp_ptr, seed_ptr, best_ptr, best_idx_ptr, n, stride, chunk, NUM_SPLITS: tl.constexpr,
                 BLOCK: tl.constexpr, PDL: tl.constexpr):
    """Program (row, split) scans [split * chunk, (split + 1) * chunk) of its row: best score and its index.

    The Philox generator is the cost here (not the logits read): one randint4x call feeds four quarter-tiles.
    """
    pdl_wait(PDL)
    row = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1)
    temp = tl.load(temp_ptr + row)
    seed = tl.load(seed_ptr + row)
    inv_t = 1.0 / tl.where(temp > 0.0, temp, 1.0)
    QUARTER: tl.constexpr = BLOCK // 4
    best = tl.full([QUARTER], float("-inf"), tl.float32)
    best_j = tl.zeros([QUARTER], tl.int32)
    lane = tl.arange(0, QUARTER)
    lo = split * chunk  # a multiple of BLOCK, so counters start // 4 + lane never collide
    hi = tl.minimum(lo + chunk, n)
    row_ptr = x_ptr + row * stride
    for start in range(lo, hi, BLOCK):
        r0, r1, r2, r3 = tl.randint4x(seed, start // 4 + lane)
        best, best_j = _race_step(row_ptr, start + lane, hi, r0, temp, inv_t, best, best_j)
        best, best_j = _race_step(row_ptr, start + QUARTER + lane, hi, r1, temp, inv_t, best, best_j)
        best, best_j = _race_step(row_ptr, start + 2 * QUARTER + lane, hi, r2, temp, inv_t, best, best_j)
        best, best_j = _race_step(row_ptr, start + 3 * QUARTER + lane, hi, r3, temp, inv_t, best, best_j)
    top = tl.max(best, axis=0)
    j = tl.min(tl.where(best == top, best_j, n), axis=0)
    j = tl.minimum(j, n - 1)  # a row of all -inf / nan still yields a valid index
    tl.store(best_ptr + row * NUM_SPLITS + split, top)
    tl.store(best_idx_ptr + row * NUM_SPLITS + split, j)


_BLOCK = 2048


def _race(x: torch.Tensor, ids: torch.Tensor | None, temp: torch.Tensor, seeds: torch.Tensor) -> torch.Tensor:
    """argmax over each row of x / T - log(-log U) (of x where T = 0), mapped through ids if given."""
    rows, n = x.shape
    if rows == 0:
        return torch.empty(0, dtype=torch.int64, device=x.device)
    # Split long rows so that about four programs run per SM; splits are merged in order (ties: first).
    splits = max(1, min(triton.cdiv(4 * num_sms(x.device), rows), triton.cdiv(n, 4 * _BLOCK), 64))
    chunk = triton.cdiv(triton.cdiv(n, splits), _BLOCK) * _BLOCK
    best = torch.empty(rows, splits, dtype=torch.float32, device=x.device)
    best_idx = torch.empty(rows, splits, dtype=torch.int32, device=x.device)
    _race_kernel[(rows, splits)](x, temp, seeds, best, best_idx, n, x.stride(0), chunk, NUM_SPLITS=splits,
                                 BLOCK=min(_BLOCK, max(16, triton.next_power_of_2(n))), num_warps=4,
                                 **pdl_args(x.device))
    j = best_idx.gather(1, best.argmax(dim=1, keepdim=True)).long()
    return (ids.gather(1, j) if ids is not None else j).squeeze(1)


def _row_seeds(rows: int, generators: list[torch.Generator | None] | None, device: torch.device) -> torch.Tensor:
    seeds = torch.randint(0, _SEED_HIGH, (rows,), device=device)
    for i, g in enumerate(generators or []):
        if g is not None:
            seeds[i] = torch.randint(0, _SEED_HIGH, (1,), generator=g, device=g.device)[0]
    return seeds


def _topk_candidates(scaled: torch.Tensor, k: torch.Tensor, top_p: torch.Tensor | None):
    """Top-k (then top-p) over the k largest logits of each row: (masked candidate logits, their ids)."""
    vals, ids = torch.topk(scaled, int(k.max()), dim=-1)  # sorted, largest first
    rank = torch.arange(vals.shape[1], device=vals.device)
    vals = vals.masked_fill(rank[None, :] >= k[:, None], float("-inf"))
    if top_p is not None and bool((top_p < 1.0).any()):
        probs = torch.softmax(vals, dim=-1)
        cum_before = probs.cumsum(dim=-1) - probs
        vals = vals.masked_fill(cum_before >= top_p[:, None], float("-inf"))
    return vals, ids


@register("sample", "triton", cuda_graph=False)  # reads the batch's filters on the host
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
    rows, vocab = logits.shape
    greedy = temperature <= 1e-5
    if bool(greedy.all()):
        return logits.argmax(dim=-1)
    temp = torch.where(greedy, 0.0, temperature.float()).contiguous()
    seeds = _row_seeds(rows, generators, logits.device)
    has_k = (top_k > 0) & (top_k < vocab) if top_k is not None else torch.zeros_like(greedy)
    has_p = top_p < 1.0 if top_p is not None else torch.zeros_like(greedy)
    has_min_p = min_p is not None and bool((min_p > 0).any())
    if not (bool(has_k.any()) or bool(has_p.any()) or has_min_p):
        return _race(logits, None, temp, seeds)  # the fast path: one pass, no filter

    # Filters are defined on temperature-scaled logits (greedy rows use T = 1, as the reference does);
    # the race then runs at T = 1 (T = 0 keeps greedy rows greedy: their argmax survives every filter).
    scaled = logits / torch.where(greedy, 1.0, temperature.float())[:, None]
    if has_min_p:
        scaled = apply_top_k_top_p_min_p(scaled, None, None, min_p)
    race_temp = torch.where(greedy, 0.0, 1.0)
    k = torch.where(has_k, top_k, vocab).long() if top_k is not None else None
    p_without_k = bool((has_p & ~has_k).any())
    if p_without_k or not bool(has_k.any()) or int(k[has_k].max()) > _MAX_TOPK_CANDIDATES:
        scaled = apply_top_k_top_p_min_p(scaled, top_k, top_p, None)  # full sort, the reference's way
        return _race(scaled, None, race_temp, seeds)
    # Rows with top-k sample from their candidates; the others (no top-k, hence no top-p) from everything.
    if bool(has_k.all()):
        vals, ids = _topk_candidates(scaled, k, top_p)
        return _race(vals, ids, race_temp, seeds)
    sel = has_k.nonzero().squeeze(1)
    vals, ids = _topk_candidates(scaled[sel], k[sel], top_p[sel] if top_p is not None else None)
    tokens = _race(scaled, None, race_temp, seeds)
    tokens[sel] = _race(vals, ids, race_temp[sel].contiguous(), seeds[sel].contiguous())
    return tokens
