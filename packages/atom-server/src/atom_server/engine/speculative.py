"""Speculative decoding: the configuration (vLLM's `speculative_config` fields) and the n-gram drafter.

Two drafting methods:
- "mtp": the checkpoint's multi-token-prediction layer (DeepSeek-V3 / GLM-4-MoE, `num_nextn_predict_layers`)
  drafts on the runner, right after each target forward (engine/mtp_drafter.py);
- "ngram": prompt lookup on the scheduler side (`NgramProposer`): the tokens that followed the earliest
  earlier occurrence of the sequence's longest suffix n-gram (n in [prompt_lookup_min, prompt_lookup_max]).
  No weights: works with every model.
The target verifies the drafts of a row in one forward (engine/rejection_sampler.py decides what it keeps).

For benchmarks only, `rejection_sample_method: "synthetic"` (vLLM's name) replaces verification with a forced
acceptance: `synthetic_acceptance_length` L in [1, K + 1] (the mean tokens a verify step commits per sequence,
bonus token included) or `synthetic_acceptance_rates` (per draft position, the unconditional probability that
it and every draft before it are accepted). Outputs are then not the model's: this measures the mechanism
(the cost of a verify step, the speed-up at a given acceptance) on random weights.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import numpy as np

METHODS = ("mtp", "ngram")
# vLLM's older per-model MTP method names that it maps to "mtp" (those of the models ATOM drafts for)
MTP_ALIASES = ("deepseek_mtp", "glm4_moe_mtp")
MAX_SPECULATIVE_TOKENS = 8
_FIELDS = ("method", "num_speculative_tokens", "prompt_lookup_max", "prompt_lookup_min", "rejection_sample_method",
           "synthetic_acceptance_length", "synthetic_acceptance_rates")


@dataclass(frozen=True)
class SpeculativeConfig:
    method: str
    num_speculative_tokens: int
    prompt_lookup_max: int = 0
    prompt_lookup_min: int = 0
    rejection_sample_method: str = "standard"  # "standard" | "synthetic" (benchmarks: forced acceptance)
    synthetic_acceptance_rates: tuple[float, ...] | None = field(default=None)

    @property
    def k(self) -> int:
        return self.num_speculative_tokens

    @property
    def is_mtp(self) -> bool:
        return self.method == "mtp"

    @property
    def synthetic(self) -> bool:
        return self.rejection_sample_method == "synthetic"

    @property
    def lookahead_slots(self) -> int:
        """KV slots a row that reaches the end of its tokens holds past its last token: K for the drafts the
        next step verifies, plus K - 1 for the MTP's draft steps, which write its cache at the positions of the
        drafts they read. (A verify graph pads a row with fewer drafts in front, at positions it already holds.)"""
        return self.k + (self.k - 1 if self.is_mtp else 0)

    @classmethod
    def from_fields(cls, fields: dict[str, Any]) -> SpeculativeConfig:
        """The config from its fields as a dict (how it reaches a tensor-parallel worker, through JSON)."""
        rates = fields.get("synthetic_acceptance_rates")
        return cls(**{**fields, "synthetic_acceptance_rates": None if rates is None else tuple(rates)})

    def describe(self) -> str:
        extra = (f", prompt_lookup {self.prompt_lookup_min}..{self.prompt_lookup_max}" if self.method == "ngram"
                 else "")
        if self.synthetic:
            extra += f", SYNTHETIC acceptance (benchmark only) {list(self.synthetic_acceptance_rates)}"
        return f"{self.method}, {self.k} speculative tokens{extra}"


def parse_speculative_config(value: str | dict[str, Any] | None, num_mtp_layers: int | None = None
                             ) -> SpeculativeConfig | None:
    """vLLM's speculative_config (a dict, or its JSON text from --speculative-config) -> SpeculativeConfig.
    ValueError naming the field for anything it cannot run. num_mtp_layers: the checkpoint's
    num_nextn_predict_layers, the default num_speculative_tokens of "mtp" (as vLLM); None when not known yet."""
    if value is None or value == {} or value == "":
        return None
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError as e:
            raise ValueError(f"speculative_config: not valid JSON ({e}): {value!r:.200}") from None
    if not isinstance(value, dict):
        raise ValueError(f"speculative_config must be a JSON object, got {type(value).__name__}")
    unknown = sorted(set(value) - set(_FIELDS))
    if unknown:
        raise ValueError(f"speculative_config: unsupported field(s) {', '.join(unknown)}; supported: "
                         f"{', '.join(_FIELDS)}")

    def integer(name: str, lo: int, hi: int) -> int | None:
        v = value.get(name)
        if v is None:
            return None
        if not isinstance(v, int) or isinstance(v, bool) or not lo <= v <= hi:
            raise ValueError(f"speculative_config.{name} must be an integer in [{lo}, {hi}], got {v!r}")
        return v

    method = value.get("method")
    if method in MTP_ALIASES:
        method = "mtp"
    if method not in METHODS:
        raise ValueError(f"speculative_config.method must be one of {', '.join(METHODS)}, got {method!r} "
                         "(or {', '.join(MTP_ALIASES)}, vLLM's older names of 'mtp'; draft models, EAGLE and Medusa heads "
                         "are not supported)")
    k = integer("num_speculative_tokens", 1, MAX_SPECULATIVE_TOKENS)
    if k is None:
        if method == "mtp" and num_mtp_layers:
            k = num_mtp_layers
        elif method == "mtp" and num_mtp_layers is None:
            k = 1  # checked again against the checkpoint once its config is read
        else:
            raise ValueError("speculative_config.num_speculative_tokens is required"
                             + (" (the checkpoint has no MTP layers to take it from)" if method == "mtp" else ""))
    lo = integer("prompt_lookup_min", 1, 1 << 16)
    hi = integer("prompt_lookup_max", 1, 1 << 16)
    if method == "ngram":
        if lo is None and hi is None:
            lo = hi = 5  # vLLM's defaults
        lo = hi if lo is None else lo
        hi = lo if hi is None else hi
        if lo > hi:
            raise ValueError(f"speculative_config.prompt_lookup_min={lo} must be <= prompt_lookup_max={hi}")
    elif lo is not None or hi is not None:
        raise ValueError("speculative_config.prompt_lookup_min/max apply to method 'ngram' only")
    rs = value.get("rejection_sample_method", "standard")
    if rs not in ("standard", "synthetic"):
        raise ValueError(f"speculative_config.rejection_sample_method must be 'standard' or 'synthetic' "
                         f"(benchmarks: forced acceptance), got {rs!r}")
    rates = _synthetic_rates(value, k) if rs == "synthetic" else None
    if rs != "synthetic" and (value.get("synthetic_acceptance_length") is not None
                              or value.get("synthetic_acceptance_rates") is not None):
        raise ValueError("speculative_config.synthetic_acceptance_length/rates need "
                         "rejection_sample_method 'synthetic'")
    return SpeculativeConfig(method, k, hi or 0, lo or 0, rs, rates)


def _synthetic_rates(value: dict[str, Any], k: int) -> tuple[float, ...]:
    """Per-position unconditional acceptance rates from exactly one of synthetic_acceptance_rates /
    synthetic_acceptance_length (the least-variance schedule: whole drafts always, then the fraction)."""
    rates, length = value.get("synthetic_acceptance_rates"), value.get("synthetic_acceptance_length")
    if (rates is None) == (length is None):
        raise ValueError("speculative_config: rejection_sample_method 'synthetic' needs exactly one of "
                         "synthetic_acceptance_length, synthetic_acceptance_rates")
    if rates is not None:
        if (not isinstance(rates, list) or len(rates) != k
                or not all(isinstance(r, (int, float)) and not isinstance(r, bool) and 0 <= r <= 1 for r in rates)):
            raise ValueError(f"speculative_config.synthetic_acceptance_rates must be {k} numbers in [0, 1], "
                             f"got {rates!r}")
        if any(rates[i] > rates[i - 1] for i in range(1, k)):
            raise ValueError(f"speculative_config.synthetic_acceptance_rates must not increase, got {rates!r}")
        return tuple(float(r) for r in rates)
    if not isinstance(length, (int, float)) or isinstance(length, bool) or not 1 <= length <= k + 1:
        raise ValueError(f"speculative_config.synthetic_acceptance_length must be in [1, {k + 1}], got {length!r}")
    return synthetic_rates_for_length(k, length)


def synthetic_rates_for_length(k: int, length: float) -> tuple[float, ...]:
    """The per-position rates of synthetic_acceptance_length (in [1, K + 1]): whole drafts always accepted, then
    the fraction (the least-variance schedule)."""
    drafts = float(length) - 1
    whole = int(drafts)
    return tuple(([1.0] * whole + [drafts - whole] + [0.0] * k)[:k])


class NgramProposer:
    """Prompt lookup (vLLM's "ngram"): the longest suffix n-gram of the tokens (n from prompt_lookup_max down to
    prompt_lookup_min) that occurred earlier; up to K tokens that followed its earliest earlier occurrence."""

    def __init__(self, config: SpeculativeConfig):
        self.k = config.k
        self.min_n = config.prompt_lookup_min
        self.max_n = config.prompt_lookup_max

    def propose(self, token_ids: list[int], limit: int) -> list[int]:
        """At most min(K, limit) draft tokens to follow token_ids (empty: no match)."""
        k = min(self.k, limit)
        total = len(token_ids)
        if k <= 0 or total <= self.min_n:
            return []
        tokens = np.asarray(token_ids, dtype=np.int64)
        for n in range(min(self.max_n, total - 1), self.min_n - 1, -1):
            # windows that end before the last token (the suffix itself is not a match; overlaps are)
            windows = np.lib.stride_tricks.sliding_window_view(tokens[:-1], n)
            hits = np.flatnonzero((windows == tokens[total - n:]).all(axis=1))
            if hits.size:
                start = int(hits[0]) + n
                return tokens[start:start + k].tolist()
        return []
