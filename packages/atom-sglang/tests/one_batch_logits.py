"""Compare the logits one_batch computed (run_one_batch.py, ATOM_SGL_DUMP_LOGITS) with transformers'.

one_batch --correctness-test runs, per prompt: an extend of the first `cut_len` tokens, an extend of the rest
over that cached prefix, then greedy decode steps. Given transformers' greedy continuation of the same ids,
every one of those logits rows is a row of one transformers forward over the continuation.
"""

from __future__ import annotations

import torch


def logit_errors(hf, input_ids: list[list[int]], greedy: list[list[int]], calls: list[dict],
                 cut_len: int = 4) -> list[float]:
    """Max relative error (max |a - b| / max |b|) of each recorded call, in order, over all prompts.

    Decode steps are compared where SGLang's greedy tokens so far equal transformers' (the caller checks
    the texts); `greedy[i]` holds input_ids[i] plus transformers' greedy tokens."""
    kinds = [c["kind"] for c in calls]
    n_extend = kinds.count("extend")
    assert kinds == ["extend"] * n_extend + ["decode"] * (len(kinds) - n_extend) and n_extend in (1, 2), kinds
    positions = []  # per call: the position of the row it predicts from, per prompt
    if n_extend == 2:
        positions.append([cut_len - 1] * len(input_ids))
    positions.append([len(ids) - 1 for ids in input_ids])
    for step in range(len(kinds) - n_extend):
        positions.append([len(ids) + step for ids in input_ids])
    with torch.no_grad():
        ref = [hf(torch.tensor([g])).logits[0].float() for g in greedy]
    errors = []
    for call, pos in zip(calls, positions):
        got = call["logits"].float()
        want = torch.stack([ref[i][p] for i, p in enumerate(pos)])
        assert got.shape == want.shape, (got.shape, want.shape)
        errors.append(((got - want).abs().max() / want.abs().max()).item())
    return errors
