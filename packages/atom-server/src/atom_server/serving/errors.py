"""OpenAI error objects: {"error": {"message", "type", "param", "code"}} with the right HTTP status.

A 5xx body says what kind of failure it was and the request id, nothing more; the details (exception text,
engine state) go to the server log under the same request id.
"""

from __future__ import annotations

import contextvars
import json
import logging
import re

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

logger = logging.getLogger("atom_server.api")

# Set per HTTP request by RequestContextMiddleware (api_server); the X-Request-Id of the response.
current_request_id: contextvars.ContextVar[str | None] = contextvars.ContextVar("atom_request_id", default=None)

_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
          405: "invalid_request_error", 413: "invalid_request_error", 422: "invalid_request_error",
          500: "server_error", 503: "service_unavailable_error"}


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type: str | None = None, detail: str | None = None):
        """message: what the client reads (keep it generic for 5xx); detail: what only the log gets."""
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.type = type or _TYPES.get(status, "invalid_request_error" if status < 500 else "server_error")
        self.detail = detail

    def body(self) -> dict:
        message = self.message
        if self.status >= 500:
            rid = current_request_id.get()
            if rid is not None:
                message = f"{message} (request id {rid})"
        return {"error": {"message": message, "type": self.type, "param": self.param, "code": self.code}}

    def log(self) -> None:
        if self.status >= 500:
            logger.error("request %s answered %d: %s%s", current_request_id.get(), self.status, self.message,
                         f" ({self.detail})" if self.detail else "")

    def response(self, headers: dict | None = None) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=headers)

    def sse(self) -> str:
        return f"data: {json.dumps(self.body())}\n\n"


def internal_error(exc: BaseException) -> APIError:
    return APIError(500, "internal server error", code="internal_error", detail=f"{type(exc).__name__}: {exc}")


def bad_request(message: str, param: str | None = None, code: str = "invalid_value") -> APIError:
    return APIError(400, message, param=param, code=code)


def from_value_error(e: ValueError, fields: tuple[str, ...]) -> APIError:
    """A ValueError from SamplingParams names the field first: report it as the param."""
    msg = str(e)
    m = re.match(r"(\w+)\b", msg)
    param = m.group(1) if m and m.group(1) in fields else None
    return bad_request(msg, param=param)


def _validation_error(exc: RequestValidationError) -> APIError:
    errors = exc.errors()
    if not errors:
        return bad_request("invalid request")
    first = errors[0]
    kind = first.get("type", "")
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    param = ".".join(loc) or None
    if kind == "json_invalid":
        return bad_request(f"request body is not valid JSON: {first.get('ctx', {}).get('error', '')}".rstrip(": "),
                           code="invalid_json")
    if kind == "missing":
        return bad_request(f"missing required field {param!r}", param=param, code="missing_field")
    if kind.endswith("_type") or kind.endswith("_parsing") or kind in ("model_attributes_type", "union_tag_invalid"):
        return bad_request(f"{param or 'body'}: {first.get('msg')}", param=param, code="invalid_type")
    return bad_request(f"{param or 'body'}: {first.get('msg')}", param=param, code="invalid_value")


def install_error_handlers(app: FastAPI, on_error=None) -> None:
    """Every error leaves as an OpenAI error object; on_error(status) counts it."""

    def respond(err: APIError) -> JSONResponse:
        if on_error is not None:
            on_error(err.status)
        err.log()
        return err.response()

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError):
        return respond(exc)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        return respond(_validation_error(exc))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        return respond(APIError(exc.status_code, str(exc.detail), code=code))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception):
        logger.error("request %s failed", current_request_id.get(), exc_info=exc)
        return respond(internal_error(exc))
