"""Structured outputs: grammars (xgrammar, as vLLM and SGLang) that constrain what a sequence may generate.

Where each part lives:
- `grammar_of(spec)` turns a `StructuredOutputsParams` into an xgrammar `Grammar` without a tokenizer (fast):
  the API process calls it to refuse a schema / regex / grammar that does not compile with a 400 naming the
  field, before anything reaches the engine.
- `GrammarCompiler` (engine core, scheduler side) compiles a request's spec against the tokenizer's
  vocabulary once (xgrammar caches compiled grammars) and gives every sequence of the request its own
  `SequenceGrammar`, a matcher that the engine core advances with each committed token (`accept`, a per-token
  loop: speculative decoding commits several tokens per step through the same call) and can roll back.
- `fill_bitmask(grammars)` packs the next-token bitmasks of a step's grammar rows (one int32 word per 32
  tokens, bit set = allowed) into bytes that travel in the StepInput's SamplingInputs; the model runner
  applies them to the logits on the device (`atom.ops.sampling.apply_token_bitmask`), batched, after the
  forward (and after a decode graph's replay, on its captured logits).
"""

from __future__ import annotations

import json
import logging
import re
import time

import numpy as np
import torch

from atom_server.sampling_params import StructuredOutputsParams

logger = logging.getLogger(__name__)


def _xgr():
    try:
        import xgrammar
    except ImportError as e:  # pragma: no cover - xgrammar is a dependency of atom-server
        raise ValueError("structured outputs need the xgrammar package (pip install xgrammar)") from e
    return xgrammar


def _ebnf_literal(text: str) -> str:
    out = []
    for ch in text:
        if ch in '\\"':
            out.append("\\" + ch)
        elif ch == "\n":
            out.append("\\n")
        elif ch == "\r":
            out.append("\\r")
        elif ch == "\t":
            out.append("\\t")
        elif ord(ch) < 0x20 or ch == "\x7f":
            out.append(f"\\u{ord(ch):04x}")
        else:
            out.append(ch)
    return '"' + "".join(out) + '"'


def choice_grammar(choices: list[str]) -> str:
    """EBNF whose only sentences are the choices."""
    if any(c == "" for c in choices):
        raise ValueError("choice must not hold an empty string")
    return "root ::= " + " | ".join(_ebnf_literal(c) for c in dict.fromkeys(choices))


# JSON may put whitespace between tokens (vLLM's default, any_whitespace); ATOM bounds each run of it, so a
# model that keeps emitting newlines (small models do, under a grammar that allows it) still has to make
# progress through the schema. Pretty-printed JSON (a newline and indentation) fits in the bound.
MAX_JSON_WHITESPACE = 16


def _whitespace_kwargs(spec: StructuredOutputsParams) -> dict:
    if spec.disable_any_whitespace:
        return {"any_whitespace": False, "separators": (",", ":")}
    return {"any_whitespace": True, "max_whitespace_cnt": MAX_JSON_WHITESPACE}


# What comes before the constrained text in a gpt-oss answer (spec.harmony): an optional analysis message (any
# text without "<|"), then the final channel's header; the markers are matched as text (the detokenized markers).
HARMONY_ANALYSIS = r"""
root ::= analysis?
analysis ::= "<|channel|>analysis<|message|>" body "<|end|><|start|>assistant"
body ::= ([^<] | "<" [^|])*
"""
def harmony_call_header(name: str) -> str:
    return f"<|channel|>commentary to=functions.{name} <|constrain|>json<|message|>"


HARMONY_PREFIX = HARMONY_ANALYSIS.replace("root ::= analysis?", 'root ::= analysis? "<|channel|>final<|message|>"')


def grammar_of(spec: StructuredOutputsParams):
    """The xgrammar Grammar of a spec (no tokenizer needed); ValueError saying what does not compile."""
    xgr = _xgr()
    kind = spec.kind
    try:
        if kind == "harmony_calls":
            calls = [xgr.Grammar.concat(xgr.Grammar.from_ebnf(f"root ::= {json.dumps(harmony_call_header(name))}"),
                                        xgr.Grammar.from_json_schema(json.dumps(schema), **_whitespace_kwargs(spec)))
                     for name, schema in spec.harmony_calls]
            body = calls[0] if len(calls) == 1 else xgr.Grammar.union(*calls)
            return xgr.Grammar.concat(xgr.Grammar.from_ebnf(HARMONY_ANALYSIS), body)
        if kind in ("json", "json_object"):
            grammar = xgr.Grammar.from_json_schema(spec.json_schema_text(), **_whitespace_kwargs(spec))
        elif kind == "regex":
            grammar = xgr.Grammar.from_regex(spec.regex)
        elif kind == "choice":
            grammar = xgr.Grammar.from_ebnf(choice_grammar(spec.choice))
        else:
            grammar = xgr.Grammar.from_ebnf(spec.grammar)
        return xgr.Grammar.concat(xgr.Grammar.from_ebnf(HARMONY_PREFIX), grammar) if spec.harmony else grammar
    except ValueError:
        raise
    except Exception as e:  # xgrammar raises RuntimeError with its parser's message
        raise ValueError(f"the {kind} constraint does not compile: {_short(e)}") from e


def _short(e: BaseException) -> str:
    """xgrammar's messages start with a timestamp and a C++ source location: keep the reason."""
    return re.sub(r"^\[[^\]]*\]\s*\S+:\d+:\s*", "", str(e).strip()).strip()


class SequenceGrammar:
    """One sequence's grammar state: advanced with each committed token, rolled back when asked."""

    __slots__ = ("matcher", "num_accepted")

    def __init__(self, matcher):
        self.matcher = matcher
        self.num_accepted = 0

    def accept(self, tokens: list[int]) -> bool:
        """Advance by committed tokens, one at a time; False at the first token the grammar does not allow
        (the tokens before it stay accepted). Tokens after the grammar terminated are ignored."""
        matcher = self.matcher
        for token in tokens:
            if matcher.is_terminated():
                return True
            if not matcher.accept_token(token):
                return False
            self.num_accepted += 1
        return True

    def rollback(self, num_tokens: int) -> None:
        if num_tokens > 0:
            self.matcher.rollback(num_tokens)
            self.num_accepted -= num_tokens

    @property
    def terminated(self) -> bool:
        """The grammar accepted a stop token: the sequence is complete."""
        return self.matcher.is_terminated()

    def fill(self, bitmask: torch.Tensor, row: int) -> None:
        self.matcher.fill_next_token_bitmask(bitmask, row)


class GrammarCompiler:
    """Engine side: compiles specs against the tokenizer (built on first use: ~0.5 s for a 50k vocabulary)."""

    def __init__(self, tokenizer, vocab_size: int, stop_token_ids: frozenset[int]):
        if tokenizer is None:
            raise ValueError("structured outputs need a tokenizer (the engine runs with skip_tokenizer_init)")
        xgr = _xgr()
        started = time.perf_counter()
        info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size,
                                                  stop_token_ids=sorted(stop_token_ids) or None)
        self.compiler = xgr.GrammarCompiler(info, max_threads=2, cache_enabled=True)
        self.vocab_size = vocab_size
        self.stop_token_ids = sorted(stop_token_ids) or None
        self.words = -(-vocab_size // 32)
        self._bitmask = xgr.allocate_token_bitmask(1, vocab_size)
        logger.info("structured outputs: xgrammar compiler for a vocabulary of %d built in %.2f s", vocab_size,
                    time.perf_counter() - started)

    def compile(self, spec: StructuredOutputsParams):
        kind = spec.kind
        c = self.compiler
        try:
            if spec.harmony or kind == "harmony_calls":
                return c.compile_grammar(grammar_of(spec))
            if kind in ("json", "json_object"):
                return c.compile_json_schema(spec.json_schema_text(), **_whitespace_kwargs(spec))
            if kind == "regex":
                return c.compile_regex(spec.regex)
            if kind == "choice":
                return c.compile_grammar(choice_grammar(spec.choice))
            return c.compile_grammar(spec.grammar)
        except ValueError:
            raise
        except Exception as e:
            raise ValueError(f"the {kind} constraint does not compile: {_short(e)}") from e

    def matchers(self, spec: StructuredOutputsParams, n: int) -> list[SequenceGrammar]:
        """One matcher per sequence of a request (the compiled grammar is shared)."""
        compiled = self.compile(spec)
        xgr = _xgr()
        return [SequenceGrammar(xgr.GrammarMatcher(compiled, override_stop_tokens=self.stop_token_ids))
                for _ in range(n)]

    def fill_bitmask(self, grammars: list[SequenceGrammar]) -> bytes:
        """The next-token bitmasks of these grammars, rows in order: int32 [len, ceil(vocab / 32)] as bytes."""
        if self._bitmask.shape[0] < len(grammars):
            self._bitmask = _xgr().allocate_token_bitmask(max(len(grammars), 2 * self._bitmask.shape[0]),
                                                          self.vocab_size)
        bitmask = self._bitmask
        for row, g in enumerate(grammars):
            g.fill(bitmask, row)
        return bitmask[:len(grammars)].numpy().tobytes()


def bitmask_array(data: bytes, rows: int) -> np.ndarray:
    """The int32 [rows, words] view of fill_bitmask's bytes."""
    return np.frombuffer(data, dtype=np.int32).reshape(rows, -1)


def parse_json_schema(value) -> dict:
    """A JSON schema given as a dict or its JSON text."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as e:
            raise ValueError(f"the JSON schema is not valid JSON: {e}") from e
    if not isinstance(value, (dict, bool)):
        raise ValueError("the JSON schema must be a JSON object")
    return value
