"""Engine outputs -> OpenAI response objects (completions and chat; whole and streamed deltas)."""

from __future__ import annotations

import functools

from atom_server.outputs import Logprob, RequestOutput

_MIN_LOGPROB = -9999.0  # JSON has no -inf


def _lp(x: float) -> float:
    return max(float(x), _MIN_LOGPROB)


class TokenText:
    """Text of single tokens for logprobs, as the engine decoded them or via the tokenizer."""

    def __init__(self, tokenizer):
        self._decode = functools.lru_cache(maxsize=65536)(lambda t: tokenizer.decode([t]))

    def __call__(self, token_id: int, lp: Logprob | None = None) -> str:
        if lp is not None and lp.decoded_token is not None:
            return lp.decoded_token
        return self._decode(token_id)


def _top(entries: dict[int, Logprob], k: int) -> list[tuple[int, Logprob]]:
    """The k most likely entries by rank (the sampled token only when it is among them)."""
    ranked = sorted(entries.items(), key=lambda kv: (kv[1].rank if kv[1].rank is not None else 1 << 30,
                                                     -kv[1].logprob))
    return ranked[:k] if k >= 0 else ranked


def completion_logprobs(token_ids: list[int], entries: list, k: int, text_of: TokenText,
                        offset: int) -> dict:
    """The legacy completions logprobs object for a run of tokens starting at text offset `offset`.
    entries[i] is None for a token without a logprob (the first prompt token under echo)."""
    tokens, token_logprobs, top_logprobs, text_offset = [], [], [], []
    for tid, lps in zip(token_ids, entries):
        chosen = lps.get(tid) if lps else None
        tok = text_of(tid, chosen)
        tokens.append(tok)
        text_offset.append(offset)
        offset += len(tok)
        if chosen is None:
            token_logprobs.append(None)
            top_logprobs.append(None)
            continue
        token_logprobs.append(_lp(chosen.logprob))
        top = {text_of(t, lp): _lp(lp.logprob) for t, lp in _top(lps, k)}
        top.setdefault(tok, _lp(chosen.logprob))
        top_logprobs.append(top)
    return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": top_logprobs,
            "text_offset": text_offset}


def merge_completion_logprobs(a: dict | None, b: dict) -> dict:
    if a is None:
        return b
    return {key: a[key] + b[key] for key in ("tokens", "token_logprobs", "top_logprobs", "text_offset")}


def chat_logprobs(token_ids: list[int], entries: list, k: int, text_of: TokenText) -> dict:
    content = []
    for tid, lps in zip(token_ids, entries):
        chosen = (lps or {}).get(tid)
        tok = text_of(tid, chosen)
        top = [{"token": text_of(t, lp), "logprob": _lp(lp.logprob),
                "bytes": list(text_of(t, lp).encode("utf-8"))} for t, lp in _top(lps or {}, k)]
        content.append({"token": tok, "logprob": _lp(chosen.logprob) if chosen else _MIN_LOGPROB,
                        "bytes": list(tok.encode("utf-8")), "top_logprobs": top})
    return {"content": content}


def prompt_logprobs(entries: list | None, prompt_ids: list[int], num: int, text_of: TokenText) -> list | None:
    """vLLM's prompt_logprobs: None for the first token, then {token id: {logprob, rank, decoded_token}} with
    the prompt token and the top `num` (-1: all) by rank."""
    if entries is None:
        return None
    out: list = []
    for pos, tid in enumerate(prompt_ids):
        lps = entries[pos] if pos < len(entries) else None
        if not lps:
            out.append(None)
            continue
        keep = {t: lp for t, lp in _top(lps, num)} if num != 0 else {}
        if tid in lps:
            keep.setdefault(tid, lps[tid])
        out.append({str(t): {"logprob": _lp(lp.logprob), "rank": lp.rank, "decoded_token": text_of(t, lp)}
                    for t, lp in keep.items()})
    return out


def usage(outputs: list[RequestOutput], prompt_details: bool = False) -> dict:
    """Usage of finished cumulative outputs (prompt_details: --enable-prompt-tokens-details)."""
    prompt = sum(len(o.prompt_token_ids) for o in outputs)
    completion = sum(len(c.token_ids) for o in outputs for c in o.outputs)
    return usage_counts(prompt, completion, cached_tokens(outputs) if prompt_details else None)


def cached_tokens(outputs: list[RequestOutput]) -> int:
    """Prompt tokens the prefix cache held when the requests were admitted (their KV was not computed again)."""
    return sum(int(o.metrics.get("num_cached_tokens", 0)) for o in outputs)


def usage_counts(prompt_tokens: int, completion_tokens: int, cached: int | None = None) -> dict:
    """OpenAI's usage; with cached (vLLM's --enable-prompt-tokens-details) prompt_tokens_details.cached_tokens."""
    out = {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
           "total_tokens": prompt_tokens + completion_tokens}
    if cached is not None:
        out["prompt_tokens_details"] = {"cached_tokens": cached}
    return out


def chat_delta(reasoning: str, content: str, calls: list[dict], include_reasoning: bool) -> dict:
    """A streamed chat choice's delta (vLLM's shape): tool-call deltas, reasoning (as reasoning_content and vLLM
    0.32's reasoning) unless dropped, content; empty parts left out."""
    out: dict = {}
    if calls:
        out["tool_calls"] = calls
    if reasoning and include_reasoning:
        out["reasoning_content"] = out["reasoning"] = reasoning
    if content:
        out["content"] = content
    return out
