"""The one place where errors become HTTP responses."""

from __future__ import annotations

import logging
import math

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


def _service_error(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ServiceError)
    headers: dict[str, str] = {}
    extra: dict[str, object] = {}
    if isinstance(exc, Unauthorized):
        headers["WWW-Authenticate"] = "Bearer"
    if isinstance(exc, Unavailable):
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


def _field_name(loc: tuple[object, ...]) -> str:
    parts = [str(p) for p in loc if p not in ("body", "query", "path", "header")]
    return ".".join(parts) or "body"


def _validation_error(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    first = exc.errors()[0]
    name = _field_name(tuple(first.get("loc", ())))
    if first.get("type") == "json_invalid":
        return JSONResponse(body("invalid_json", "the body is not valid JSON", field="body"), 422)
    message = f"{name}: {first.get('msg', 'invalid')}"
    details = [
        {"field": _field_name(tuple(e.get("loc", ()))), "message": e.get("msg")}
        for e in exc.errors()
    ]
    return JSONResponse(body("validation_error", message, field=name, details=details), 422)


def _redis_down(_: Request, exc: Exception) -> JSONResponse:
    log.warning("Redis unavailable: %s", exc)
    return JSONResponse(
        body("unavailable", "the job store is unavailable; retry shortly"),
        503,
        headers={"Retry-After": "5"},
    )


def _http_error(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, HTTPException)
    code = {404: "not_found", 405: "method_not_allowed", 413: "too_large"}.get(
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
