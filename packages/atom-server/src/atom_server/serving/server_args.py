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

    def __post_init__(self) -> None:
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
        return parser

    @classmethod
    def from_cli_args(cls, ns: argparse.Namespace) -> ServerLimits:
        return cls(**{f.name: getattr(ns, f.name) for f in fields(cls) if hasattr(ns, f.name)})
