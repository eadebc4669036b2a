"""Incremental detokenization and stop strings, on a real byte-level BPE tokenizer."""

from __future__ import annotations

import pytest
from tiny_checkpoint import build_tokenizer

from atom_server.engine.detokenizer import IncrementalDetokenizer
from atom_server.sampling_params import SamplingParams


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


def _feed(tok, prompt: str, text: str, params: SamplingParams):
    detok = IncrementalDetokenizer(tok, tok(prompt)["input_ids"], params)
    seen, stop = [], None
    for t in tok(text)["input_ids"]:
        stop = detok.add_token(t)
        seen.append(detok.output_text(finished=stop is not None))
        if stop is not None:
            break
    return detok, seen, stop


@pytest.mark.parametrize("text", ["Hello world! How are you today?", "héllo wörld ✓ 日本語 ok",
                                  "Numbers: 0 1 2 3"])
def test_incremental_text_equals_full_decode(tok, text):
    detok, seen, stop = _feed(tok, "The quick brown fox", text, SamplingParams())
    assert stop is None
    assert detok.text == tok.decode(tok(text)["input_ids"]) == text
    assert all("\ufffd" not in s for s in seen)  # never a half multi-byte character
    assert all(seen[i].startswith(seen[i - 1]) for i in range(1, len(seen)))


@pytest.mark.parametrize("include", [False, True])
def test_stop_string_cuts_text_and_never_leaks_a_partial_stop(tok, include):
    text = "Hello world! How are you today?"
    stops = ["are you", "xyz"]
    detok, seen, stop = _feed(tok, "Hi", text, SamplingParams(stop=stops, include_stop_str_in_output=include))
    assert stop == "are you"
    assert detok.text == ("Hello world! How are you" if include else "Hello world! How ")
    for s in seen[:-1]:
        assert not any(s.endswith(p[:k]) for p in stops for k in range(1, len(p)))
        assert detok.text.startswith(s) or (include is False and s.startswith(detok.text))


def test_stop_string_waits_for_min_tokens(tok):
    text = "Hello world! Hello world!"
    n_first = len(tok("Hello")["input_ids"])
    detok, _, stop = _feed(tok, "Hi", text, SamplingParams(stop=["Hello"], min_tokens=n_first + 1))
    assert stop == "Hello"
    assert detok.text == "Hello world! "


def test_skip_special_tokens(tok):
    ids = tok("Hello")["input_ids"] + [tok.eos_token_id] + tok(" world")["input_ids"]
    for skip, want in [(True, "Hello world"), (False, "Hello</s> world")]:
        detok = IncrementalDetokenizer(tok, [5], SamplingParams(skip_special_tokens=skip))
        for t in ids:
            detok.add_token(t)
        assert detok.text == want


def test_flush_emits_held_back_bytes_at_the_end(tok):
    ids = tok("ok ✓")["input_ids"]
    cut = ids[:-1]  # ends inside the 3-byte character
    assert tok.decode(cut).endswith("\ufffd")
    detok = IncrementalDetokenizer(tok, [5], SamplingParams())
    for t in cut:
        detok.add_token(t)
    assert "\ufffd" not in detok.text
    detok.flush()
    assert detok.text == tok.decode(cut)
