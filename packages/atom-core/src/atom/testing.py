"""What the four packages' test suites share: the devices a test runs on, and how far bfloat16 may be from
a float32 reference.

Devices: "cpu" always, plus "cuda" when a GPU is present (ROCm GPUs answer to "cuda" in torch). On a CPU-only
machine every device-aware test runs once, as before; on a GPU machine it runs on both. ATOM_TEST_DEVICES
(a comma list, e.g. "cuda") narrows the set, for a GPU run that leaves CPU to CI.

Dtypes: a test that compares against a reference states the dtype. Against transformers (or a host) in
float32, ATOM runs float32 on every device and meets the CPU tolerances on GPUs too: ATOM's Triton kernels
compute float32 dots in IEEE precision (input_precision="ieee", no TF32) and cuBLAS keeps TF32 off by
default. bfloat16 is compared with the bounds below.

bfloat16 bounds (measured by atom-core's test_models_parity: per position, max|bf16 - fp32| over the logits
row is 5e-3 to 1e-2 of max|fp32 logits| on the tiny checkpoints, MoE included; that test bounds the median at
BF16_REL_ERR):
- logits and logprobs of a position: within 2 * BF16_REL_ERR * max|reference row| (an error of up to
  BF16_REL_ERR on each side of a difference);
- teacher-forced logits over several sequences (atom-core's parity tests): the median position's
  max|bf16 - fp32| / max|fp32| under BF16_REL_ERR, and the argmax equal to the reference's at at least
  BF16_MIN_TOP1 of the positions, counting a different argmax as a miss only where the reference is clearly
  ahead (a bf16 router near-tie sends a token to another expert and its KV moves the rest of that sequence, and
  top-2 logits within the bf16 error flip either way; a systematic bug moves most positions and is caught by
  both bounds). With five sequences 800 fresh draws of qwen3_moe_norm_topk met both (with three, 5 did not);
- greedy tokens: the reference is run on the engine's own tokens (teacher forcing, so one flip does not
  cascade into the rest of the sequence); where the engine's pick is not the reference's argmax, it counts as
  a divergence only when the reference's argmax is clearly ahead of it, by more than that margin (the
  reference's top-2 logits are then clearly apart). Near-ties may flip; and at least BF16_MIN_TOP1 of all
  positions must agree exactly (atom-core's top-1 bound), so a wholesale drift cannot hide behind them.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch

BF16_REL_ERR = 2.5e-2
BF16_MIN_TOP1 = 0.8


def devices_under_test() -> list[str]:
    """The devices under test: "cpu", plus "cuda" when a GPU is present; ATOM_TEST_DEVICES narrows them."""
    found = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    wanted = [d.strip() for d in os.environ.get("ATOM_TEST_DEVICES", "").split(",") if d.strip()]
    if not wanted:
        return found
    unknown = [d for d in wanted if d not in ("cpu", "cuda")]
    if unknown:
        raise ValueError(f"ATOM_TEST_DEVICES: unknown device(s) {unknown}; use cpu and/or cuda")
    return [d for d in found if d in wanted]



def bf16_margin(ref_row: torch.Tensor, rel_err: float = BF16_REL_ERR) -> float:
    """How far a bfloat16 logit or logprob may be from the float32 reference at this position."""
    return 2 * rel_err * float(ref_row.float().abs().max())


def bf16_logits_stats(got: torch.Tensor, want: torch.Tensor, rel_err: float = BF16_REL_ERR) -> dict[str, float]:
    """bfloat16 logits [positions, vocab] against float32 reference logits of the same teacher-forced positions:
    the median and worst per-position max|got - want| / max|want|, the fraction of positions whose argmax equals
    the reference's, and the fraction whose argmax differs where the reference's argmax is ahead of it by more
    than bf16_margin (a clear miss, not a near-tie)."""
    got, want = got.float().cpu(), want.float().cpu()
    if got.shape != want.shape or got.dim() != 2:
        raise ValueError(f"logits {tuple(got.shape)} and reference {tuple(want.shape)}: want equal [positions, vocab]")
    row_err = (got - want).abs().amax(-1) / want.abs().amax(-1)
    pick, best = got.argmax(-1), want.argmax(-1)
    gap = want.gather(1, best[:, None])[:, 0] - want.gather(1, pick[:, None])[:, 0]
    margin = 2 * rel_err * want.abs().amax(-1)
    return {"median": float(row_err.median()), "worst": float(row_err.max()),
            "top1": float((pick == best).float().mean()), "clear_misses": float((gap > margin).float().mean())}


def assert_bf16_logits_close(stats: dict[str, float], rel_err: float = BF16_REL_ERR,
                             min_top1: float = BF16_MIN_TOP1) -> None:
    """The bounds on bf16_logits_stats (see the module's docstring)."""
    problems = []
    if stats["median"] >= rel_err:
        problems.append(f"median per-position rel_err {stats['median']:.2e} >= {rel_err:.1e}")
    if stats["clear_misses"] > 1 - min_top1:
        problems.append(f"the argmax differs from the reference's where it is clearly ahead at "
                        f"{stats['clear_misses']:.0%} of the positions, more than {1 - min_top1:.0%}")
    if problems:
        raise AssertionError("bfloat16 logits far from the float32 reference: " + "; ".join(problems)
                             + f" (worst position {stats['worst']:.2e}, argmax equal at {stats['top1']:.0%})")


def bf16_greedy_divergences(tokens: Sequence[int], ref_logits: torch.Tensor,
                            rel_err: float = BF16_REL_ERR) -> tuple[list[str], int]:
    """Compare one sequence's greedy tokens with float32 reference logits at the same positions
    (ref_logits[i]: the reference's logits for tokens[i], computed on the prompt plus tokens[:i]).

    Returns (divergences on a clear margin, each described; how many positions agree exactly)."""
    ref = ref_logits.float().cpu()
    if ref.shape[0] != len(tokens):
        raise ValueError(f"{len(tokens)} tokens but reference logits for {ref.shape[0]} positions")
    bad, agree = [], 0
    for i, (tok, row) in enumerate(zip(tokens, ref)):
        best = int(row.argmax())
        if tok == best:
            agree += 1
            continue
        gap, margin = float(row[best] - row[tok]), bf16_margin(row, rel_err)
        if gap > margin:
            bad.append(f"position {i}: token {tok}, reference argmax {best} ahead by {gap:.4f} > "
                       f"near-tie margin {margin:.4f}")
    return bad, agree


def assert_bf16_greedy_close(tokens: Sequence[Sequence[int]], ref_logits: Sequence[torch.Tensor],
                             rel_err: float = BF16_REL_ERR, min_top1: float = BF16_MIN_TOP1) -> None:
    """Several sequences: no divergence on a clear margin, and at least min_top1 of the positions exact."""
    problems, agree, total = [], 0, 0
    for n, (seq, ref) in enumerate(zip(tokens, ref_logits, strict=True)):
        bad, ok = bf16_greedy_divergences(seq, ref, rel_err)
        problems += [f"sequence {n}, {b}" for b in bad]
        agree, total = agree + ok, total + len(seq)
    if problems:
        raise AssertionError("bfloat16 greedy tokens diverge from the float32 reference where it has no "
                             "near-tie:\n" + "\n".join(problems))
    if total and agree / total < min_top1:
        raise AssertionError(f"bfloat16 greedy tokens equal the float32 reference's argmax at {agree} of "
                             f"{total} positions, fewer than {min_top1:.0%}")


def speed_up_triton_interpreter() -> bool:
    """Skip the Triton interpreter's redundant re-patching of triton.language on every @triton.jit helper call.

    Under TRITON_INTERPRET=1 a kernel launch patches triton.language's builtins to their interpreted forms once
    (and restores them after the grid). Each call of a jit'd helper inside the kernel runs `_patch_lang` again
    (Triton 3.x's `InterpretedFunction.__call__`): an `inspect.getmembers` walk over triton.language, its tensor
    class and math, ~2 ms a call, finding every builtin already patched, and nothing of it is restored. In the
    MXFP4 expert tests that walk was ~30% of the run. This keeps the walk where a helper's triton.language
    modules are not yet patched (the launch's own patch did not reach them) and skips it where they are, so a
    helper runs with the same functions either way. Installed by the suites' conftests under TRITON_INTERPRET=1
    only; a Triton whose helper call does not look like this (the source check) is left alone. Returns whether
    it was installed."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        return False
    try:
        import inspect

        import triton.language as tl
        from triton.runtime import interpreter as ti
    except ImportError:
        return False
    cls = getattr(ti, "InterpretedFunction", None)
    if cls is None or not hasattr(ti, "_patch_lang"):
        return False
    if getattr(cls.__call__, "_atom_fast", False):
        return True
    try:
        src = inspect.getsource(cls.__call__)
    except (OSError, TypeError):
        return False
    if "_patch_lang(self.fn)" not in src or "self.rewrite()" not in src or "InterpreterError" not in src:
        return False
    is_builtin, langs_of = tl.core.is_builtin, {}

    def call(self, *args, **kwargs):
        langs = langs_of.get(self.fn)
        if langs is None:
            langs = langs_of[self.fn] = [v for v in self.fn.__globals__.values()
                                         if inspect.ismodule(v) and v in (tl, tl.core)]
        # a patched module's `load` is the interpreter's wrapper, no longer a registered builtin
        if not langs or any(is_builtin(getattr(lang, "load", None)) for lang in langs):
            ti._patch_lang(self.fn)
        fn = self.rewrite()
        try:
            return fn(*args, **kwargs)
        except Exception as e:
            raise ti.InterpreterError(repr(e)) from e

    call._atom_fast = True
    cls.__call__ = call
    return True
