"""What every OpenAI endpoint shares: the engine client, tokenizer and preprocessing workers, and the checks
and conversions from a request body to engine inputs (prompt ids, SamplingParams)."""

from __future__ import annotations

import dataclasses
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator

from fastapi import Request

from atom_server.generation_defaults import GenerationDefaults
from atom_server.outputs import RequestOutput
from atom_server.protocol import ChatMessage
from atom_server.sampling_params import SamplingParams
from atom_server.serving import openai_format as fmt
from atom_server.serving.chat_templates import ChatTemplateRenderer, TemplateError
from atom_server.serving.engine_client import (
    EngineClient,
    EngineDeadError,
    EngineRequestError,
    EngineShutdownError,
)
from atom_server.serving.errors import APIError, bad_request, from_value_error, internal_error
from atom_server.serving.metrics import Metrics
from atom_server.serving.preprocess import Preprocessor, PromptTooLong, QueueFull
from atom_server.serving.server_args import ServerLimits
from atom_server.serving.streams import merge, until_disconnect

logger = logging.getLogger(__name__)

_PARAM_FIELDS = tuple(f.name for f in dataclasses.fields(SamplingParams))


def engine_error(e: Exception) -> APIError:
    if isinstance(e, APIError):
        return e
    if isinstance(e, EngineDeadError):
        return APIError(503, "the engine is not running", code="engine_dead", detail=str(e))
    if isinstance(e, EngineShutdownError):
        return APIError(503, "the server is shutting down", code="shutting_down", detail=str(e))
    if isinstance(e, QueueFull):
        return APIError(503, "the server is busy; retry later", code="server_busy", detail=str(e))
    if isinstance(e, EngineRequestError):
        if e.status < 500:
            return APIError(e.status, str(e), code="invalid_value")
        return APIError(e.status, "internal server error", code="internal_error", detail=str(e))
    return internal_error(e)


@dataclasses.dataclass
class ServerState:
    client: EngineClient
    tokenizer: object
    metrics: Metrics
    api_key: str | None = None
    generation_defaults: GenerationDefaults = dataclasses.field(default_factory=GenerationDefaults)
    served_model_names: list[str] = dataclasses.field(default_factory=list)  # default: the engine's name
    limits: ServerLimits = dataclasses.field(default_factory=ServerLimits)
    preprocess: Preprocessor | None = None
    templates: ChatTemplateRenderer | None = None  # the model's own chat template
    request_templates: ChatTemplateRenderer | None = None  # templates sent in requests (trusted servers only)
    harmony: bool = False  # the model answers in gpt-oss's harmony format (serving/harmony.py)
    harmony_stop_ids: list[int] = dataclasses.field(default_factory=list)  # <|return|>, <|call|> in its tokenizer
    shutting_down: bool = False
    exit_code: int = 0
    created: int = dataclasses.field(default_factory=lambda: int(time.time()))

    def __post_init__(self) -> None:
        if self.preprocess is None:
            self.preprocess = Preprocessor(self.tokenizer)
        if self.templates is None:
            self.templates = ChatTemplateRenderer(timeout_s=self.limits.chat_template_timeout)
        if self.request_templates is None and self.limits.trust_request_chat_template:
            # Their own worker, started on first use: a slow request template cannot hold up everyone else's
            # chat requests, which render the model's template in the other pool.
            self.request_templates = ChatTemplateRenderer(num_workers=1, timeout_s=self.limits.chat_template_timeout)


class ServingContext:
    def __init__(self, state: ServerState):
        self.state = state
        self.client = state.client
        self.metrics = state.metrics
        self.limits = state.limits
        self.preprocess = state.preprocess
        self.tokenizer = tok = state.tokenizer
        self.defaults = state.generation_defaults
        self.text_of = fmt.TokenText(tok)
        self.special_tokens = dict(getattr(tok, "special_tokens_map", None) or {})
        # The model's vocabulary can be larger than the tokenizer's (padded); the engine's is the limit.
        self.vocab_limit = state.client.info.vocab_size or max(len(tok), getattr(tok, "vocab_size", 0) or 0)

    @property
    def info(self):
        return self.client.info

    @property
    def served_model_names(self) -> list[str]:
        return self.state.served_model_names or [self.client.info.served_model_name]

    @property
    def model_name(self) -> str:
        """The name responses report: the first served name (vLLM)."""
        return self.served_model_names[0]

    # ---- checks ----
    def check_model(self, name: str | None) -> None:
        if name is not None and name not in self.served_model_names:
            served = ", ".join(repr(n) for n in self.served_model_names)
            raise APIError(404, f"the model {name!r} does not exist; this server serves {served}",
                           param="model", code="model_not_found")

    def check_engine(self) -> None:
        if self.state.shutting_down:
            raise engine_error(EngineShutdownError("draining"))
        if self.client.dead:
            raise engine_error(EngineDeadError(self.client.dead_reason or self.client.state.value))

    def check_ids(self, ids: list[int], param: str) -> None:
        if not ids:
            raise bad_request("the prompt is empty", param=param)
        if len(ids) >= self.info.max_model_len:
            return  # refused by fit_max_tokens with the context-length message; no need to scan it
        limit = self.vocab_limit
        for t in ids:
            if not 0 <= t < limit:
                raise bad_request(f"token id {t} is out of range [0, {limit})", param=param)

    def check_prompt_length(self, num_tokens: int, param: str, at_least: bool = False) -> None:
        limit = self.info.max_model_len
        if num_tokens >= limit:
            raise APIError(400, f"This model's maximum context length is {limit} tokens. However, your prompt "
                           f"has {'more than ' if at_least else ''}{num_tokens} tokens. Please reduce the length "
                           "of the prompt.", param=param, code="context_length_exceeded")

    def check_logprobs(self, value: int | None, param: str) -> None:
        cap = self.info_max_logprobs
        if value is not None and cap != -1 and (value == -1 or value > cap):
            raise bad_request(f"{param}={value} is more than this server allows ({cap}; see --max-logprobs)",
                              param=param)

    @property
    def info_max_logprobs(self) -> int:
        return self.client.args.max_logprobs

    def check_work(self, num_prompts: int, n: int, param: str) -> None:
        lim = self.limits
        if num_prompts > lim.max_prompts_per_request:
            raise bad_request(f"{num_prompts} prompts in one request; this server takes at most "
                              f"{lim.max_prompts_per_request} (--max-prompts-per-request)", param=param)
        if num_prompts * n > lim.max_seqs_per_request:
            raise bad_request(f"{num_prompts} prompt(s) x n={n} = {num_prompts * n} sequences in one request; this "
                              f"server takes at most {lim.max_seqs_per_request} (--max-seqs-per-request)",
                              param="n")

    def default_max_tokens(self, num_prompt: int, requested: int | None) -> int | None:
        """vLLM's choice: the request's max_tokens, else the generation config's (cut to the room the
        prompt leaves, so that a default never fails a request); a --generation-config folder's
        max_new_tokens also caps what a request asks for."""
        d = self.defaults
        if requested is None and "max_tokens" in d.params:
            room = self.info.max_model_len - num_prompt
            requested = min(int(d.params["max_tokens"]), room) if room >= 1 else None
        if requested is not None and d.max_tokens_cap is not None:
            requested = min(requested, int(d.max_tokens_cap))
        return requested

    def fit_max_tokens(self, num_prompt: int, max_tokens: int | None, param: str) -> int:
        """max_tokens, or all the room left when None; 400 when the request cannot fit (as vLLM)."""
        limit = self.info.max_model_len
        wanted = num_prompt + (max_tokens or 1)
        if wanted > limit:
            detail = f"{num_prompt} in the prompt" + (f", {max_tokens} for the completion" if max_tokens else "")
            raise APIError(400, f"This model's maximum context length is {limit} tokens. However, you "
                           f"requested {wanted} tokens ({detail}). Please reduce the length of the prompt "
                           "or the completion.", param=param, code="context_length_exceeded")
        return max_tokens if max_tokens is not None else limit - num_prompt

    def check_token_ids(self, ids, param: str) -> None:
        limit = self.vocab_limit
        for t in ids or ():
            t = int(t)
            if not 0 <= t < limit:
                raise bad_request(f"{param}: token id {t} is out of range [0, {limit})", param=param)

    def check_priority(self, req) -> None:
        if req.priority != 0 and self.client.args.scheduling_policy != "priority":
            raise bad_request(f"priority {req.priority} needs priority scheduling (--scheduling-policy priority); "
                              "this server schedules first come, first served", param="priority")

    def check_prompt_logprobs(self, req) -> None:
        value = req.prompt_logprobs
        if value is None:
            return
        if req.stream and value != 0:
            raise bad_request("prompt_logprobs are not available when stream=true", param="prompt_logprobs")
        self.check_logprobs(value, "prompt_logprobs")

    def truncate(self, ids: list[int], req) -> list[int]:
        """truncate_prompt_tokens (vLLM's): keep the last k tokens (truncation_side "right": the first k)."""
        k = req.truncate_prompt_tokens
        if k is None:
            return ids
        limit = self.info.max_model_len
        if k > limit:
            raise bad_request(f"truncate_prompt_tokens ({k}) is larger than max_model_len ({limit})",
                              param="truncate_prompt_tokens")
        k = limit - 1 if k == -1 else k
        if len(ids) <= k:
            return ids
        return ids[:k] if req.truncation_side == "right" else ids[-k:]

    def response_id(self, req, prefix: str) -> tuple[str, str]:
        """(the id responses carry, a unique engine id): the request's request_id when given (vLLM)."""
        if req.request_id is None:
            rid = f"{prefix}-{uuid.uuid4().hex}"
            return rid, rid
        rid = f"{prefix}-{req.request_id}"
        return rid, f"{rid}-{uuid.uuid4().hex[:8]}"

    # ---- conversions ----
    def sampling_params(self, req, max_tokens: int, logprobs: int | None, prompt_logprobs: int | None,
                        structured_outputs=None, skip_special_tokens: bool | None = None,
                        extra_stop_token_ids=()) -> SamplingParams:
        self.check_token_ids(req.allowed_token_ids, "allowed_token_ids")
        self.check_priority(req)
        kw = dict(n=req.n, max_tokens=max_tokens, min_tokens=req.min_tokens, stop=req.stop,
                  stop_token_ids=_merged(req.stop_token_ids, extra_stop_token_ids), ignore_eos=req.ignore_eos,
                  seed=req.seed,
                  logprobs=logprobs, prompt_logprobs=prompt_logprobs,
                  skip_special_tokens=req.skip_special_tokens if skip_special_tokens is None else skip_special_tokens,
                  include_stop_str_in_output=req.include_stop_str_in_output,
                  allowed_token_ids=req.allowed_token_ids, logit_bias=req.logit_bias, bad_words=req.bad_words,
                  structured_outputs=structured_outputs)
        for name in ("temperature", "top_p", "top_k", "min_p", "presence_penalty", "frequency_penalty",
                     "repetition_penalty"):
            value = getattr(req, name)
            if value is None:  # the model's generation_config.json default, if any (--generation-config)
                value = self.defaults.params.get(name)
            if value is not None:
                kw[name] = value
        try:
            params = SamplingParams(**kw)
            if params.bad_words:
                params.update_from_tokenizer(self.tokenizer)
        except ValueError as e:
            raise from_value_error(e, _PARAM_FIELDS) from e
        if params.logit_bias:
            self.check_token_ids(params.logit_bias, "logit_bias")
        return params

    async def chat_prompt(self, messages: list[ChatMessage], add_generation_prompt: bool, continue_final: bool,
                          template: str | None, template_kwargs: dict | None, tools: list | None = None,
                          reasoning_as_thinking: bool = False) -> str:
        """The chat template's text. reasoning_as_thinking: an assistant turn's reasoning_content (or vLLM
        0.32's `reasoning`) goes to the template as `thinking`, where gpt-oss's template reads its analysis."""
        template_kwargs = dict(template_kwargs or {})
        if template_kwargs.get("chat_template") is not None:
            template = template or template_kwargs.pop("chat_template")
        template_kwargs.pop("chat_template", None)
        if template is not None and not self.limits.trust_request_chat_template:
            raise bad_request("a chat_template in the request is refused: the server was not started with "
                              "--trust-request-chat-template", param="chat_template")
        if continue_final and add_generation_prompt:
            raise bad_request("continue_final_message and add_generation_prompt cannot both be true (set "
                              "add_generation_prompt to false to continue the final message)",
                              param="continue_final_message")
        dicts = []
        for i, m in enumerate(messages):
            d = m.model_dump(exclude_none=True)
            if isinstance(m.content, list):
                texts = []
                for part in m.content:
                    if part.type != "text" or part.text is None:
                        raise bad_request(f"content part type {part.type!r} is not supported (text only)",
                                          param=f"messages.{i}.content")
                    texts.append(part.text)
                d["content"] = "\n".join(texts)
            elif m.content is None:
                d["content"] = ""  # OpenAI allows null content (an assistant turn with tool calls); vLLM does this
            if d["role"] == "assistant" and "tool_calls" in d:
                _arguments_as_objects(d, f"messages.{i}.tool_calls")
            if reasoning_as_thinking and d["role"] == "assistant" and "thinking" not in d:
                thought = d.get("reasoning_content", d.get("reasoning"))
                if isinstance(thought, str) and thought:
                    d["thinking"] = thought
            dicts.append(d)
        try:
            source = self.tokenizer.get_chat_template(template)
        except ValueError as e:
            raise bad_request("the tokenizer has no chat template; pass chat_template "
                              "(with --trust-request-chat-template)", param="messages") from e
        try:
            renderer = self.state.templates if template is None else self.state.request_templates
            return await renderer.render(
                source, dicts, add_generation_prompt=add_generation_prompt, continue_final_message=continue_final,
                kwargs={**self.special_tokens, **template_kwargs}, tools=tools)
        except TemplateError as e:
            raise bad_request(str(e), param="chat_template" if template is not None else "messages") from e

    async def encode(self, text: str, add_special_tokens: bool, param: str) -> list[int]:
        try:
            return await self.preprocess.encode(text, add_special_tokens, self.info.max_model_len)
        except PromptTooLong as e:
            self.check_prompt_length(e.num_tokens, param, at_least=True)
            raise  # unreachable: num_tokens >= max_model_len
        except QueueFull as e:
            raise engine_error(e) from e

    async def decode(self, ids: list[int]) -> str:
        try:
            return await self.preprocess.decode(ids)
        except QueueFull as e:
            raise engine_error(e) from e

    # ---- running ----
    async def start(self, raw: Request, gens: list) -> tuple[tuple[int, RequestOutput] | None, AsyncIterator]:
        """Start the requests and wait for their first output, so that errors still get their HTTP
        status; (None, _) when the client left before that."""
        source = until_disconnect(raw, merge(gens))
        try:
            first = await source.__anext__()
        except StopAsyncIteration:
            return None, source
        except Exception as e:
            await source.aclose()
            raise engine_error(e) from e
        return first, source

    async def last_output(self, first, source) -> RequestOutput | None:
        """A non-streaming request's final (cumulative) output; None when its client left before the end."""
        final = first[1]
        try:
            async for _, ro in source:
                final = ro
        except Exception as e:
            raise engine_error(e) from e
        return final if final.finished else None

    def stream_failure(self, e: Exception) -> APIError:
        """An error after the 200 status went out: counted and logged; the caller sends it in the stream."""
        err = engine_error(e)
        self.metrics.count_error(err.status)
        err.log()
        return err

    def stream_error(self, e: Exception) -> str:
        """An error after the 200 status went out: an error event in the stream."""
        return self.stream_failure(e).sse()


def _merged(ids: list[int] | None, extra) -> list[int] | None:
    if not extra:
        return ids
    return list(dict.fromkeys([*(ids or []), *extra]))


def _arguments_as_objects(message: dict, param: str) -> None:
    """Tool calls of an assistant turn as chat templates take them (vLLM's _postprocess_messages): arguments
    an object, not OpenAI's JSON text (templates write `arguments | tojson`); an empty list dropped. Arguments
    that are not a JSON object become {} (a bad turn in the history must not fail every later request)."""
    calls = message.get("tool_calls")
    if not isinstance(calls, list):
        return
    if not calls:
        message.pop("tool_calls")
        return
    for item in calls:
        if not isinstance(item, dict):
            raise bad_request("assistant tool_calls entries must be objects", param=param)
        function = item.get("function")
        if item.get("type", "function") != "function" or not isinstance(function, dict):
            raise bad_request("chat completions take assistant tool_calls of type 'function' only", param=param)
        args = function.get("arguments")
        if isinstance(args, str):
            try:
                args = json.loads(args) if args.strip() else {}
            except json.JSONDecodeError:
                logger.warning("tool call %r has arguments that are not JSON; given to the template as {}",
                               function.get("name"))
                args = {}
        function["arguments"] = args if isinstance(args, dict) else {}
