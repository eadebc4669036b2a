"""POST /v1/responses: OpenAI's Responses API over the chat pipeline, as vLLM serves it for any model.

The request becomes a chat request (instructions as the system message; input messages, earlier function calls,
their outputs and reasoning items as chat turns; function tools, tool_choice, reasoning.effort, text.format), runs
through prepare_chat (template, sampling, the model's reasoning / tool-call / harmony parsers), and the parsed
choice becomes output items: a reasoning item, a message with output_text, function_call items. Streams send
OpenAI's events (response.created, output_item.added, content_part.added, output_text.delta, ...,
response.completed), each with a sequence number. Stateless: previous_response_id and stored conversations are
refused with a 400 (send the whole conversation as input), as vLLM does without its response store.
"""

from __future__ import annotations

import json
import time
import uuid

from fastapi import Request
from fastapi.responses import Response, StreamingResponse
from pydantic import ValidationError

from atom_server.protocol import ChatCompletionRequest, ResponsesRequest
from atom_server.serving.chat import prepare_chat
from atom_server.serving.completions import CLIENT_GONE
from atom_server.serving.context import ServingContext
from atom_server.serving.errors import bad_request
from atom_server.serving.openai_format import cached_tokens
from atom_server.serving.streams import chain

_ROLES = ("user", "system", "developer", "assistant")
_TEXT_PARTS = ("input_text", "output_text", "text")
# chat request fields that keep their name and meaning
_PASSED = ("model", "temperature", "top_p", "top_k", "min_p", "seed", "stop", "stop_token_ids", "ignore_eos",
           "presence_penalty", "frequency_penalty", "repetition_penalty", "logit_bias", "structured_outputs",
           "include_reasoning", "chat_template_kwargs", "priority", "request_id", "skip_special_tokens", "user")


_CHAT_TO_RESPONSES = {"messages": "input", "max_tokens": "max_output_tokens", "response_format": "text.format",
                      "reasoning_effort": "reasoning.effort"}


def _text_of(content, param: str) -> str:
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise bad_request("content must be a string or a list of text parts", param=param)
    texts = []
    for j, part in enumerate(content):
        if not isinstance(part, dict) or part.get("type") not in _TEXT_PARTS or not isinstance(part.get("text"), str):
            kind = part.get("type") if isinstance(part, dict) else type(part).__name__
            raise bad_request(f"content part type {kind!r} is not supported (text only)", param=f"{param}.{j}")
        texts.append(part["text"])
    return "".join(texts)


def chat_messages(req: ResponsesRequest) -> list[dict]:
    """instructions and input as chat turns: a function_call joins the assistant turn before it (or opens one), a
    reasoning item goes to the next assistant turn as its reasoning_content, a function_call_output is a tool turn."""
    messages: list[dict] = [{"role": "system", "content": req.instructions}] if req.instructions else []
    items = [{"type": "message", "role": "user", "content": req.input}] if isinstance(req.input, str) else req.input
    reasoning: str | None = None
    open_turn: dict | None = None  # the assistant turn function calls join
    for i, item in enumerate(items):
        param = f"input.{i}"
        kind = item.get("type", "message")
        if kind == "message":
            role = item.get("role")
            if role not in _ROLES:
                raise bad_request(f"input message role must be one of {', '.join(_ROLES)}, got {role!r}",
                                  param=f"{param}.role")
            turn = {"role": role, "content": _text_of(item.get("content"), f"{param}.content")}
            open_turn = None
            if role == "assistant":
                if reasoning is not None:
                    turn["reasoning_content"], reasoning = reasoning, None
                open_turn = turn
            messages.append(turn)
        elif kind == "reasoning":
            parts = item.get("content") or item.get("summary") or []
            if not isinstance(parts, list):
                raise bad_request("a reasoning item's content is a list of reasoning_text parts",
                                  param=f"{param}.content")
            reasoning = "".join(p["text"] for p in parts if isinstance(p, dict) and isinstance(p.get("text"), str))
        elif kind == "function_call":
            name, call_id = item.get("name"), item.get("call_id")
            if not isinstance(name, str) or not name or not isinstance(call_id, str) or not call_id:
                raise bad_request("a function_call input item needs its name and call_id", param=param)
            arguments = item.get("arguments", "")
            if not isinstance(arguments, str):
                raise bad_request("a function_call's arguments are a JSON string", param=f"{param}.arguments")
            call = {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}
            if open_turn is None:
                open_turn = {"role": "assistant", "content": None}
                if reasoning is not None:
                    open_turn["reasoning_content"], reasoning = reasoning, None
                messages.append(open_turn)
            open_turn.setdefault("tool_calls", []).append(call)
        elif kind == "function_call_output":
            call_id, output = item.get("call_id"), item.get("output")
            if not isinstance(call_id, str) or not call_id:
                raise bad_request("a function_call_output input item needs the call_id it answers", param=param)
            messages.append({"role": "tool", "tool_call_id": call_id,
                             "content": _text_of(output if output is not None else "", f"{param}.output")})
            open_turn = None
        else:
            raise bad_request(f"input item type {kind!r} is not supported by atom-server (message, reasoning, "
                              "function_call, function_call_output)", param=f"{param}.type")
    if not messages:
        raise bad_request("input must not be empty", param="input")
    return messages


def chat_request_of(req: ResponsesRequest) -> ChatCompletionRequest:
    body: dict = {name: getattr(req, name) for name in _PASSED if getattr(req, name) is not None}
    body["messages"] = chat_messages(req)
    body["stream"] = req.stream
    if req.max_output_tokens is not None:
        body["max_tokens"] = req.max_output_tokens
    if req.tools:
        body["tools"] = [{"type": "function", "function": t.model_dump(exclude_none=True, exclude={"type"})}
                         for t in req.tools]
    if req.tool_choice is not None:
        choice = req.tool_choice
        body["tool_choice"] = choice if isinstance(choice, str) else {"type": "function",
                                                                      "function": {"name": choice.name}}
    if req.reasoning is not None and req.reasoning.effort is not None:
        body["reasoning_effort"] = req.reasoning.effort
    fmt = req.text.format if req.text is not None else None
    if fmt is not None and fmt.type == "json_schema":
        if fmt.json_schema is None:
            raise bad_request("text.format json_schema needs its schema", param="text.format.schema")
        body["response_format"] = {"type": "json_schema", "json_schema": {
            "name": fmt.name, "schema": fmt.json_schema, "strict": fmt.strict}}
    elif fmt is not None and fmt.type == "json_object":
        body["response_format"] = {"type": "json_object"}
    try:
        return ChatCompletionRequest.model_validate(body)
    except ValidationError as e:  # named as the Responses request names it
        first = e.errors()[0]
        loc = [str(p) for p in first.get("loc", ())]
        if loc:
            loc[0] = _CHAT_TO_RESPONSES.get(loc[0], loc[0])
        raise bad_request(f"{first.get('msg', 'invalid value')}", param=".".join(loc) or None) from e


def _new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


class _Response:
    """One response's object and its output items, built whole or event by event."""

    def __init__(self, ctx: ServingContext, req: ResponsesRequest, rid: str):
        self.ctx, self.req, self.rid = ctx, req, rid
        self.created = int(time.time())
        self.items: list[dict] = []
        self.seq = 0

    def body(self, status: str, usage: dict | None, incomplete: bool = False) -> dict:
        req = self.req
        fmt = req.text.format.model_dump(by_alias=True, exclude_none=True) if req.text and req.text.format \
            else {"type": "text"}
        choice = req.tool_choice
        return {
            "id": self.rid, "object": "response", "created_at": self.created, "status": status,
            "background": False, "error": None,
            "incomplete_details": {"reason": "max_output_tokens"} if incomplete else None,
            "instructions": req.instructions, "max_output_tokens": req.max_output_tokens,
            "max_tool_calls": req.max_tool_calls, "metadata": req.metadata or {}, "model": self.ctx.model_name,
            "output": list(self.items), "parallel_tool_calls": bool(req.parallel_tool_calls),
            "previous_response_id": None,
            "reasoning": {"effort": req.reasoning.effort if req.reasoning else None, "summary": None},
            "service_tier": "auto", "store": False, "temperature": req.temperature, "text": {"format": fmt},
            "tool_choice": (choice if isinstance(choice, str) else choice.model_dump()) if choice is not None
            else ("auto" if req.tools else "none"),
            "tools": [t.model_dump(exclude_none=True) for t in req.tools or []],
            "top_p": req.top_p, "truncation": "disabled", "usage": usage, "user": req.user,
        }

    def event(self, kind: str, **fields) -> str:
        self.seq += 1
        data = {"type": kind, "sequence_number": self.seq - 1, **fields}
        return f"event: {kind}\ndata: {json.dumps(data, ensure_ascii=False)}\n\n"


async def _usage(ctx: ServingContext, run, prompt_tokens: int, output_tokens: int, cached: int, text: str,
                 token_ids: list[int]) -> dict:
    """The Responses API's usage: reasoning tokens of (text, token_ids) counted as chat completions count them (0
    without a reasoning parser; text and ids are read only with one), and the prompt tokens the prefix cache held
    (always, as vLLM)."""
    reasoning = await run.reasoning_tokens(ctx, [(text, token_ids)]) if run.reasoning else 0
    return {"input_tokens": prompt_tokens, "input_tokens_details": {"cached_tokens": cached},
            "output_tokens": output_tokens, "output_tokens_details": {"reasoning_tokens": reasoning},
            "total_tokens": prompt_tokens + output_tokens}


def _reasoning_item(text: str, done: bool) -> dict:
    return {"id": _new_id("rs"), "type": "reasoning", "summary": [],
            "content": [{"type": "reasoning_text", "text": text}] if done else [], "encrypted_content": None,
            "status": "completed" if done else "in_progress"}


def _message_item(text: str, done: bool) -> dict:
    return {"id": _new_id("msg"), "type": "message", "role": "assistant",
            "status": "completed" if done else "in_progress",
            "content": [{"type": "output_text", "text": text, "annotations": [], "logprobs": []}] if done else []}


def _call_item(call_id: str, name: str, arguments: str, done: bool) -> dict:
    return {"id": _new_id("fc"), "type": "function_call", "call_id": call_id, "name": name,
            "arguments": arguments, "status": "completed" if done else "in_progress"}


def output_items(message: dict) -> list[dict]:
    """A parsed chat message (reasoning_content, content, tool_calls) as Responses output items."""
    items = []
    if message.get("reasoning_content"):
        items.append(_reasoning_item(message["reasoning_content"], True))
    calls = message.get("tool_calls") or []
    if message.get("content") or not (items or calls):
        items.append(_message_item(message.get("content") or "", True))
    for call in calls:
        items.append(_call_item(call["id"], call["function"]["name"], call["function"]["arguments"], True))
    return items


class _ItemStream:
    """Chat deltas in, Responses events out: an item opens when its kind of output starts and closes when another
    starts or the response ends."""

    def __init__(self, resp: _Response):
        self.resp = resp
        self.kind: str | None = None  # reasoning | message | call
        self.item: dict | None = None
        self.text = ""

    def _open(self, kind: str, item: dict) -> list[str]:
        out = self.close()
        self.kind, self.item, self.text = kind, item, ""
        index = len(self.resp.items)
        out.append(self.resp.event("response.output_item.added", output_index=index, item=item))
        part = {"reasoning": {"type": "reasoning_text", "text": ""},
                "message": {"type": "output_text", "text": "", "annotations": [], "logprobs": []}}.get(kind)
        if part is not None:
            out.append(self.resp.event("response.content_part.added", item_id=item["id"], output_index=index,
                                       content_index=0, part=part))
        return out

    def close(self) -> list[str]:
        if self.item is None:
            return []
        r, item, index, text = self.resp, self.item, len(self.resp.items), self.text
        ids = dict(item_id=item["id"], output_index=index)
        out = []
        if self.kind == "reasoning":
            part = {"type": "reasoning_text", "text": text}
            out += [r.event("response.reasoning_text.done", **ids, content_index=0, text=text),
                    r.event("response.content_part.done", **ids, content_index=0, part=part)]
            item = {**item, "content": [part], "status": "completed"}
        elif self.kind == "message":
            part = {"type": "output_text", "text": text, "annotations": [], "logprobs": []}
            out += [r.event("response.output_text.done", **ids, content_index=0, text=text, logprobs=[]),
                    r.event("response.content_part.done", **ids, content_index=0, part=part)]
            item = {**item, "content": [part], "status": "completed"}
        else:
            out.append(r.event("response.function_call_arguments.done", **ids, name=item["name"], arguments=text))
            item = {**item, "arguments": text, "status": "completed"}
        out.append(r.event("response.output_item.done", output_index=index, item=item))
        r.items.append(item)
        self.kind, self.item, self.text = None, None, ""
        return out

    def feed(self, delta: dict) -> list[str]:
        out: list[str] = []
        r = self.resp
        if delta.get("reasoning_content"):
            if self.kind != "reasoning":
                out += self._open("reasoning", _reasoning_item("", False))
            self.text += delta["reasoning_content"]
            out.append(r.event("response.reasoning_text.delta", item_id=self.item["id"],
                               output_index=len(r.items), content_index=0, delta=delta["reasoning_content"]))
        if delta.get("content"):
            if self.kind != "message":
                out += self._open("message", _message_item("", False))
            self.text += delta["content"]
            out.append(r.event("response.output_text.delta", item_id=self.item["id"], output_index=len(r.items),
                               content_index=0, delta=delta["content"], logprobs=[]))
        for call in delta.get("tool_calls") or []:
            if "id" in call:
                out += self._open("call", _call_item(call["id"], call["function"]["name"], "", False))
            piece = call.get("function", {}).get("arguments") or ""
            if piece and self.kind == "call":
                self.text += piece
                out.append(r.event("response.function_call_arguments.delta", item_id=self.item["id"],
                                   output_index=len(r.items), delta=piece))
        return out


async def create_response(ctx: ServingContext, req: ResponsesRequest, raw: Request):
    chat_req = chat_request_of(req)
    run = await prepare_chat(ctx, chat_req)
    ctx.check_engine()
    rid, engine_rid = ctx.response_id(chat_req, "resp")
    rid = rid.replace("resp-", "resp_", 1)
    gen = ctx.client.generate(engine_rid, run.ids, run.params, run.text, stream=req.stream,
                              priority=chat_req.priority)
    first, source = await ctx.start(raw, [gen])
    if first is None:
        return Response(status_code=CLIENT_GONE)
    resp = _Response(ctx, req, rid)

    if req.stream:
        async def body():
            output = run.output()
            items = _ItemStream(resp)
            tokens, pieces, token_ids, finish, cached = 0, [], [], None, 0
            yield resp.event("response.created", response=resp.body("in_progress", None))
            yield resp.event("response.in_progress", response=resp.body("in_progress", None))
            try:
                async for _, ro in chain(first, source):
                    for co in ro.outputs:
                        tokens += len(co.token_ids)
                        if run.reasoning:  # the usage counts reasoning tokens: keep text and ids
                            pieces.append(co.text)
                            token_ids.extend(co.token_ids)
                        done = co.finish_reason is not None
                        for event in items.feed(output.delta(co.text, done)):
                            yield event
                        if done:
                            finish, cached = co.finish_reason, cached_tokens([ro])
                for event in items.close():
                    yield event
                incomplete = finish == "length"
                usage = await _usage(ctx, run, len(run.ids), tokens, cached, "".join(pieces), token_ids)
                final = resp.body("incomplete" if incomplete else "completed", usage, incomplete)
                yield resp.event("response.incomplete" if incomplete else "response.completed", response=final)
            except Exception as e:
                err = ctx.stream_failure(e)
                yield resp.event("error", code=err.code, message=err.message, param=err.param)

        return StreamingResponse(body(), media_type="text/event-stream")

    final = await ctx.last_output(first, source)
    if final is None:
        return Response(status_code=CLIENT_GONE)
    co = final.outputs[0]
    message, _ = run.output().message(co.text)
    resp.items = output_items(message)
    incomplete = co.finish_reason == "length"
    usage = await _usage(ctx, run, len(run.ids), len(co.token_ids), cached_tokens([final]), co.text,
                         list(co.token_ids))
    return resp.body("incomplete" if incomplete else "completed", usage, incomplete)
