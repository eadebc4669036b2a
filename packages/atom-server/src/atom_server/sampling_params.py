"""Per-request sampling parameters, with vLLM's names, defaults and checks."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, replace
from typing import Any

# Every integer crosses the engine socket as msgpack and may end up in an int64 tensor.
INT64_MIN, INT64_MAX = -(1 << 63), (1 << 63) - 1
MAX_FLOAT_PARAM = 1e6  # temperature and repetition_penalty beyond this only produce NaNs or infinities
MAX_STOP_STRINGS = 64
MAX_STOP_STRING_CHARS = 1024
MAX_STOP_TOKEN_IDS = 1024
MAX_TOKEN_ID_LIST = 1 << 17  # allowed_token_ids, logit_bias entries
MAX_BAD_WORDS = 128
MAX_LOGIT_BIAS = 100.0  # OpenAI's range; values beyond are clamped (as vLLM)
GRAMMAR_KINDS = ("json", "regex", "choice", "grammar", "json_object", "structural_tag", "harmony_calls")


@dataclass
class StructuredOutputsParams:
    """vLLM's structured-output constraint: exactly one of json (a JSON schema, as a dict or its JSON text),
    regex, choice (the output is one of these strings), grammar (EBNF, xgrammar's dialect) or json_object
    (any JSON object). Enforced by xgrammar on the engine side (atom_server.engine.structured_output)."""

    json: str | dict | None = None
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None
    disable_any_whitespace: bool = False
    disable_additional_properties: bool = False
    whitespace_pattern: str | None = None
    structural_tag: str | None = None
    # gpt-oss (harmony): the constraint holds the final channel's message, which an analysis message may precede
    # (vLLM's structural tag for harmony); set by the chat layer, not a request field.
    harmony: bool = False
    # gpt-oss's forced tool calls ([name, parameters schema] pairs): an analysis message may come first, then a
    # commentary message to functions.NAME with a body valid against its schema; set by the chat layer.
    harmony_calls: list | None = None

    def __post_init__(self) -> None:
        given = [k for k in GRAMMAR_KINDS if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError("structured_outputs must set exactly one of json, regex, choice, grammar, json_object "
                             f"(got {', '.join(given) or 'none'})")
        if self.json_object is False:
            raise ValueError("structured_outputs json_object must be true when given")
        if self.choice is not None and (not self.choice or any(not isinstance(c, str) for c in self.choice)):
            raise ValueError("structured_outputs choice must be a non-empty list of strings")
        if self.whitespace_pattern is not None:
            raise ValueError("structured_outputs whitespace_pattern is not supported by atom-server (xgrammar); "
                             "use disable_any_whitespace")
        if self.structural_tag is not None:
            raise ValueError("structured_outputs structural_tag is not supported by atom-server")

    @property
    def kind(self) -> str:
        return next(k for k in GRAMMAR_KINDS if getattr(self, k) is not None)

    def json_schema_text(self) -> str:
        schema = self.json if self.json is not None else {"type": "object"}
        if isinstance(schema, str):
            schema = json.loads(schema)
        if self.disable_additional_properties:
            schema = _no_additional_properties(schema)
        return json.dumps(schema)


def _no_additional_properties(schema: Any) -> Any:
    """Every object schema without an explicit additionalProperties gets additionalProperties: false."""
    if isinstance(schema, list):
        return [_no_additional_properties(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: _no_additional_properties(v) for k, v in schema.items()}
    if out.get("type") == "object" or "properties" in out:
        out.setdefault("additionalProperties", False)
    return out


@dataclass
class SamplingParams:
    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1: off
    min_p: float = 0.0
    seed: int | None = None
    max_tokens: int | None = 16  # None: up to max_model_len
    min_tokens: int = 0
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    # Logits processors (vLLM's): only these ids may be sampled; ids whose logits get a bias added
    # (clamped to [-100, 100]); words that may not be generated (their token ids are filled in by the
    # front-end's tokenizer: bad_words_token_ids, vLLM's _bad_words_token_ids).
    allowed_token_ids: list[int] | None = None
    logit_bias: dict[int, float] | None = None
    bad_words: list[str] | None = None
    bad_words_token_ids: list[list[int]] | None = None
    # Keep only the last k prompt tokens (-1: as many as the context allows); applied by the front-end.
    truncate_prompt_tokens: int | None = None
    structured_outputs: StructuredOutputsParams | None = None

    def __post_init__(self) -> None:
        if isinstance(self.structured_outputs, dict):
            self.structured_outputs = StructuredOutputsParams(**self.structured_outputs)
        if self.logit_bias is not None:
            self.logit_bias = _logit_bias(self.logit_bias)
        if self.bad_words is not None:
            self.bad_words = list(dict.fromkeys(self.bad_words))
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        self.stop_token_ids = [int(t) for t in (self.stop_token_ids or [])]
        if self.top_k == -1:
            self.top_k = 0
        self._check()

    def _check(self) -> None:
        def bad(name: str, why: str) -> ValueError:
            return ValueError(f"{name} {why}, got {getattr(self, name)!r}")

        def integer(name: str, lo: int, hi: int = INT64_MAX, optional: bool = False, why: str = "") -> None:
            v = getattr(self, name)
            if optional and v is None:
                return
            if not isinstance(v, int) or isinstance(v, bool) or not lo <= v <= hi:
                raise bad(name, why or f"must be an integer in [{lo}, {hi}]")

        def finite(name: str, lo: float, hi: float, lo_open: bool = False, why: str = "") -> None:
            v = getattr(self, name)
            ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
            if not ok or not (lo < v if lo_open else lo <= v) or v > hi:
                raise bad(name, why or f"must be a number in {'(' if lo_open else '['}{lo}, {hi}]")

        integer("n", 1, why="must be an integer >= 1")
        finite("temperature", 0.0, MAX_FLOAT_PARAM, why=f"must be >= 0 (and at most {MAX_FLOAT_PARAM:g})")
        finite("top_p", 0.0, 1.0, lo_open=True, why="must be in (0, 1]")
        integer("top_k", 0, why="must be -1 or 0 (off) or a positive integer")
        finite("min_p", 0.0, 1.0, why="must be in [0, 1]")
        integer("max_tokens", 1, optional=True, why="must be an integer >= 1")
        integer("min_tokens", 0, why="must be an integer >= 0")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise bad("min_tokens", f"must be <= max_tokens ({self.max_tokens})")
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise bad("stop", "must hold non-empty strings")
        if len(self.stop) > MAX_STOP_STRINGS or any(len(s) > MAX_STOP_STRING_CHARS for s in self.stop):
            raise ValueError(f"stop must hold at most {MAX_STOP_STRINGS} strings of at most "
                             f"{MAX_STOP_STRING_CHARS} characters")
        if any(not 0 <= t <= INT64_MAX for t in self.stop_token_ids):
            raise bad("stop_token_ids", "must be non-negative token ids")
        if len(self.stop_token_ids) > MAX_STOP_TOKEN_IDS:
            raise ValueError(f"stop_token_ids must hold at most {MAX_STOP_TOKEN_IDS} ids")
        for name in ("logprobs", "prompt_logprobs"):
            integer(name, -1, optional=True, why="must be None, -1 (whole vocabulary) or an integer >= 0")
        for name in ("presence_penalty", "frequency_penalty"):
            finite(name, -2.0, 2.0, why="must be in [-2, 2]")
        finite("repetition_penalty", 0.0, MAX_FLOAT_PARAM, lo_open=True,
               why=f"must be > 0 (and at most {MAX_FLOAT_PARAM:g})")
        integer("seed", INT64_MIN, optional=True, why="must be an integer in the int64 range")
        if self.allowed_token_ids is not None:
            ids = self.allowed_token_ids
            if not ids or len(ids) > MAX_TOKEN_ID_LIST or any(
                    not isinstance(t, int) or isinstance(t, bool) or not 0 <= t <= INT64_MAX for t in ids):
                raise bad("allowed_token_ids", f"must hold 1 to {MAX_TOKEN_ID_LIST} non-negative token ids")
        if self.logit_bias is not None and len(self.logit_bias) > MAX_TOKEN_ID_LIST:
            raise ValueError(f"logit_bias must hold at most {MAX_TOKEN_ID_LIST} entries")
        if self.bad_words is not None:
            if len(self.bad_words) > MAX_BAD_WORDS or any(not isinstance(w, str) or not w.strip() or
                                                          len(w) > MAX_STOP_STRING_CHARS for w in self.bad_words):
                raise ValueError(f"bad_words must hold at most {MAX_BAD_WORDS} non-empty strings of at most "
                                 f"{MAX_STOP_STRING_CHARS} characters")
        if self.bad_words_token_ids is not None and any(
                not w or any(not isinstance(t, int) or t < 0 for t in w) for w in self.bad_words_token_ids):
            raise bad("bad_words_token_ids", "must hold non-empty lists of token ids")
        if self.truncate_prompt_tokens is not None:
            integer("truncate_prompt_tokens", -1, why="must be -1 (the context length) or an integer >= 1")
            if self.truncate_prompt_tokens == 0:
                raise bad("truncate_prompt_tokens", "must be -1 (the context length) or an integer >= 1")

    @property
    def greedy(self) -> bool:
        return self.temperature <= 1e-5

    @property
    def has_logits_processors(self) -> bool:
        """Anything besides temperature and penalties that changes which token is picked."""
        return bool(self.allowed_token_ids or self.logit_bias or self.bad_words_token_ids
                    or self.structured_outputs is not None)

    def update_from_tokenizer(self, tokenizer) -> None:
        """bad_words -> bad_words_token_ids (vLLM's rule: each word alone and after a space, when the spaced
        form is a different first token of the same length)."""
        if not self.bad_words:
            return
        ids: list[list[int]] = []
        for word in self.bad_words:
            plain = tokenizer.encode(word.lstrip(), add_special_tokens=False)
            if not plain:
                raise ValueError(f"bad_words: {word!r} makes no token")
            ids.append(plain)
            spaced = tokenizer.encode(" " + word.lstrip(), add_special_tokens=False)
            if spaced and spaced[0] != plain[0] and len(spaced) == len(plain):
                ids.append(spaced)
        self.bad_words_token_ids = ids

    def truncate(self, prompt_token_ids: list[int], max_model_len: int, side: str = "left") -> list[int]:
        """The prompt as truncate_prompt_tokens keeps it (left: the last k tokens, vLLM's default)."""
        k = self.truncate_prompt_tokens
        if k is None:
            return prompt_token_ids
        k = max_model_len - 1 if k == -1 else k
        if len(prompt_token_ids) <= k:
            return prompt_token_ids
        return list(prompt_token_ids[-k:] if side == "left" else prompt_token_ids[:k])

    @property
    def has_penalties(self) -> bool:
        return self.presence_penalty != 0.0 or self.frequency_penalty != 0.0 or self.repetition_penalty != 1.0

    def clone(self, **changes) -> SamplingParams:
        return replace(self, **changes)


def _logit_bias(bias: dict) -> dict[int, float]:
    """Token id keys (JSON gives strings), finite values clamped to [-100, 100]."""
    out: dict[int, float] = {}
    for key, value in bias.items():
        try:
            token = int(key)
        except (TypeError, ValueError):
            raise ValueError(f"logit_bias keys must be token ids, got {key!r}") from None
        if token < 0 or token > INT64_MAX:
            raise ValueError(f"logit_bias keys must be non-negative token ids, got {key!r}")
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ValueError(f"logit_bias values must be finite numbers, got {value!r}")
        out[token] = min(MAX_LOGIT_BIAS, max(-MAX_LOGIT_BIAS, float(value)))
    return out
