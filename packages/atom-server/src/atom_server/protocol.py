"""Request bodies of the OpenAI-compatible API: OpenAI's fields plus vLLM's extra fields.

Every field of vLLM's ChatCompletionRequest / CompletionRequest (vLLM 0.32) is declared here and is
one of three kinds:
- implemented: it does what vLLM does;
- accepted: it has no effect in ATOM and none in vLLM either for a text-only model served alone
  (ACCEPTED_NO_OP, e.g. `user`, `session_id`);
- refused: any value but its neutral one gets a 400 naming the field (REFUSED_CHAT_FIELDS,
  REFUSED_COMPLETION_FIELDS), never an answer that silently ignores what was asked.
Fields outside vLLM's protocol are ignored, as before. Ranges are checked here so errors name the field.
Every integer is bounded to int64 and every float must be finite (JSON's NaN/Infinity are refused), so no
value reaches the engine's tensors unchecked.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, create_model, field_validator

from atom_server.sampling_params import INT64_MAX, INT64_MIN

Int64 = Annotated[int, Field(ge=INT64_MIN, le=INT64_MAX)]
TokenId = Int64  # its range against the vocabulary is checked later


def _int(default, *, ge: int = INT64_MIN, le: int = INT64_MAX, **kw):
    return Field(default, ge=ge, le=le, **kw)


_NO = "is not supported by atom-server"

# field -> (neutral values besides None / [] / {}, why it is refused).
REFUSED_COMMON: dict[str, tuple[tuple, str]] = {
    "use_beam_search": ((False,), f"{_NO} (beam search)"),
    "logprob_token_ids": ((), _NO),
    "watermarking": ((False,), _NO),
    "return_tokens_as_token_ids": ((False,), _NO),
    "return_token_offsets": ((False,), _NO),
    "routed_experts_prompt_start": ((0,), _NO),
    "spaces_between_special_tokens": ((True,), f"{_NO} with false"),
    "cache_salt": ((), f"{_NO} (the prefix cache is shared by all requests)"),
    "kv_transfer_params": ((), f"{_NO} (no disaggregated prefill)"),
    "ec_transfer_params": ((), f"{_NO} (no disaggregated prefill)"),
    "vllm_xargs": ((), f"{_NO} (no custom logits processors)"),
    "repetition_detection": ((), _NO),
    "stream_interval": ((1,), f"{_NO} (every token is streamed as it comes)"),
    "thinking_token_budget": ((), _NO),
    "media_io_kwargs": ((), f"{_NO} (text-only models)"),
    "mm_processor_kwargs": ((), f"{_NO} (text-only models)"),
    "return_mm_kwargs": ((False,), f"{_NO} (text-only models)"),
}
REFUSED_CHAT_FIELDS: dict[str, tuple[tuple, str]] = {
    **REFUSED_COMMON,
    "echo": ((False,), f"{_NO} for chat completions"),
    "documents": ((), f"{_NO} (pass them through chat_template_kwargs)"),
    "return_prompt_text": ((False,), _NO),
}
REFUSED_COMPLETION_FIELDS: dict[str, tuple[tuple, str]] = {
    **REFUSED_COMMON,
    "suffix": (("",), _NO),
    "prompt_embeds": ((), _NO),
}
# vLLM fields accepted without effect: nothing in ATOM (nor in vLLM serving a text-only model on its own)
# would act on them.
ACCEPTED_NO_OP = ("user", "session_id", "length_penalty", "parallel_tool_calls", "mm_payload")
# vLLM fields atom-server implements on top of OpenAI's (the sampler-side ones of issue 19, structured
# outputs, tools and reasoning); test_request_fields.py checks none of them is refused.
IMPLEMENTED_VLLM_FIELDS = (
    "prompt_logprobs", "allowed_token_ids", "bad_words", "truncate_prompt_tokens", "truncation_side",
    "return_token_ids", "priority", "logit_bias", "request_id", "structured_outputs", "guided_json",
    "guided_regex", "guided_choice", "guided_grammar", "guided_decoding_backend", "response_format",
    "tools", "tool_choice", "include_reasoning", "reasoning_effort")
GUIDED_FIELDS = ("guided_json", "guided_regex", "guided_choice", "guided_grammar")


def _neutral(value, neutral: tuple) -> bool:
    return value is None or value == [] or value == {} or any(value == n and type(value) is type(n)
                                                               for n in neutral)


def _with_refusals(name: str, base: type[BaseModel], refused: dict[str, tuple[tuple, str]]) -> type[BaseModel]:
    """`base` plus one field per refused name, each refused (400 naming it) unless neutral."""

    def refuse(cls, value, info):
        neutral, why = refused[info.field_name]
        if not _neutral(value, neutral):
            raise ValueError(f"{info.field_name} {why}")
        return value

    return create_model(name, __base__=base, __validators__={"refuse": field_validator(*refused)(refuse)},
                        **{n: (Any, None) for n in refused})


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)


class StreamOptions(_Body):
    include_usage: bool = False


class JsonSchemaFormat(_Body):
    model_config = ConfigDict(extra="ignore", allow_inf_nan=False, populate_by_name=True)
    name: str | None = None
    description: str | None = None
    json_schema: dict[str, Any] | bool | None = Field(None, alias="schema")
    strict: bool | None = None


class ResponseFormat(_Body):
    type: Literal["text", "json_object", "json_schema", "structural_tag"]
    json_schema: JsonSchemaFormat | None = None

    @field_validator("type")
    @classmethod
    def _no_structural_tag(cls, value):
        if value == "structural_tag":
            raise ValueError("response_format type 'structural_tag' is not supported by atom-server")
        return value


class StructuredOutputsFields(_Body):
    """vLLM's structured_outputs object (StructuredOutputsParams)."""

    model_config = ConfigDict(extra="ignore", allow_inf_nan=False, populate_by_name=True)
    json_schema: str | dict[str, Any] | None = Field(None, alias="json")  # "json" would shadow BaseModel.json
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None
    disable_any_whitespace: bool = False
    disable_additional_properties: bool = False
    whitespace_pattern: str | None = None
    structural_tag: str | None = None


class _SamplingCore(_Body):
    """The sampling fields every generating endpoint takes (/v1/responses too)."""

    model: str | None = None
    temperature: float | None = Field(None, ge=0.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    top_k: int | None = _int(None, ge=-1)
    min_p: float | None = Field(None, ge=0.0, le=1.0)
    seed: int | None = _int(None)
    stop: str | list[str] | None = None
    stop_token_ids: list[TokenId] | None = None
    ignore_eos: bool = False
    presence_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    repetition_penalty: float | None = Field(None, gt=0.0)
    skip_special_tokens: bool = True


class _SamplingFields(_SamplingCore):
    n: int = _int(1, ge=1, le=128)
    min_tokens: int = _int(0, ge=0)
    include_stop_str_in_output: bool = False
    stream: bool = False
    stream_options: StreamOptions | None = None
    # vLLM's sampler-side fields
    prompt_logprobs: int | None = _int(None, ge=-1)  # at most --max-logprobs
    allowed_token_ids: list[TokenId] | None = None
    bad_words: list[str] | None = None
    logit_bias: dict[str, float] | None = None
    truncate_prompt_tokens: int | None = _int(None, ge=-1)
    truncation_side: Literal["left", "right"] | None = None
    return_token_ids: bool | None = None
    priority: int = _int(0)
    request_id: str | None = Field(None, min_length=1, max_length=256)
    # Structured outputs (at most one of these; tools' required / named tool_choice count too).
    response_format: ResponseFormat | None = None
    structured_outputs: StructuredOutputsFields | None = None
    guided_json: str | dict[str, Any] | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None
    guided_decoding_backend: str | None = None
    # Accepted, no effect (ACCEPTED_NO_OP).
    user: str | None = None
    session_id: str | None = None
    length_penalty: float = 1.0  # beam search only, and beam search is refused
    mm_payload: Literal["tensors", "none"] = "tensors"
    # Refused unless neutral, with their own rules.
    best_of: int | None = _int(None)

    @field_validator("best_of")
    @classmethod
    def _no_best_of(cls, value):
        if value is not None and value > 1:
            raise ValueError("best_of > 1 is not supported by atom-server; use n")
        return value

    @field_validator("guided_decoding_backend")
    @classmethod
    def _xgrammar_only(cls, value):
        if value is not None and value not in ("auto", "xgrammar"):
            raise ValueError(f"guided_decoding_backend {value!r} is not supported by atom-server (xgrammar only)")
        return value

    @field_validator("allowed_token_ids")
    @classmethod
    def _some_allowed(cls, value):
        if value is not None and not value:
            raise ValueError("allowed_token_ids must not be empty")
        return value

    @field_validator("truncate_prompt_tokens")
    @classmethod
    def _truncate_not_zero(cls, value):
        if value == 0:
            raise ValueError("truncate_prompt_tokens must be -1 (the context length) or >= 1")
        return value


Prompt = str | list[str] | list[TokenId] | list[list[TokenId]]


class CompletionRequest(_with_refusals("_CompletionFields", _SamplingFields, REFUSED_COMPLETION_FIELDS)):
    prompt: Prompt
    max_tokens: int | None = _int(16, ge=1)
    logprobs: int | None = _int(None, ge=0)  # at most --max-logprobs (checked with the server's setting)
    echo: bool = False
    add_special_tokens: bool = True


class TextPart(_Body):
    type: str
    text: str | None = None


class ChatMessage(BaseModel):
    # tool_calls, name, ... go to the chat template as given
    model_config = ConfigDict(extra="allow", allow_inf_nan=False)
    role: str
    content: str | list[TextPart] | None = None  # null (or absent) is an empty turn, as vLLM


class FunctionDefinition(_Body):
    name: str = Field(min_length=1, max_length=256)
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class Tool(_Body):
    type: Literal["function"] = "function"
    function: FunctionDefinition


class ToolChoiceFunction(_Body):
    name: str = Field(min_length=1)


class NamedToolChoice(_Body):
    type: Literal["function"] = "function"
    function: ToolChoiceFunction


class ChatCompletionRequest(_with_refusals("_ChatFields", _SamplingFields, REFUSED_CHAT_FIELDS)):
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
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    include_reasoning: bool = True  # with --reasoning-parser: false drops reasoning_content
    # OpenAI's; as vLLM: given to the chat template (reasoning_effort, and enable_thinking = effort != "none"
    # unless chat_template_kwargs set it). gpt-oss takes low / medium / high.
    reasoning_effort: Literal["none", "minimal", "low", "medium", "high", "xhigh", "max"] | None = None
    parallel_tool_calls: bool | None = True  # accepted, no effect (ACCEPTED_NO_OP)

    @field_validator("tools")
    @classmethod
    def _some_tools(cls, value):
        if value is not None and not value:
            raise ValueError("tools must not be an empty array (omit the field instead)")
        return value


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



_STATELESS = "is not supported by atom-server: responses are not stored; send the whole conversation as input"
# /v1/responses fields refused unless neutral (field -> (neutral values besides None / [] / {}, why)).
REFUSED_RESPONSES_FIELDS: dict[str, tuple[tuple, str]] = {
    "previous_response_id": ((), _STATELESS),
    "conversation": ((), _STATELESS),
    "background": ((False,), "is not supported by atom-server (no background responses)"),
    "prompt": ((), "is not supported by atom-server (no stored prompt templates)"),
    "top_logprobs": ((0,), "is not supported by atom-server on /v1/responses (use chat completions)"),
    "truncation": (("disabled",), "'auto' is not supported by atom-server (a prompt over the context is a 400)"),
}


class ResponsesTool(_Body):
    """A Responses API tool: function tools only (built-in tools such as web_search run on OpenAI's side)."""

    type: str
    name: str | None = Field(None, min_length=1, max_length=256)
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None

    @field_validator("type")
    @classmethod
    def _functions_only(cls, value):
        if value != "function":
            raise ValueError(f"tools of type {value!r} are not supported by atom-server (function tools only)")
        return value


class ResponsesToolChoiceFunction(_Body):
    type: Literal["function"]
    name: str = Field(min_length=1)


class ResponsesReasoning(_Body):
    effort: Literal["none", "minimal", "low", "medium", "high", "xhigh", "max"] | None = None
    summary: str | None = None  # accepted; summaries are not generated
    generate_summary: str | None = None


class ResponsesTextFormat(_Body):
    model_config = ConfigDict(extra="ignore", allow_inf_nan=False, populate_by_name=True)
    type: Literal["text", "json_object", "json_schema"]
    name: str | None = None
    description: str | None = None
    json_schema: dict[str, Any] | bool | None = Field(None, alias="schema")
    strict: bool | None = None


class ResponsesText(_Body):
    format: ResponsesTextFormat | None = None
    verbosity: str | None = None  # accepted, no effect


class ResponsesRequest(_with_refusals("_ResponsesFields", _SamplingCore, REFUSED_RESPONSES_FIELDS)):
    """POST /v1/responses (OpenAI's Responses API, as vLLM serves it for any model): stateless (no stored
    responses), function tools, text / json_schema / json_object output formats, reasoning effort, streaming events.
    Sampling fields as on the other endpoints (vLLM's extras included)."""

    input: str | list[dict[str, Any]]
    instructions: str | None = None
    max_output_tokens: int | None = _int(None, ge=1)
    logit_bias: dict[str, float] | None = None
    structured_outputs: StructuredOutputsFields | None = None
    tools: list[ResponsesTool] | None = None
    tool_choice: Literal["none", "auto", "required"] | ResponsesToolChoiceFunction | None = None
    parallel_tool_calls: bool | None = True  # accepted, no effect
    max_tool_calls: int | None = None  # accepted: it bounds built-in tool calls, which atom-server has none of
    reasoning: ResponsesReasoning | None = None
    include_reasoning: bool = True
    text: ResponsesText | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    stream: bool = False
    store: bool | None = True  # accepted; nothing is stored (the response says store: false)
    metadata: dict[str, str] | None = None
    include: list[str] | None = None  # accepted (no stored or encrypted content to include)
    user: str | None = None
    service_tier: str | None = None
    priority: int = _int(0)
    request_id: str | None = Field(None, min_length=1, max_length=256)

    @field_validator("tools")
    @classmethod
    def _named_tools(cls, value):
        for i, t in enumerate(value or []):
            if not t.name:
                raise ValueError(f"tools[{i}] needs a name")
        return value
