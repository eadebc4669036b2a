"""Request bodies of the OpenAI-compatible API (OpenAI's fields plus vLLM's extra sampling fields).
Unknown fields are ignored, as vLLM does; ranges are checked here so errors name the field. Every integer is
bounded to int64 and every float must be finite (JSON's NaN/Infinity are refused), so no value reaches the
engine's tensors unchecked."""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

from atom_server.sampling_params import INT64_MAX, INT64_MIN

Int64 = Annotated[int, Field(ge=INT64_MIN, le=INT64_MAX)]
TokenId = Annotated[int, Field(ge=INT64_MIN, le=INT64_MAX)]  # range against the vocabulary: checked later


def _int(default, *, ge: int = INT64_MIN, le: int = INT64_MAX, **kw):
    return Field(default, ge=ge, le=le, **kw)


def _refuse_if_set(value, info, what: str | None = None):
    """A field atom-server does not implement: a request that sets it gets a 400 naming it."""
    if value:
        raise ValueError(f"{what or info.field_name} is not supported by atom-server")
    return value


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)


class StreamOptions(_Body):
    include_usage: bool = False


class _SamplingFields(_Body):
    model: str | None = None
    n: int = _int(1, ge=1, le=128)
    temperature: float | None = Field(None, ge=0.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    top_k: int | None = _int(None, ge=-1)
    min_p: float | None = Field(None, ge=0.0, le=1.0)
    seed: int | None = _int(None)
    stop: str | list[str] | None = None
    stop_token_ids: list[TokenId] | None = None
    ignore_eos: bool = False
    min_tokens: int = _int(0, ge=0)
    presence_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    repetition_penalty: float | None = Field(None, gt=0.0)
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    # Accepted by OpenAI/vLLM but not implemented here: a request that sets them gets a 400 naming the
    # field rather than an answer that silently ignores what it asked for.
    logit_bias: dict[str, float] | None = None
    best_of: int | None = _int(None)
    response_format: dict[str, Any] | None = None
    guided_json: Any = None
    guided_regex: Any = None
    guided_choice: Any = None
    guided_grammar: Any = None
    structured_outputs: Any = None

    @field_validator("logit_bias", "guided_json", "guided_regex", "guided_choice", "guided_grammar",
                     "structured_outputs")
    @classmethod
    def _unsupported(cls, value, info):
        return _refuse_if_set(value, info)

    @field_validator("best_of")
    @classmethod
    def _no_best_of(cls, value):
        if value is not None and value > 1:
            raise ValueError("best_of > 1 is not supported by atom-server; use n")
        return value

    @field_validator("response_format")
    @classmethod
    def _text_only(cls, value):
        if value and value.get("type", "text") != "text":
            raise ValueError(f"response_format type {value.get('type')!r} is not supported by atom-server "
                             "(only 'text')")
        return value


Prompt = str | list[str] | list[TokenId] | list[list[TokenId]]


class CompletionRequest(_SamplingFields):
    prompt: Prompt
    max_tokens: int | None = _int(16, ge=1)
    logprobs: int | None = _int(None, ge=0)  # at most --max-logprobs (checked with the server's setting)
    echo: bool = False
    add_special_tokens: bool = True
    suffix: str | None = None

    @field_validator("suffix")
    @classmethod
    def _no_suffix(cls, value, info):
        return _refuse_if_set(value, info)


class TextPart(_Body):
    type: str
    text: str | None = None


class ChatMessage(BaseModel):
    # tool_calls, name, ... go to the chat template as given
    model_config = ConfigDict(extra="allow", allow_inf_nan=False)
    role: str
    content: str | list[TextPart] | None = None  # null (or absent) is an empty turn, as vLLM


class ChatCompletionRequest(_SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = _int(None, ge=1)
    max_completion_tokens: int | None = _int(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = _int(None, ge=0)  # at most --max-logprobs (checked with the server's setting)
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    add_special_tokens: bool = False
    chat_template: str | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: Any = None

    @field_validator("tools")
    @classmethod
    def _no_tools(cls, value, info):
        return _refuse_if_set(value, info, "tool calling (tools)")


class TokenizeCompletionRequest(_Body):
    model: str | None = None
    prompt: str
    add_special_tokens: bool = True
    return_token_strs: bool = False


class TokenizeChatRequest(_Body):
    model: str | None = None
    messages: list[ChatMessage] = Field(min_length=1)
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    add_special_tokens: bool = False
    chat_template: str | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    return_token_strs: bool = False


class DetokenizeRequest(_Body):
    model: str | None = None
    tokens: list[TokenId]

