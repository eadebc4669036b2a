"""OpenAI-compatible HTTP server (FastAPI + uvicorn) in front of the engine-core process."""

from __future__ import annotations

import asyncio
import hmac
import logging
import re
import socket
import time
import uuid

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import Response

from atom_server.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    ResponsesRequest,
    TokenizeChatRequest,
    TokenizeCompletionRequest,
)
from atom_server.serving.chat import create_chat_completion
from atom_server.serving.responses import create_response
from atom_server.serving.completions import create_completion
from atom_server.serving.chat_templates import ChatTemplateRenderer
from atom_server.serving.context import ServerState, ServingContext, engine_error
from atom_server.serving.engine_client import EngineClient, EngineDeadError, EngineShutdownError
from atom_server.serving.errors import APIError, bad_request, current_request_id, install_error_handlers
from atom_server.serving.harmony import check_parsers, harmony_stop_ids
from atom_server.serving.listen import bind_port
from atom_server.serving.metrics import Metrics
from atom_server.serving.server_args import ServerLimits

logger = logging.getLogger("atom_server.api")

OPEN_PATHS = frozenset({"/health", "/ping", "/version", "/metrics"})  # exact paths, no prefixes
_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("atom-server")
    except PackageNotFoundError:
        return "0.1.0+local"


class ApiKeyMiddleware:
    """Bearer-token check as plain ASGI middleware (BaseHTTPMiddleware would hide client disconnects
    from streaming endpoints). The scheme is case-insensitive (RFC 7235); open paths match exactly."""

    def __init__(self, app, api_key: str, on_reject=None):
        self.app = app
        self.expected = api_key.encode()
        self.on_reject = on_reject

    def _authorized(self, headers) -> bool:
        given = dict(headers or []).get(b"authorization", b"")
        scheme, _, token = given.strip().partition(b" ")
        return scheme.lower() == b"bearer" and hmac.compare_digest(token.strip(), self.expected)

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["path"] not in OPEN_PATHS and not self._authorized(scope.get("headers")):
            if self.on_reject is not None:
                self.on_reject(401)
            err = APIError(401, "invalid or missing API key (send 'Authorization: Bearer <key>')",
                           code="invalid_api_key")
            await err.response()(scope, receive, send)
            return
        await self.app(scope, receive, send)


class RequestContextMiddleware:
    """Per request: an id (the client's X-Request-Id when sane, else a new one) for the response header, 5xx
    bodies and log lines; and the body size limit (413), also for chunked bodies without a Content-Length."""

    def __init__(self, app, max_body_bytes: int, on_reject=None):
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.on_reject = on_reject

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        given = headers.get(b"x-request-id", b"").decode("latin-1")
        rid = given if _REQUEST_ID.fullmatch(given) else uuid.uuid4().hex
        token = current_request_id.set(rid)

        async def send_with_id(message):
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), (b"x-request-id", rid.encode())]}
            await send(message)

        try:
            length = headers.get(b"content-length")
            too_big = length is not None and (not length.isdigit() or int(length) > self.max_body_bytes)
            if not too_big and length is None and scope.get("method") in ("POST", "PUT", "PATCH"):
                receive, too_big = await self._buffer_body(receive)
            if too_big:
                if self.on_reject is not None:
                    self.on_reject(413)
                err = APIError(413, f"the request body is larger than {self.max_body_bytes} bytes "
                               "(--max-request-body-bytes)", code="request_too_large")
                await err.response()(scope, receive, send_with_id)
                return
            await self.app(scope, receive, send_with_id)
        finally:
            current_request_id.reset(token)

    async def _buffer_body(self, receive):
        """Read a body of unknown length up to the limit; returns (a receive that replays it, too big)."""
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return _replay([message], receive), False
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body_bytes:
                return receive, True
            chunks.append(chunk)
            if not message.get("more_body", False):
                return _replay([{"type": "http.request", "body": b"".join(chunks), "more_body": False}],
                               receive), False


def _replay(messages: list, receive):
    pending = list(messages)

    async def replay():
        if pending:
            return pending.pop(0)
        return await receive()

    return replay


def build_app(state: ServerState) -> FastAPI:
    app = FastAPI(title="ATOM OpenAI-compatible server", version=_version())
    ctx = ServingContext(state)
    app.state.atom = ctx
    install_error_handlers(app, on_error=state.metrics.count_error)
    if state.api_key:
        app.add_middleware(ApiKeyMiddleware, api_key=state.api_key, on_reject=state.metrics.count_error)
    app.add_middleware(RequestContextMiddleware, max_body_bytes=state.limits.max_request_body_bytes,
                       on_reject=state.metrics.count_error)

    @app.get("/health")
    async def health():
        if state.shutting_down:
            return engine_error(EngineShutdownError("draining")).response()
        if state.client.dead:
            return engine_error(EngineDeadError(state.client.dead_reason or state.client.state.value)).response()
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
                "engine_state": state.client.state.value, "dead_reason": state.client.dead_reason,
                "active_requests": state.client.num_active_requests, "stats": state.client.stats}

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
            text = await ctx.chat_prompt(req.messages, req.add_generation_prompt, req.continue_final_message,
                                         req.chat_template, req.chat_template_kwargs)
            param = "messages"
        else:
            text, param = req.prompt, "prompt"
        ids = await ctx.encode(text, req.add_special_tokens, param)
        strs = await ctx.preprocess.run(ctx.tokenizer.convert_ids_to_tokens, ids) if req.return_token_strs else None
        return {"count": len(ids), "max_model_len": ctx.info.max_model_len, "tokens": ids, "token_strs": strs}

    @app.post("/detokenize")
    async def detokenize(req: DetokenizeRequest):
        ctx.check_model(req.model)
        limit = ctx.vocab_limit
        for t in req.tokens:
            if not 0 <= t < limit:
                raise bad_request(f"token id {t} is out of range [0, {limit})", param="tokens")
        return {"prompt": await ctx.decode(req.tokens)}

    if state.client.info is not None and state.client.info.profiling:
        @app.post("/start_profile")
        async def start_profile():
            return await _profile(True)

        @app.post("/stop_profile")
        async def stop_profile():
            return await _profile(False)

    async def _profile(start: bool):
        ctx.check_engine()
        try:
            done = await state.client.profile(start)
        except Exception as e:
            raise engine_error(e) from e
        if done.error is not None:
            raise bad_request(done.error)
        return Response(status_code=200) if start else {"trace_path": done.trace_path}

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest, raw: Request):
        return await create_completion(ctx, req, raw)

    @app.post("/v1/chat/completions")
    async def chat_completions(req: ChatCompletionRequest, raw: Request):
        return await create_chat_completion(ctx, req, raw)

    @app.post("/v1/responses")
    async def responses(req: ResponsesRequest, raw: Request):
        return await create_response(ctx, req, raw)

    @app.api_route("/v1/responses/{response_id}", methods=["GET", "DELETE"])
    @app.post("/v1/responses/{response_id}/cancel")
    async def stored_response(response_id: str):
        raise APIError(404, f"response {response_id!r} not found: atom-server does not store responses",
                       code="not_found")

    return app


class _DrainingServer(uvicorn.Server):
    """uvicorn, with our drain between 'stop accepting connections' and uvicorn's own shutdown: requests in
    flight get shutdown_timeout seconds, then end with an error (streams: an error event and [DONE])."""

    def __init__(self, config: uvicorn.Config, drain):
        super().__init__(config)
        self._drain = drain

    async def shutdown(self, sockets=None) -> None:
        for server in self.servers:
            server.close()
        await self._drain()
        await super().shutdown(sockets)


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


async def _supervise(client: EngineClient, state: ServerState, server: uvicorn.Server) -> None:
    """On engine death: exit with status 1 (default, as vLLM: a supervisor restarts the server) or start a new
    engine process (--engine-restart always), retrying with a growing pause."""
    backoff = 1.0
    while True:
        await client.died.wait()
        if state.limits.engine_restart != "always":
            logger.error("engine died (%s); the server exits with status 1 (--engine-restart never)",
                         client.dead_reason)
            state.exit_code = 1
            server.should_exit = True
            return
        logger.error("engine died (%s); starting a new engine process (--engine-restart always)", client.dead_reason)
        try:
            await client.restart()
            logger.info("engine restarted (pid %s)", client.engine_pid)
            backoff = 1.0
        except Exception as e:
            logger.error("engine restart failed: %s; retrying in %.0f s", e, backoff)
            await asyncio.sleep(backoff)
            backoff = min(2 * backoff, 30.0)
            client.died.set()


async def serve(engine_args, host: str = "0.0.0.0", port: int = 8000, api_key: str | None = None,
                uvicorn_log_level: str = "info", sock: socket.socket | None = None,
                limits: ServerLimits | None = None) -> int:
    """Take the port, start the engine process, then serve HTTP until SIGTERM/SIGINT (drain, stop the engine:
    0) or until the engine dies without a restart policy (1)."""
    from atom_server.generation_defaults import load_generation_defaults
    from atom_server.tokenizer import load_tokenizer

    started = time.perf_counter()
    limits = limits or ServerLimits()
    sock = sock or bind_port(host, port)
    names = engine_args.served_model_names()
    defaults = load_generation_defaults(engine_args.model, engine_args.generation_config)
    logger.info("%s", defaults.describe())
    logger.info("starting the engine for %s", engine_args.model)
    metrics = Metrics(model_name=names[0] if names else "")
    client = EngineClient(engine_args, metrics)
    templates = ChatTemplateRenderer(timeout_s=limits.chat_template_timeout)
    loop = asyncio.get_running_loop()
    tokenizer_f = loop.run_in_executor(None, load_tokenizer, engine_args.model, engine_args.tokenizer,
                                       engine_args.trust_remote_code)
    # If the engine fails first, its error is the one to report: the tokenizer's is then only consumed.
    tokenizer_f.add_done_callback(lambda f: f.cancelled() or f.exception())
    try:
        info, _ = await asyncio.gather(client.start(), templates.start())
        tokenizer = await tokenizer_f
    except BaseException:
        sock.close()
        await client.shutdown(timeout_s=5)
        await templates.close()
        raise
    client.attach_tokenizer(tokenizer)
    try:
        harmony = check_parsers(info.model_type, limits.reasoning_parser, limits.tool_call_parser)
    except ValueError:
        sock.close()
        await client.shutdown(timeout_s=5)
        await templates.close()
        raise
    logger.info("model %s (served as %s), dtype %s, kernel backend %s, KV cache capacity %d tokens, "
                "max_model_len %d", info.model_path, ", ".join(repr(n) for n in names), info.dtype,
                info.kernel_backend, info.kv_capacity_tokens, info.max_model_len)
    logger.info("on engine death: %s; shutdown drain up to %g s (--shutdown-timeout)",
                "start a new engine (--engine-restart always)" if limits.engine_restart == "always"
                else "exit with status 1 (--engine-restart never)", limits.shutdown_timeout)
    state = ServerState(client=client, tokenizer=tokenizer, metrics=metrics, api_key=api_key,
                        generation_defaults=defaults, served_model_names=names, limits=limits, templates=templates,
                        harmony=harmony, harmony_stop_ids=harmony_stop_ids(tokenizer) if harmony else [])

    async def drain() -> None:
        state.shutting_down = True
        if client.num_active_requests:
            logger.info("draining %d request(s) in flight (up to %g s)", client.num_active_requests,
                        limits.shutdown_timeout)
        await client.drain(limits.shutdown_timeout)

    app = build_app(state)
    server = _DrainingServer(uvicorn.Config(app, host=host, port=port, log_level=uvicorn_log_level,
                                            timeout_graceful_shutdown=5), drain)
    logger.info("start-up: ready in %.1f s; OpenAI-compatible API at http://%s:%d/v1 (listening on %s)",
                time.perf_counter() - started, _url_host(host), port,
                "all interfaces" if host in ("0.0.0.0", "::", "") else host)
    supervisor = asyncio.create_task(_supervise(client, state, server))
    try:
        await server.serve(sockets=[sock])
    finally:
        supervisor.cancel()
        logger.info("HTTP server stopped; stopping the engine")
        code = await client.shutdown()
        await templates.close()
        if state.request_templates is not None:
            await state.request_templates.close()
        state.preprocess.close()
        logger.info("engine process exited with code %s", code)
    if state.exit_code:
        return state.exit_code
    return 0 if server.started else 1
