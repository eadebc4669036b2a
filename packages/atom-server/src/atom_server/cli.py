"""`atom` command line: `atom serve [MODEL] [vLLM-style engine flags] [--host --port --api-key ...]`."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys

from atom_server.config import EngineArgs, HelpFormatter

logger = logging.getLogger("atom_server.cli")

UVICORN_LOG_LEVELS = ["critical", "error", "warning", "info", "debug", "trace"]


def add_serve_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("serve", help="run the OpenAI-compatible server", formatter_class=HelpFormatter,
                              description="Serve a model over an OpenAI-compatible HTTP API.")
    p.add_argument("model_tag", nargs="?", default=None, metavar="MODEL",
                   help="HF checkpoint folder or .gguf file (default: bundled SmolLM2-135M-Instruct)")
    EngineArgs.add_cli_args(p)
    p.add_argument("--host", type=str, default="0.0.0.0", help="address to listen on")
    p.add_argument("--port", type=int, default=8000, help="port to listen on (taken before the model loads)")
    p.add_argument("--api-key", type=str, default=os.environ.get("ATOM_API_KEY"),
                   help="require 'Authorization: Bearer <key>' on the API (default: $ATOM_API_KEY)")
    p.add_argument("--uvicorn-log-level", type=str, default="info", choices=UVICORN_LOG_LEVELS,
                   help="log level of the HTTP server (uvicorn)")
    from atom_server.serving.server_args import ServerLimits

    ServerLimits.add_cli_args(p)
    p.set_defaults(func=run_serve)
    return p


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="atom", description="ATOM inference engine")
    parser.add_argument("--version", action="version", version=version_text(),
                        help="show the versions of atom-server and atom-core and exit")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    add_serve_parser(sub)
    from atom_server import bench_cli

    bench_cli.add_parser(sub)
    return parser


def version_text() -> str:
    import atom

    import atom_server

    return f"atom-server {atom_server.__version__} (atom-core {atom.__version__})"


def model_problem(model: str) -> str | None:
    """Why `model` cannot be loaded, found before any process starts (one clear line), or None."""
    if not os.path.exists(model):
        return f"model {model!r} not found (give a local HF checkpoint folder or a .gguf file)"
    if os.path.isdir(model):
        if not os.path.isfile(os.path.join(model, "config.json")):
            return f"model folder {model!r} has no config.json (is it a Hugging Face checkpoint folder?)"
        return None
    if not model.endswith(".gguf"):
        return f"model {model!r} is a file but not a .gguf file (give a checkpoint folder or a .gguf file)"
    return None


def _engine_args(ns: argparse.Namespace, parser: argparse.ArgumentParser) -> EngineArgs | int:
    from atom_server import default_model

    if ns.model_tag and ns.model and ns.model_tag != ns.model:
        parser.error(f"two models given: {ns.model_tag!r} and --model {ns.model!r}")
    ns.model = ns.model_tag or ns.model
    if not 0 < ns.port < 65536:
        parser.error(f"--port must be in 1..65535, got {ns.port}")
    try:  # flags first, so a bad flag is named even when the model is wrong too
        from atom_server.serving.server_args import ServerLimits

        ns.server_limits = ServerLimits.from_cli_args(ns)
        args = EngineArgs.from_cli_args(ns)
    except ValueError as e:
        parser.error(str(e))
    if args.model is None:
        try:
            args.model = default_model.resolve_model_path()
        except default_model.DefaultModelMissing as e:
            print(f"atom: error: {e}", file=sys.stderr)
            return 2
        args.served_model_name = args.served_model_name or default_model.SERVED_NAME
    else:
        problem = model_problem(args.model)
        if problem:
            parser.error(problem)
    return args


def run_serve(ns: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    args = _engine_args(ns, parser)
    if isinstance(args, int):
        return args
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from atom_server.serving.listen import PortUnavailable, bind_port

    try:  # before the heavy imports and the engine: a busy port fails in a second
        sock = bind_port(ns.host, ns.port)
    except PortUnavailable as e:
        logger.error("atom serve failed: %s", e)
        return 1
    from atom_server.serving.api_server import serve

    def on_sigterm(signum, frame):
        # uvicorn handles SIGTERM while serving (drain) and re-raises it afterwards; landing here then
        # (or during start-up) means: leave cleanly with status 0.
        raise SystemExit(0)

    signal.signal(signal.SIGTERM, on_sigterm)
    try:
        return asyncio.run(serve(args, host=ns.host, port=ns.port, api_key=ns.api_key,
                                 uvicorn_log_level=ns.uvicorn_log_level, sock=sock, limits=ns.server_limits))
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
