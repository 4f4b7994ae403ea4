"""The one place where errors become HTTP responses."""

from __future__ import annotations

import logging
import math
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from starlette.exceptions import HTTPException

from core.errors import LimitExceeded, ServiceError, Unauthorized, Unavailable, ValidationFailed

log = logging.getLogger(__name__)


def body(code: str, message: str, **extra: object) -> dict[str, object]:
    """The error envelope every failure uses."""
    return {"error": {"code": code, "message": message, **extra}}


class TooLarge(ServiceError):
    """The request (body or headers) is larger than the gateway accepts."""

    status = 413
    code = "too_large"


class Throttled(ServiceError):
    """Too many failed authentications from this peer; it may try again after a while."""

    status = 429
    code = "too_many_failures"

    def __init__(self, message: str, *, retry_after_s: int) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


def response_for(exc: ServiceError) -> JSONResponse:
    """The JSON response for a domain error."""
    headers: dict[str, str] = {}
    extra: dict[str, object] = {}
    if isinstance(exc, Unauthorized):
        headers["WWW-Authenticate"] = "Bearer"
    if isinstance(exc, Unavailable | Throttled):
        headers["Retry-After"] = str(exc.retry_after_s)
    if isinstance(exc, ValidationFailed):
        extra["field"] = exc.field
    if isinstance(exc, LimitExceeded):
        retry = max(1, math.ceil(exc.retry_after_s))
        name = exc.policy.split(";")[0]
        headers["Retry-After"] = str(retry)
        headers["RateLimit-Policy"] = exc.policy
        headers["RateLimit"] = f"{name};r={max(0, math.floor(exc.remaining))};t={retry}"
        extra.update(limit=exc.limit, retry_after_s=round(exc.retry_after_s, 3))
    return JSONResponse(body(exc.code, exc.message, **extra), exc.status, headers=headers)


def internal_error() -> JSONResponse:
    """A 500 that says nothing of its cause (the log has it)."""
    return JSONResponse(body("internal", "internal error; retry, or report it if it persists"), 500)


def where(exc: BaseException) -> str:
    """The innermost frame of an exception, as `file:line in function` (one short log field)."""
    tb = exc.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    if tb is None:
        return "?"
    code = tb.tb_frame.f_code
    return f"{code.co_filename.rsplit('/', 1)[-1]}:{tb.tb_lineno} in {code.co_name}"


def log_internal(method: str, path: str, exc: BaseException) -> None:
    """One bounded line per internal error (never the exception's text: it may hold a prompt)."""
    log.error("internal error on %s %.200s: %s at %s", method, path, type(exc).__name__, where(exc))
    log.debug("internal error on %s %.200s", method, path, exc_info=exc)


def _service_error(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ServiceError)
    return response_for(exc)


def _internal(request: Request, exc: Exception) -> JSONResponse:
    log_internal(request.method, request.url.path, exc)
    return internal_error()


def _field_name(loc: tuple[object, ...]) -> str:
    parts = [str(p) for p in loc if p not in ("body", "query", "path", "header")]
    return ".".join(parts) or "body"


def _said(error: Any) -> str:
    """A validation error's message, without the "Value error, " pydantic puts before ours."""
    return str(error.get("msg", "invalid")).removeprefix("Value error, ")


def _validation_error(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    first = exc.errors()[0]
    name = _field_name(tuple(first.get("loc", ())))
    if first.get("type") == "json_invalid":
        return JSONResponse(body("invalid_json", "the body is not valid JSON", field="body"), 422)
    message = f"{name}: {_said(first)}"
    details = [
        {"field": _field_name(tuple(e.get("loc", ()))), "message": _said(e)} for e in exc.errors()
    ]
    return JSONResponse(body("validation_error", message, field=name, details=details), 422)


REDIS_DOWN = (RedisConnectionError, RedisTimeoutError)


def redis_down() -> JSONResponse:
    """The 503 for a request that needed Redis while it was unreachable."""
    return JSONResponse(
        body("unavailable", "the job store is unavailable; retry shortly"),
        503,
        headers={"Retry-After": "5"},
    )


def _redis_down(_: Request, exc: Exception) -> JSONResponse:
    log.warning("Redis unavailable: %.200s", exc)
    return redis_down()


def _http_error(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, HTTPException)
    code = {404: "not_found", 405: "method_not_allowed", 413: "too_large", 400: "bad_request"}.get(
        exc.status_code, "http_error"
    )
    return JSONResponse(body(code, str(exc.detail)), exc.status_code, headers=exc.headers)


def install(app: FastAPI) -> None:
    """Register every handler on the app."""
    app.add_exception_handler(ServiceError, _service_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(RedisConnectionError, _redis_down)
    app.add_exception_handler(RedisTimeoutError, _redis_down)
    app.add_exception_handler(HTTPException, _http_error)
    # Whatever else escapes a route: a JSON 500 that shows nothing of the exception.
    app.add_exception_handler(Exception, _internal)
