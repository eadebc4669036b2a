"""POST /v1/chat/completions: the tokenizer's chat template (with the request's tools), n, logprobs, structured
outputs, tool calls and reasoning (vLLM's shapes), streaming role then deltas."""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import Callable

from fastapi import Request
from fastapi.responses import Response, StreamingResponse

from atom_server.protocol import ChatCompletionRequest
from atom_server.serving import openai_format as fmt
from atom_server.serving.completions import CLIENT_GONE
from atom_server.serving.context import ServingContext
from atom_server.serving.errors import bad_request
from atom_server.serving.harmony import REASONING_EFFORTS, HarmonyOutput, spells_harmony
from atom_server.serving.reasoning import REASONING_PARSERS, ReasoningStreamer, tokens_in_spans
from atom_server.serving.streams import SSE_DONE, chain, sse
from atom_server.serving.structured import (
    harmony_tool_constraint,
    structured_outputs_of,
    tool_choice_constraint,
)
from atom_server.serving.tool_parsers import (
    TOOL_PARSERS,
    NamedToolParser,
    RequiredToolParser,
    ToolCallStreamer,
    extract_tool_calls,
)


def _tool_setup(ctx: ServingContext, req: ChatCompletionRequest):
    """(a factory of the tool parser that reads the output, or None; the constraint the tool_choice forces, or
    None; the auto parser is on). vLLM's rules: tool_choice defaults to "auto" when tools are given, "auto"
    needs --enable-auto-tool-choice with --tool-call-parser, a named function must be one of the tools."""
    tools, choice = req.tools, req.tool_choice
    if not tools:
        if choice not in (None, "none"):
            raise bad_request("tool_choice needs tools", param="tool_choice")
        return None, None, False
    choice = "auto" if choice is None else choice
    if choice == "none":
        return None, None, False
    if choice == "auto":
        lim = ctx.limits
        if not (lim.enable_auto_tool_choice and lim.tool_call_parser):
            raise bad_request('"auto" tool choice needs the server started with --enable-auto-tool-choice and '
                              "--tool-call-parser", param="tool_choice")
        return TOOL_PARSERS.get(lim.tool_call_parser), None, True  # harmony's "openai" has no class here
    if choice == "required":
        return RequiredToolParser, ("tool_choice", tool_choice_constraint(tools, choice)), False
    name = choice.function.name
    if all(t.function.name != name for t in tools):
        raise bad_request(f"tool_choice names the function {name!r}, which is not among the tools",
                          param="tool_choice")
    return (lambda: NamedToolParser(name)), ("tool_choice", tool_choice_constraint(tools, choice)), False


class _ChoiceOutput:
    """One choice's text -> reasoning, content and tool calls (whole, or delta by delta while streaming)."""

    def __init__(self, reasoning_parser, tool_parser, include_reasoning: bool):
        self.reasoning = ReasoningStreamer(reasoning_parser) if reasoning_parser is not None else None
        self.tools = ToolCallStreamer(tool_parser) if tool_parser is not None else None
        self.reasoning_parser = reasoning_parser
        self.tool_parser = tool_parser
        self.include_reasoning = include_reasoning

    def delta(self, text: str, final: bool) -> dict:
        reasoning, content = self.reasoning.feed(text, final) if self.reasoning is not None else ("", text)
        calls: list[dict] = []
        if self.tools is not None:
            content, calls = self.tools.feed(content, final)
        return fmt.chat_delta(reasoning, content, calls, self.include_reasoning)

    @property
    def tools_called(self) -> bool:
        return self.tools is not None and self.tools.called

    def reasoning_spans(self, text: str) -> list[tuple[int, int]]:
        return self.reasoning_parser.spans(text) if self.reasoning_parser is not None else []

    def message(self, text: str) -> tuple[dict, bool]:
        """The whole message and whether it called tools."""
        message: dict = {"role": "assistant"}
        content: str | None = text
        if self.reasoning_parser is not None:
            split = self.reasoning_parser.extract(text)
            content = split.content
            if self.include_reasoning:
                message["reasoning_content"] = message["reasoning"] = split.reasoning
        called = False
        if self.tool_parser is not None:
            extracted = extract_tool_calls(self.tool_parser, content or "")
            content = extracted.content if extracted.called or content is not None else None
            if extracted.called:
                message["tool_calls"] = extracted.tool_calls
                called = True
        message["content"] = content
        if "tool_calls" not in message:
            message["tool_calls"] = []
        return message, called


def _template_kwargs(ctx: ServingContext, req: ChatCompletionRequest) -> dict | None:
    """chat_template_kwargs plus reasoning_effort, as vLLM merges them (the request field wins; enable_thinking
    follows it unless the kwargs set it). gpt-oss's system message takes low / medium / high."""
    effort = req.reasoning_effort
    if effort is None:
        return req.chat_template_kwargs
    if ctx.state.harmony and effort not in REASONING_EFFORTS:
        raise bad_request(f"reasoning_effort {effort!r} is not one gpt-oss takes ({', '.join(REASONING_EFFORTS)})",
                          param="reasoning_effort")
    kwargs = dict(req.chat_template_kwargs or {})
    kwargs.setdefault("enable_thinking", effort != "none")
    kwargs["reasoning_effort"] = effort
    return kwargs


def _finish_reason(reason: str | None, called: bool, named: bool) -> str | None:
    """OpenAI's: "tool_calls" when auto / required tool calls ended the answer, "stop" for a named function."""
    if reason == "stop" and called and not named:
        return "tool_calls"
    return reason


@dataclasses.dataclass
class ChatRun:
    """A chat request made ready to generate: its prompt ids and sampling parameters, and how each choice's text
    is read (reasoning, content, tool calls). /v1/responses runs the same."""
    ids: list[int]
    text: str
    params: object  # SamplingParams
    k: int | None  # top logprobs (None: no logprobs)
    output: Callable[[], _ChoiceOutput | HarmonyOutput]
    named: bool  # a named tool_choice (finish_reason stays "stop")
    reasoning: bool = False  # a reasoning parser reads the answers: the usage counts reasoning tokens (as vLLM)

    async def reasoning_tokens(self, ctx: ServingContext, choices: list[tuple[str, list[int]]]) -> int:
        """The reasoning tokens of the choices' (text, token ids): those inside the spans their parser reads as
        reasoning (decoded as the engine detokenized them; in a worker thread: O(log n) decodes a choice)."""
        skip = getattr(self.params, "skip_special_tokens", True)

        def count() -> int:
            def decode(ids: list[int]) -> str:
                return ctx.tokenizer.decode(ids, skip_special_tokens=skip)
            return sum(tokens_in_spans(self.output().reasoning_spans(text), list(ids), decode)
                       for text, ids in choices)

        return await asyncio.to_thread(count)

    async def usage(self, ctx: ServingContext, prompt_tokens: int, completion_tokens: int, cached: int,
                    choices: list[tuple[str, list[int]]]) -> dict:
        """OpenAI's usage; with a reasoning parser, completion_tokens_details.reasoning_tokens of the choices' (text,
        token ids) as vLLM reports it (choices are read only then); with --enable-prompt-tokens-details,
        prompt_tokens_details.cached_tokens."""
        usage = fmt.usage_counts(prompt_tokens, completion_tokens,
                                 cached if ctx.limits.enable_prompt_tokens_details else None)
        if self.reasoning:
            usage["completion_tokens_details"] = {"reasoning_tokens": await self.reasoning_tokens(ctx, choices)}
        return usage


async def prepare_chat(ctx: ServingContext, req: ChatCompletionRequest) -> ChatRun:
    ctx.check_model(req.model)
    ctx.check_engine()
    if req.top_logprobs and not req.logprobs:
        raise bad_request("top_logprobs needs logprobs=true", param="top_logprobs")
    ctx.check_logprobs(req.top_logprobs, "top_logprobs")
    ctx.check_prompt_logprobs(req)
    ctx.check_work(1, req.n, "messages")
    tool_parser_cls, forced, auto_tools = _tool_setup(ctx, req)
    # gpt-oss: its harmony messages are read here; a forced call is written in harmony too (the grammar allows an
    # analysis message, then the call's commentary message), and the harmony parser surfaces it.
    harmony = ctx.state.harmony
    if harmony and forced is not None:
        forced = ("tool_choice", harmony_tool_constraint(req.tools, req.tool_choice))
        auto_tools = True
    structured = await structured_outputs_of(ctx, req, forced)
    if harmony and structured is not None and structured.harmony_calls is None and not spells_harmony(structured):
        # the final message is constrained and the analysis may come first; a constraint that writes harmony's
        # markers itself constrains the whole turn
        structured = dataclasses.replace(structured, harmony=True)
    tools = [t.model_dump(exclude_none=True) for t in req.tools] if req.tools else None
    template_kwargs = _template_kwargs(ctx, req)
    text = await ctx.chat_prompt(req.messages, req.add_generation_prompt, req.continue_final_message,
                                 req.chat_template, template_kwargs, tools=tools,
                                 reasoning_as_thinking=harmony)
    ids = ctx.truncate(await ctx.encode(text, req.add_special_tokens, "messages"), req)
    ctx.check_ids(ids, "messages")
    wanted, param = req.max_tokens, "max_tokens"
    if req.max_completion_tokens is not None:
        wanted, param = req.max_completion_tokens, "max_completion_tokens"
    wanted = ctx.default_max_tokens(len(ids), wanted)
    max_tokens = ctx.fit_max_tokens(len(ids), wanted, param if wanted is not None else "messages")
    k = (req.top_logprobs or 0) if req.logprobs else None
    # A tool parser reads markers that tokenizers often keep as special tokens ([TOOL_CALLS], <|python_tag|>).
    # Harmony's markers are special tokens, which its parser reads.
    params = ctx.sampling_params(req, max_tokens, k, req.prompt_logprobs, structured,
                                 skip_special_tokens=False if auto_tools or harmony else None,
                                 extra_stop_token_ids=() if req.ignore_eos else ctx.state.harmony_stop_ids)
    reasoning_cls = REASONING_PARSERS.get(ctx.limits.reasoning_parser) if ctx.limits.reasoning_parser else None

    def choice_output() -> _ChoiceOutput | HarmonyOutput:
        if harmony:
            return HarmonyOutput(auto_tools, req.include_reasoning)
        return _ChoiceOutput(reasoning_cls(template_kwargs) if reasoning_cls is not None else None,
                             tool_parser_cls() if tool_parser_cls is not None else None, req.include_reasoning)

    return ChatRun(ids, text, params, k, choice_output, forced is not None and req.tool_choice != "required",
                   reasoning=harmony or reasoning_cls is not None)


async def create_chat_completion(ctx: ServingContext, req: ChatCompletionRequest, raw: Request):
    run = await prepare_chat(ctx, req)
    ids, text, params, k, choice_output, named = run.ids, run.text, run.params, run.k, run.output, run.named
    ctx.check_engine()
    rid, engine_rid = ctx.response_id(req, "chatcmpl")
    gen = ctx.client.generate(engine_rid, ids, params, text, stream=req.stream, priority=req.priority)
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
        outputs = [choice_output() for _ in range(req.n)]

        async def body():
            completion_tokens = 0
            finished = False
            keep = include_usage and run.reasoning  # the usage chunk counts reasoning tokens: keep text and ids
            pieces: list[list[str]] = [[] for _ in range(req.n)]
            got_ids: list[list[int]] = [[] for _ in range(req.n)]
            try:
                for i in range(req.n):
                    chunk = {**head, "choices": [{"index": i, "delta": {"role": "assistant", "content": ""},
                                                  "logprobs": None, "finish_reason": None}]}
                    if req.return_token_ids and i == 0:
                        chunk["prompt_token_ids"] = ids
                    yield sse(chunk)
                async for _, ro in chain(first, source):  # delta outputs: only what is new
                    finished = ro.finished
                    for co in ro.outputs:
                        completion_tokens += len(co.token_ids)
                        if keep:
                            pieces[co.index].append(co.text)
                            got_ids[co.index].extend(co.token_ids)
                        done = co.finish_reason is not None
                        out = outputs[co.index]
                        delta = out.delta(co.text, done)
                        if not delta and not done and not (req.return_token_ids and co.token_ids):
                            continue
                        choice = {"index": co.index, "delta": delta,
                                  "logprobs": logprobs_of(co.token_ids, co.logprobs),
                                  "finish_reason": _finish_reason(co.finish_reason, out.tools_called, named)
                                  if done else None,
                                  "stop_reason": co.stop_reason if done else None}
                        if req.return_token_ids:
                            choice["token_ids"] = list(co.token_ids)
                        yield sse({**head, "choices": [choice]})
                if include_usage and finished:  # ro: the last output, whose metrics hold the cached tokens
                    usage = await run.usage(ctx, len(ids), completion_tokens, fmt.cached_tokens([ro]),
                                            [("".join(p), i) for p, i in zip(pieces, got_ids)])
                    yield sse({**head, "choices": [], "usage": usage})
            except Exception as e:
                yield ctx.stream_error(e)
            yield SSE_DONE

        return StreamingResponse(body(), media_type="text/event-stream")

    final = await ctx.last_output(first, source)
    if final is None:
        return Response(status_code=CLIENT_GONE)
    choices = []
    for co in sorted(final.outputs, key=lambda c: c.index):
        message, called = choice_output().message(co.text)
        choice = {"index": co.index, "message": message, "logprobs": logprobs_of(co.token_ids, co.logprobs),
                  "finish_reason": _finish_reason(co.finish_reason, called, named), "stop_reason": co.stop_reason}
        if req.return_token_ids:
            choice["token_ids"] = list(co.token_ids)
        choices.append(choice)
    usage = await run.usage(ctx, len(final.prompt_token_ids), sum(len(co.token_ids) for co in final.outputs),
                            fmt.cached_tokens([final]), [(co.text, list(co.token_ids)) for co in final.outputs])
    response = {"id": rid, "object": "chat.completion", "created": created, "model": ctx.model_name,
                "choices": choices, "usage": usage}
    if req.prompt_logprobs is not None:
        response["prompt_logprobs"] = fmt.prompt_logprobs(final.prompt_logprobs, final.prompt_token_ids,
                                                          req.prompt_logprobs, ctx.text_of)
    if req.return_token_ids:
        response["prompt_token_ids"] = final.prompt_token_ids
    return response
