"""What every OpenAI endpoint shares: the engine client and tokenizer, and the checks and conversions
from a request body to engine inputs (prompt ids, SamplingParams)."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import AsyncIterator

from fastapi import Request

from atom_server.generation_defaults import GenerationDefaults
from atom_server.outputs import RequestOutput
from atom_server.protocol import ChatMessage
from atom_server.sampling_params import SamplingParams
from atom_server.serving import openai_format as fmt
from atom_server.serving.engine_client import EngineClient, EngineDeadError, EngineRequestError
from atom_server.serving.errors import APIError, bad_request, from_value_error
from atom_server.serving.metrics import Metrics
from atom_server.serving.streams import merge, until_disconnect

_PARAM_FIELDS = tuple(f.name for f in dataclasses.fields(SamplingParams))


def engine_error(e: Exception) -> APIError:
    if isinstance(e, APIError):
        return e
    if isinstance(e, EngineDeadError):
        return APIError(503, f"the engine is not running: {e}", code="engine_dead")
    if isinstance(e, EngineRequestError):
        return APIError(e.status, str(e), code="invalid_value" if e.status == 400 else "engine_error")
    return APIError(500, f"{type(e).__name__}: {e}", code="internal_error")


@dataclasses.dataclass
class ServerState:
    client: EngineClient
    tokenizer: object
    metrics: Metrics
    api_key: str | None = None
    generation_defaults: GenerationDefaults = dataclasses.field(default_factory=GenerationDefaults)
    served_model_names: list[str] = dataclasses.field(default_factory=list)  # default: the engine's name
    created: int = dataclasses.field(default_factory=lambda: int(time.time()))


class ServingContext:
    def __init__(self, state: ServerState):
        self.state = state
        self.client = state.client
        self.metrics = state.metrics
        self.tokenizer = tok = state.tokenizer
        self.defaults = state.generation_defaults
        self.text_of = fmt.TokenText(tok)
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
        if self.client.dead:
            raise engine_error(EngineDeadError(self.client.dead_reason))

    def check_ids(self, ids: list[int], param: str) -> None:
        if not ids:
            raise bad_request("the prompt is empty", param=param)
        bad = [t for t in ids if t < 0 or t >= self.vocab_limit]
        if bad:
            raise bad_request(f"token id {bad[0]} is out of range [0, {self.vocab_limit})", param=param)

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

    # ---- conversions ----
    def sampling_params(self, req, max_tokens: int, logprobs: int | None,
                        prompt_logprobs: int | None) -> SamplingParams:
        kw = dict(n=req.n, max_tokens=max_tokens, min_tokens=req.min_tokens, stop=req.stop,
                  stop_token_ids=req.stop_token_ids, ignore_eos=req.ignore_eos, seed=req.seed,
                  logprobs=logprobs, prompt_logprobs=prompt_logprobs,
                  skip_special_tokens=req.skip_special_tokens,
                  include_stop_str_in_output=req.include_stop_str_in_output)
        for name in ("temperature", "top_p", "top_k", "min_p", "presence_penalty", "frequency_penalty",
                     "repetition_penalty"):
            value = getattr(req, name)
            if value is None:  # the model's generation_config.json default, if any (--generation-config)
                value = self.defaults.params.get(name)
            if value is not None:
                kw[name] = value
        try:
            return SamplingParams(**kw)
        except ValueError as e:
            raise from_value_error(e, _PARAM_FIELDS) from e

    def chat_prompt(self, messages: list[ChatMessage], add_generation_prompt: bool, continue_final: bool,
                    template: str | None, template_kwargs: dict | None) -> str:
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
            dicts.append(d)
        if template is None and not getattr(self.tokenizer, "chat_template", None):
            raise bad_request("the tokenizer has no chat template; pass chat_template", param="messages")
        try:
            return self.tokenizer.apply_chat_template(
                dicts, tokenize=False, add_generation_prompt=add_generation_prompt,
                continue_final_message=continue_final, chat_template=template, **(template_kwargs or {}))
        except Exception as e:  # a template error is the request's fault (roles, content)
            raise bad_request(f"cannot apply the chat template: {e}", param="messages") from e

    def encode(self, text: str, add_special_tokens: bool) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"])

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

    def stream_error(self, e: Exception) -> str:
        """An error after the 200 status went out: an error event in the stream."""
        err = engine_error(e)
        self.metrics.count_error(err.status)
        return err.sse()
