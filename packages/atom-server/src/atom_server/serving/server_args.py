"""The HTTP server's own limits and policies (`atom serve` flags; vLLM's names where vLLM has the flag)."""

from __future__ import annotations

import argparse
from dataclasses import dataclass, fields

ENGINE_RESTART_POLICIES = ("never", "always")


@dataclass
class ServerLimits:
    max_request_body_bytes: int = 16 << 20
    max_prompts_per_request: int = 256
    max_seqs_per_request: int = 256  # prompts x n
    trust_request_chat_template: bool = False
    shutdown_timeout: float = 20.0
    engine_restart: str = "never"
    chat_template_timeout: float = 10.0
    # Tool calling and reasoning (vLLM's flags).
    enable_auto_tool_choice: bool = False
    tool_call_parser: str | None = None
    reasoning_parser: str | None = None
    enable_prompt_tokens_details: bool = False  # usage.prompt_tokens_details.cached_tokens (vLLM's flag)

    def __post_init__(self) -> None:
        from atom_server.serving.harmony import HARMONY_REASONING_PARSER, HARMONY_TOOL_PARSER
        from atom_server.serving.reasoning import REASONING_PARSERS
        from atom_server.serving.tool_parsers import TOOL_PARSERS

        tool_parsers = [*TOOL_PARSERS, HARMONY_TOOL_PARSER]
        reasoning_parsers = [*REASONING_PARSERS, HARMONY_REASONING_PARSER]
        if self.tool_call_parser is not None and self.tool_call_parser not in tool_parsers:
            raise ValueError(f"tool_call_parser must be one of {', '.join(tool_parsers)}, "
                             f"got {self.tool_call_parser!r}")
        if self.enable_auto_tool_choice and self.tool_call_parser is None:
            raise ValueError("enable_auto_tool_choice needs --tool-call-parser (one of "
                             f"{', '.join(tool_parsers)})")
        if self.reasoning_parser is not None and self.reasoning_parser not in reasoning_parsers:
            raise ValueError(f"reasoning_parser must be one of {', '.join(reasoning_parsers)}, "
                             f"got {self.reasoning_parser!r}")
        for name in ("max_request_body_bytes", "max_prompts_per_request", "max_seqs_per_request"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
        for name in ("shutdown_timeout", "chat_template_timeout"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)!r}")
        if self.engine_restart not in ENGINE_RESTART_POLICIES:
            raise ValueError(f"engine_restart must be one of {', '.join(ENGINE_RESTART_POLICIES)}, "
                             f"got {self.engine_restart!r}")

    @staticmethod
    def add_cli_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
        d = {f.name: f.default for f in fields(ServerLimits)}
        g = parser.add_argument_group("request limits and server policies")
        g.add_argument("--max-request-body-bytes", type=int, default=d["max_request_body_bytes"],
                       help="larger request bodies get a 413 (default: %(default)s)")
        g.add_argument("--max-prompts-per-request", type=int, default=d["max_prompts_per_request"],
                       help="most prompts one /v1/completions request may batch (default: %(default)s)")
        g.add_argument("--max-seqs-per-request", type=int, default=d["max_seqs_per_request"],
                       help="most sequences (prompts x n) one request may create (default: %(default)s)")
        g.add_argument("--trust-request-chat-template", action="store_true",
                       help="accept a chat_template in requests (rendered in Jinja's sandbox, in a worker "
                            "process, with a time and memory bound); refused with a 400 otherwise, as vLLM")
        g.add_argument("--chat-template-timeout", type=float, default=d["chat_template_timeout"],
                       help="seconds a chat template may take to render (default: %(default)s)")
        g.add_argument("--shutdown-timeout", type=float, default=d["shutdown_timeout"],
                       help="on SIGTERM, seconds the requests in flight may take to finish; the rest end with "
                            "an error (streams: an error event, then [DONE]); 0 ends them at once "
                            "(default: %(default)s)")
        g.add_argument("--engine-restart", choices=ENGINE_RESTART_POLICIES, default=d["engine_restart"],
                       help="when the engine process dies or stalls: 'never' exits the server with status 1 "
                            "(as vLLM, for a supervisor to restart), 'always' starts a new engine process "
                            "(default: %(default)s)")
        g.add_argument("--enable-prompt-tokens-details", action="store_true",
                       help="usage of chat and completions responses gets prompt_tokens_details.cached_tokens: "
                            "the prompt tokens the prefix cache already held (as vLLM; /v1/responses always "
                            "reports them)")
        from atom_server.serving.harmony import HARMONY_REASONING_PARSER, HARMONY_TOOL_PARSER
        from atom_server.serving.reasoning import REASONING_PARSERS
        from atom_server.serving.tool_parsers import TOOL_PARSERS

        t = parser.add_argument_group("tool calling and reasoning")
        t.add_argument("--enable-auto-tool-choice", action="store_true",
                       help="let the model decide when to call tools (tool_choice \"auto\", the default when a "
                            "request has tools); needs --tool-call-parser")
        t.add_argument("--tool-call-parser", choices=sorted([*TOOL_PARSERS, HARMONY_TOOL_PARSER]), default=None,
                       help="how tool calls are read from the model's output: hermes (Qwen2/2.5/3, Hermes), "
                            "llama3_json (Llama 3.x), mistral ([TOOL_CALLS]), deepseek_v3 (DeepSeek-V3, R1), "
                            "deepseek_v31 (DeepSeek-V3.1), openai (gpt-oss: harmony's "
                            "commentary messages to functions.*) (default: none; tool_choice \"auto\" is refused, "
                            "\"required\" and a named function still work)")
        t.add_argument("--reasoning-parser", choices=sorted([*REASONING_PARSERS, HARMONY_REASONING_PARSER]),
                       default=None,
                       help="split <think>...</think> from the answer into reasoning_content: qwen3, deepseek_r1; "
                            "openai_gptoss: harmony's analysis channel (gpt-oss models get it without the flag, "
                            "as in vLLM) (default: none; the whole output is content)")
        return parser

    @classmethod
    def from_cli_args(cls, ns: argparse.Namespace) -> ServerLimits:
        return cls(**{f.name: getattr(ns, f.name) for f in fields(cls) if hasattr(ns, f.name)})
