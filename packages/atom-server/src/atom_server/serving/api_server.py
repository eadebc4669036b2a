"""OpenAI-compatible HTTP server (FastAPI + uvicorn) in front of the engine-core process."""

from __future__ import annotations

import asyncio
import hmac
import logging
import socket
import time

from fastapi import FastAPI, Request
from fastapi.responses import Response

from atom_server.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    TokenizeChatRequest,
    TokenizeCompletionRequest,
)
from atom_server.serving.chat import create_chat_completion
from atom_server.serving.completions import create_completion
from atom_server.serving.context import ServerState, ServingContext, engine_error
from atom_server.serving.engine_client import EngineClient, EngineDeadError
from atom_server.serving.errors import APIError, bad_request, install_error_handlers
from atom_server.serving.listen import bind_port
from atom_server.serving.metrics import Metrics

logger = logging.getLogger("atom_server.api")

OPEN_PATHS = ("/health", "/ping", "/version", "/metrics")


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("atom-server")
    except PackageNotFoundError:
        return "0.1.0+local"


class ApiKeyMiddleware:
    """Bearer-token check as plain ASGI middleware (BaseHTTPMiddleware would hide client disconnects
    from streaming endpoints)."""

    def __init__(self, app, api_key: str, on_reject=None):
        self.app = app
        self.expected = f"Bearer {api_key}".encode()
        self.on_reject = on_reject

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and not scope["path"].startswith(OPEN_PATHS):
            given = dict(scope.get("headers") or []).get(b"authorization", b"")
            if not hmac.compare_digest(given, self.expected):
                if self.on_reject is not None:
                    self.on_reject(401)
                err = APIError(401, "invalid or missing API key (send 'Authorization: Bearer <key>')",
                               code="invalid_api_key")
                await err.response()(scope, receive, send)
                return
        await self.app(scope, receive, send)


def build_app(state: ServerState) -> FastAPI:
    app = FastAPI(title="ATOM OpenAI-compatible server", version=_version())
    ctx = ServingContext(state)
    app.state.atom = ctx
    install_error_handlers(app, on_error=state.metrics.count_error)
    if state.api_key:
        app.add_middleware(ApiKeyMiddleware, api_key=state.api_key, on_reject=state.metrics.count_error)

    @app.get("/health")
    async def health():
        if state.client.dead:
            return engine_error(EngineDeadError(state.client.dead_reason)).response()
        return Response(status_code=200)

    @app.get("/ping")
    async def ping():
        return await health()

    @app.get("/version")
    async def version():
        return {"version": _version()}

    @app.get("/metrics")
    async def metrics():
        return Response(state.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/debug/stats")
    async def debug_stats():
        return {"engine_pid": state.client.engine_pid, "engine_alive": not state.client.dead,
                "dead_reason": state.client.dead_reason, "stats": state.client.stats}

    @app.get("/v1/models")
    async def models():
        info = ctx.info
        return {"object": "list", "data": [{
            "id": name, "object": "model", "created": state.created, "owned_by": "atom",
            "root": info.model_path, "parent": None, "max_model_len": info.max_model_len}
            for name in ctx.served_model_names]}

    @app.post("/tokenize")
    async def tokenize(req: TokenizeCompletionRequest | TokenizeChatRequest):
        ctx.check_model(req.model)
        if isinstance(req, TokenizeChatRequest):
            text = ctx.chat_prompt(req.messages, req.add_generation_prompt, req.continue_final_message,
                                   req.chat_template, req.chat_template_kwargs)
        else:
            text = req.prompt
        ids = ctx.encode(text, req.add_special_tokens)
        return {"count": len(ids), "max_model_len": ctx.info.max_model_len, "tokens": ids,
                "token_strs": ctx.tokenizer.convert_ids_to_tokens(ids) if req.return_token_strs else None}

    @app.post("/detokenize")
    async def detokenize(req: DetokenizeRequest):
        ctx.check_model(req.model)
        bad = [t for t in req.tokens if t < 0 or t >= ctx.vocab_limit]
        if bad:
            raise bad_request(f"token id {bad[0]} is out of range [0, {ctx.vocab_limit})", param="tokens")
        return {"prompt": ctx.tokenizer.decode(req.tokens)}

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest, raw: Request):
        return await create_completion(ctx, req, raw)

    @app.post("/v1/chat/completions")
    async def chat_completions(req: ChatCompletionRequest, raw: Request):
        return await create_chat_completion(ctx, req, raw)

    return app


async def serve(engine_args, host: str = "0.0.0.0", port: int = 8000, api_key: str | None = None,
                uvicorn_log_level: str = "info", sock: socket.socket | None = None) -> int:
    """Take the port, start the engine process, then serve HTTP until SIGTERM/SIGINT; drain, stop the engine."""
    import uvicorn

    from atom_server.generation_defaults import load_generation_defaults
    from atom_server.tokenizer import load_tokenizer

    started = time.perf_counter()
    sock = sock or bind_port(host, port)
    names = engine_args.served_model_names()
    defaults = load_generation_defaults(engine_args.model, engine_args.generation_config)
    logger.info("%s", defaults.describe())
    logger.info("starting the engine for %s", engine_args.model)
    metrics = Metrics(model_name=names[0] if names else "")
    client = EngineClient(engine_args, metrics)
    loop = asyncio.get_running_loop()
    tokenizer_f = loop.run_in_executor(None, load_tokenizer, engine_args.model, engine_args.tokenizer,
                                       engine_args.trust_remote_code)
    # If the engine fails first, its error is the one to report: the tokenizer's is then only consumed.
    tokenizer_f.add_done_callback(lambda f: f.cancelled() or f.exception())
    try:
        info = await client.start()
        tokenizer = await tokenizer_f
    except BaseException:
        sock.close()
        await client.shutdown(timeout_s=5)
        raise
    shown_host = "localhost" if host in ("0.0.0.0", "::", "") else host
    logger.info("model %s (served as %s), dtype %s, kernel backend %s, KV cache capacity %d tokens, "
                "max_model_len %d", info.model_path, ", ".join(repr(n) for n in names), info.dtype,
                info.kernel_backend, info.kv_capacity_tokens, info.max_model_len)
    state = ServerState(client=client, tokenizer=tokenizer, metrics=metrics, api_key=api_key,
                        generation_defaults=defaults, served_model_names=names)
    app = build_app(state)
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level=uvicorn_log_level,
                                           timeout_graceful_shutdown=None))
    logger.info("start-up: ready in %.1f s; OpenAI-compatible API at http://%s:%d/v1",
                time.perf_counter() - started, shown_host, port)
    try:
        await server.serve(sockets=[sock])
    finally:
        logger.info("HTTP server stopped; stopping the engine")
        code = await client.shutdown()
        logger.info("engine process exited with code %s", code)
    return 0 if server.started else 1
