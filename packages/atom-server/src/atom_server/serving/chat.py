"""POST /v1/chat/completions: the tokenizer's chat template, n, logprobs, streaming role then content."""

from __future__ import annotations

import time
import uuid

from fastapi import Request
from fastapi.responses import Response, StreamingResponse

from atom_server.protocol import ChatCompletionRequest
from atom_server.serving import openai_format as fmt
from atom_server.serving.completions import CLIENT_GONE
from atom_server.serving.context import ServingContext, engine_error
from atom_server.serving.errors import bad_request
from atom_server.serving.streams import SSE_DONE, chain, sse


async def create_chat_completion(ctx: ServingContext, req: ChatCompletionRequest, raw: Request):
    ctx.check_model(req.model)
    ctx.check_engine()
    if req.top_logprobs and not req.logprobs:
        raise bad_request("top_logprobs needs logprobs=true", param="top_logprobs")
    ctx.check_logprobs(req.top_logprobs, "top_logprobs")
    ctx.check_work(1, req.n, "messages")
    text = await ctx.chat_prompt(req.messages, req.add_generation_prompt, req.continue_final_message,
                                 req.chat_template, req.chat_template_kwargs)
    ids = await ctx.encode(text, req.add_special_tokens, "messages")
    ctx.check_ids(ids, "messages")
    wanted, param = req.max_tokens, "max_tokens"
    if req.max_completion_tokens is not None:
        wanted, param = req.max_completion_tokens, "max_completion_tokens"
    wanted = ctx.default_max_tokens(len(ids), wanted)
    max_tokens = ctx.fit_max_tokens(len(ids), wanted, param if wanted is not None else "messages")
    k = (req.top_logprobs or 0) if req.logprobs else None
    params = ctx.sampling_params(req, max_tokens, k, None)
    ctx.check_engine()
    rid = f"chatcmpl-{uuid.uuid4().hex}"
    gen = ctx.client.generate(rid, ids, params, text, stream=req.stream)
    first, source = await ctx.start(raw, [gen])
    if first is None:
        return Response(status_code=CLIENT_GONE)
    created = int(time.time())

    def logprobs_of(ids: list[int], entries: list | None) -> dict | None:
        if k is None or not ids:
            return None
        return fmt.chat_logprobs(ids, entries or [None] * len(ids), k, ctx.text_of)

    if req.stream:
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        head = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": ctx.model_name}

        async def body():
            completion_tokens = 0
            finished = False
            try:
                for i in range(req.n):
                    yield sse({**head, "choices": [{"index": i, "delta": {"role": "assistant", "content": ""},
                                                    "logprobs": None, "finish_reason": None}]})
                async for _, ro in chain(first, source):  # delta outputs: only what is new
                    finished = ro.finished
                    for co in ro.outputs:
                        completion_tokens += len(co.token_ids)
                        done = co.finish_reason is not None
                        if not co.text and not done:
                            continue
                        yield sse({**head, "choices": [{
                            "index": co.index, "delta": {"content": co.text} if co.text else {},
                            "logprobs": logprobs_of(co.token_ids, co.logprobs),
                            "finish_reason": co.finish_reason if done else None,
                            "stop_reason": co.stop_reason if done else None}]})
                if include_usage and finished:
                    yield sse({**head, "choices": [], "usage": fmt.usage_counts(len(ids), completion_tokens)})
            except Exception as e:
                yield ctx.stream_error(e)
            yield SSE_DONE

        return StreamingResponse(body(), media_type="text/event-stream")

    final = first[1]
    try:
        async for _, ro in source:
            final = ro
    except Exception as e:
        raise engine_error(e) from e
    if not final.finished:
        return Response(status_code=CLIENT_GONE)
    choices = [{"index": co.index, "message": {"role": "assistant", "content": co.text},
                "logprobs": logprobs_of(co.token_ids, co.logprobs),
                "finish_reason": co.finish_reason, "stop_reason": co.stop_reason}
               for co in sorted(final.outputs, key=lambda c: c.index)]
    return {"id": rid, "object": "chat.completion", "created": created, "model": ctx.model_name,
            "choices": choices, "usage": fmt.usage([final])}
