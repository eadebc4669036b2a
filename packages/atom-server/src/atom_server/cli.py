"""`atom` command line: `atom serve [MODEL] [vLLM-style engine flags] [--host --port --api-key ...]`."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys

from atom_server.config import EngineArgs

logger = logging.getLogger("atom_server.cli")

UVICORN_LOG_LEVELS = ["critical", "error", "warning", "info", "debug", "trace"]


def add_serve_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("serve", help="run the OpenAI-compatible server",
                              description="Serve a model over an OpenAI-compatible HTTP API.")
    p.add_argument("model_tag", nargs="?", default=None, metavar="MODEL",
                   help="HF checkpoint folder or .gguf file (default: bundled SmolLM2-135M-Instruct)")
    EngineArgs.add_cli_args(p)
    p.add_argument("--host", type=str, default="0.0.0.0")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", type=str, default=os.environ.get("ATOM_API_KEY"),
                   help="require 'Authorization: Bearer <key>' on the API (default: $ATOM_API_KEY)")
    p.add_argument("--uvicorn-log-level", type=str, default="info", choices=UVICORN_LOG_LEVELS)
    from atom_server.serving.server_args import ServerLimits

    ServerLimits.add_cli_args(p)
    p.set_defaults(func=run_serve)
    return p


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="atom", description="ATOM inference engine")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    add_serve_parser(sub)
    from atom_server import bench_cli

    bench_cli.add_parser(sub)
    return parser


def _engine_args(ns: argparse.Namespace, parser: argparse.ArgumentParser) -> EngineArgs | int:
    from atom_server import default_model

    if ns.model_tag and ns.model and ns.model_tag != ns.model:
        parser.error(f"two models given: {ns.model_tag!r} and --model {ns.model!r}")
    ns.model = ns.model_tag or ns.model
    if ns.model is None:
        try:
            ns.model = default_model.resolve_model_path()
        except default_model.DefaultModelMissing as e:
            print(f"atom: error: {e}", file=sys.stderr)
            return 2
        ns.served_model_name = ns.served_model_name or default_model.SERVED_NAME
    elif not os.path.exists(ns.model):
        parser.error(f"model {ns.model!r} not found (give a local HF checkpoint folder or a .gguf file)")
    if not 0 < ns.port < 65536:
        parser.error(f"--port must be in 1..65535, got {ns.port}")
    try:
        from atom_server.serving.server_args import ServerLimits

        ns.server_limits = ServerLimits.from_cli_args(ns)
        return EngineArgs.from_cli_args(ns)
    except ValueError as e:
        parser.error(str(e))


def run_serve(ns: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    args = _engine_args(ns, parser)
    if isinstance(args, int):
        return args
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from atom_server.serving.api_server import serve

    def on_sigterm(signum, frame):
        # uvicorn handles SIGTERM while serving (drain) and re-raises it afterwards; landing here then
        # (or during start-up) means: leave cleanly with status 0.
        raise SystemExit(0)

    signal.signal(signal.SIGTERM, on_sigterm)
    logger.info("starting the engine for %s", args.model)
    try:
        return asyncio.run(serve(args, host=ns.host, port=ns.port, api_key=ns.api_key,
                                 uvicorn_log_level=ns.uvicorn_log_level, limits=ns.server_limits))
    except KeyboardInterrupt:
        return 0
    except (RuntimeError, OSError, ValueError) as e:  # start-up failures: the engine or the tokenizer
        logger.error("atom serve failed: %s", e)
        return 1


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    ns = parser.parse_args(argv)
    sub_parser = parser
    for action in parser._subparsers._group_actions:  # the subcommand's own parser, for its errors
        sub_parser = action.choices.get(ns.command, parser)
    return ns.func(ns, sub_parser)


if __name__ == "__main__":
    sys.exit(main())
