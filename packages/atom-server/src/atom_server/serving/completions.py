"""POST /v1/completions: text, token-id and batched prompts; echo, logprobs, n, streaming."""

from __future__ import annotations

import time

from fastapi import Request
from fastapi.responses import Response, StreamingResponse

from atom_server.outputs import RequestOutput
from atom_server.protocol import CompletionRequest
from atom_server.serving import openai_format as fmt
from atom_server.serving.context import ServingContext, engine_error
from atom_server.serving.errors import bad_request
from atom_server.serving.streams import SSE_DONE, chain, sse
from atom_server.serving.structured import structured_outputs_of

CLIENT_GONE = 499


def _prompt_items(req: CompletionRequest) -> list:
    p = req.prompt
    items = [p] if isinstance(p, str) or (p and all(isinstance(x, int) for x in p)) else list(p)
    if not items:
        raise bad_request("the prompt is empty", param="prompt")
    return items


async def _prompts(ctx: ServingContext, items: list, req: CompletionRequest) -> list[tuple[str | None, list[int]]]:
    """(text or None, token ids) per prompt: a string, a list of ids, or a list of either (truncated as
    truncate_prompt_tokens says; the text of a truncated prompt is its ids' text)."""
    prompts = []
    for item in items:
        if isinstance(item, str):
            ids = await ctx.encode(item, req.add_special_tokens, "prompt")
        else:
            ids = list(item)
        cut = ctx.truncate(ids, req)
        text = item if isinstance(item, str) and len(cut) == len(ids) else None
        ctx.check_ids(cut, "prompt")
        prompts.append((text, cut))
    return prompts


async def create_completion(ctx: ServingContext, req: CompletionRequest, raw: Request):
    ctx.check_model(req.model)
    ctx.check_engine()
    ctx.check_logprobs(req.logprobs, "logprobs")
    ctx.check_prompt_logprobs(req)
    items = _prompt_items(req)
    ctx.check_work(len(items), req.n, "prompt")
    structured = await structured_outputs_of(ctx, req)
    prompts = await _prompts(ctx, items, req)
    max_tokens = [ctx.fit_max_tokens(len(ids), ctx.default_max_tokens(len(ids), req.max_tokens), "max_tokens")
                  for _, ids in prompts]
    k = req.logprobs
    echo_k = k if (req.echo and k is not None) else None
    wanted = [v for v in (echo_k, req.prompt_logprobs) if v is not None]
    prompt_k = (-1 if -1 in wanted else max(wanted)) if wanted else None
    params = [ctx.sampling_params(req, max_tokens[i], k, prompt_k, structured) for i in range(len(prompts))]
    echo_texts = [None] * len(prompts)
    if req.echo:
        echo_texts = [text if text is not None else await ctx.decode(ids) for text, ids in prompts]
    ctx.check_engine()
    rid, engine_rid = ctx.response_id(req, "cmpl")
    gens = [ctx.client.generate(f"{engine_rid}-{i}", ids, params[i], text, stream=req.stream, priority=req.priority)
            for i, (text, ids) in enumerate(prompts)]
    first, source = await ctx.start(raw, gens)
    if first is None:
        return Response(status_code=CLIENT_GONE)
    created = int(time.time())
    head = {"id": rid, "object": "text_completion", "created": created, "model": ctx.model_name}

    def echo_text(pi: int) -> str:
        return echo_texts[pi]

    prompt_lps: dict[int, list] = {}  # deltas carry a request's prompt logprobs once: keep them

    def echo_logprobs(pi: int, ro: RequestOutput) -> dict:
        if ro.prompt_logprobs is not None:
            prompt_lps[pi] = ro.prompt_logprobs
        entries = prompt_lps.get(pi) or [None] * len(ro.prompt_token_ids)
        return fmt.completion_logprobs(ro.prompt_token_ids, entries, k, ctx.text_of, 0)

    def index(pi: int, ci: int) -> int:
        return pi * req.n + ci

    if req.stream:
        include_usage = bool(req.stream_options and req.stream_options.include_usage)

        async def body():
            started: set[tuple[int, int]] = set()
            ids_started: set[tuple[int, int]] = set()
            offsets: dict[tuple[int, int], int] = {}
            finished: set[int] = set()
            details = ctx.limits.enable_prompt_tokens_details
            cached: dict[int, int] = {}  # prompt -> tokens the prefix cache held (with details)
            completion_tokens = 0
            try:
                async for pi, ro in chain(first, source):  # delta outputs: only what is new
                    if ro.finished:
                        finished.add(pi)
                    if details:
                        cached[pi] = fmt.cached_tokens([ro])
                    if ro.prompt_logprobs is not None:
                        prompt_lps[pi] = ro.prompt_logprobs
                    for co in ro.outputs:
                        completion_tokens += len(co.token_ids)
                        key = (pi, co.index)
                        done = co.finish_reason is not None
                        prefix, lp_obj = "", None
                        if key not in started and req.echo:
                            prefix = echo_text(pi)
                            lp_obj = echo_logprobs(pi, ro) if k is not None else None
                        if not co.text and not done and not prefix:
                            continue
                        started.add(key)
                        if k is not None:
                            off = offsets.get(key, len(prefix))
                            lp_obj = fmt.merge_completion_logprobs(lp_obj, fmt.completion_logprobs(
                                co.token_ids, co.logprobs or [None] * len(co.token_ids), k, ctx.text_of, off))
                            offsets[key] = off + len(co.text)
                        choice = {"index": index(pi, co.index), "text": prefix + co.text, "logprobs": lp_obj,
                                  "finish_reason": co.finish_reason if done else None,
                                  "stop_reason": co.stop_reason if done else None}
                        if req.return_token_ids:
                            if key not in ids_started:
                                choice["prompt_token_ids"] = prompts[pi][1]
                                ids_started.add(key)
                            choice["token_ids"] = list(co.token_ids)
                        yield sse({**head, "choices": [choice]})
                if include_usage and len(finished) == len(prompts):
                    num_prompt = sum(len(ids) for _, ids in prompts)
                    yield sse({**head, "choices": [], "usage": fmt.usage_counts(
                        num_prompt, completion_tokens, sum(cached.values()) if details else None)})
            except Exception as e:
                yield ctx.stream_error(e)
            yield SSE_DONE

        return StreamingResponse(body(), media_type="text/event-stream")

    finals: dict[int, RequestOutput] = {}
    try:
        async for pi, ro in chain(first, source):
            finals[pi] = ro
    except Exception as e:
        raise engine_error(e) from e
    if len(finals) < len(prompts) or not all(ro.finished for ro in finals.values()):
        return Response(status_code=CLIENT_GONE)
    choices = []
    for pi in range(len(prompts)):
        ro = finals[pi]
        for co in sorted(ro.outputs, key=lambda c: c.index):
            prefix = echo_text(pi) if req.echo else ""
            lp_obj = None
            if k is not None:
                lp_obj = fmt.merge_completion_logprobs(echo_logprobs(pi, ro) if req.echo else None, fmt.completion_logprobs(
                    co.token_ids, co.logprobs or [None] * len(co.token_ids), k, ctx.text_of, len(prefix)))
            choice = {"index": index(pi, co.index), "text": prefix + co.text, "logprobs": lp_obj,
                      "finish_reason": co.finish_reason, "stop_reason": co.stop_reason}
            if req.prompt_logprobs is not None:
                choice["prompt_logprobs"] = fmt.prompt_logprobs(
                    ro.prompt_logprobs, ro.prompt_token_ids, req.prompt_logprobs, ctx.text_of)
            if req.return_token_ids:
                choice["prompt_token_ids"] = ro.prompt_token_ids
                choice["token_ids"] = list(co.token_ids)
            choices.append(choice)
    return {**head, "choices": choices, "usage": fmt.usage([finals[i] for i in range(len(prompts))],
                                                           ctx.limits.enable_prompt_tokens_details)}
