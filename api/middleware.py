"""What every request passes before a route: authentication, the body limit, security headers.

Plain ASGI, not BaseHTTPMiddleware (which costs a task per request on a path that serves
thousands of submits a second). FastAPI reads and parses a body before it solves dependencies,
so the key is checked here, from the `Authorization` header alone, before a byte of the body is
read; the caller is left in the scope for `api.deps.CallerDep`.
"""

from __future__ import annotations

import logging

from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api import errors
from api.deps import CALLER, authenticate
from api.errors import Throttled, TooLarge
from api.lockout import Lockout
from api.reads import ReadLimiter
from core.errors import ServiceError, Unauthorized
from core.settings import Settings

log = logging.getLogger(__name__)

GUARDED = "/v1/"  # every route under it needs a key, except the signed file and upload URLs
UNGUARDED = "/v1/files/"
UPLOADS = "/v1/uploads/"  # PUT there is a signed upload URL: no key, its own body limit

# Sent on every response. Pages set their own Content-Security-Policy (see api/page.py).
SECURITY_HEADERS = [
    (b"x-content-type-options", b"nosniff"),
    (b"x-frame-options", b"DENY"),
    (b"referrer-policy", b"no-referrer"),
]
NO_CONTENT_POLICY = (b"content-security-policy", b"default-src 'none'; frame-ancestors 'none'")
NO_STORE = (b"cache-control", b"no-store")


class BodyTooLarge(HTTPException):
    """Raised from `receive` once the body passes the limit (FastAPI lets HTTPException through)."""

    def __init__(self, limit: int) -> None:
        super().__init__(413, f"the body must be at most {limit} bytes")
        self.limit = limit


class Gate:
    """Authenticate guarded routes before the body, bound the body, add security headers."""

    def __init__(self, app: ASGIApp, settings: Settings) -> None:
        self.app = app
        self.limit = settings.max_body_bytes
        self.upload_limit = settings.input_max_bytes
        self.lockout = Lockout(settings.auth_failures, settings.auth_failure_window_s)
        self.reads = ReadLimiter()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Serve one request through the checks."""
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        reply = Reply(send)
        try:
            refusal = await self._refusal(scope)
            if refusal is not None:
                await errors.response_for(refusal)(scope, receive, reply.send)
                return
            limit = self.upload_limit if _signed_upload(scope) else self.limit
            await self.app(scope, Body(receive, limit).receive, reply.send)
        except BodyTooLarge as e:
            if reply.started:
                raise
            await errors.response_for(TooLarge(str(e.detail)))(scope, receive, reply.send)
        except errors.REDIS_DOWN as e:  # while authenticating or limiting, before any route
            if reply.started:
                raise
            log.warning("Redis unavailable: %.200s", e)
            await errors.redis_down()(scope, receive, reply.send)
        except Exception as e:
            if reply.started:
                raise
            errors.log_internal(scope.get("method", "?"), scope.get("path", ""), e)
            await errors.internal_error()(scope, receive, reply.send)

    async def _refusal(self, scope: Scope) -> ServiceError | None:
        """Why this request is refused before its body, if it is."""
        authorization, length = None, None
        for name, value in scope["headers"]:
            if name == b"authorization":
                authorization = value.decode("latin-1")
            elif name == b"content-length":
                length = value
        path: str = scope["path"]
        upload = _signed_upload(scope)
        if path.startswith(GUARDED) and not path.startswith(UNGUARDED) and not upload:
            refusal = await self._authenticate(scope, authorization)
            if refusal is not None:
                return refusal
        limit = self.upload_limit if upload else self.limit
        if length is not None and (not length.isdigit() or int(length) > limit):
            return TooLarge(f"the body must be at most {limit} bytes")
        return None

    async def _authenticate(self, scope: Scope, authorization: str | None) -> ServiceError | None:
        """Leave the caller in the scope, or say why there is none."""
        client = scope.get("client")
        peer = client[0] if client else ""
        wait_s = self.lockout.retry_after(peer)
        if wait_s:
            message = f"too many failed authentications from {peer}; retry in {wait_s} s"
            return Throttled(message, retry_after_s=wait_s)
        caller = await authenticate(scope["app"].state.resources, authorization)
        if caller is None:
            self.lockout.fail(peer)
            return Unauthorized("send a valid key as 'Authorization: Bearer <key>'")
        scope.setdefault("state", {})[CALLER] = caller
        if scope.get("method") in ("GET", "HEAD"):
            return await self.reads.refusal(caller)
        return None


def _signed_upload(scope: Scope) -> bool:
    return scope.get("method") == "PUT" and str(scope["path"]).startswith(UPLOADS)


class Body:
    """A `receive` that counts the body's bytes as they stream in, chunked or not."""

    __slots__ = ("limit", "received", "upstream")

    def __init__(self, upstream: Receive, limit: int) -> None:
        self.upstream, self.limit, self.received = upstream, limit, 0

    async def receive(self) -> Message:
        """The next message; BodyTooLarge as soon as the body passes the limit."""
        message = await self.upstream()
        if message["type"] == "http.request":
            self.received += len(message.get("body", b""))
            if self.received > self.limit:
                raise BodyTooLarge(self.limit)
        return message


class Reply:
    """A `send` that adds the security headers and remembers whether the response started."""

    __slots__ = ("started", "upstream")

    def __init__(self, upstream: Send) -> None:
        self.upstream, self.started = upstream, False

    async def send(self, message: Message) -> None:
        """Pass a message on; the response's start gains the headers it lacks."""
        if message["type"] == "http.response.start":
            self.started = True
            message = {**message, "headers": secured(message.get("headers", []))}
        await self.upstream(message)


def secured(headers: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    """`headers` with the security headers added (a page's own policy is kept)."""
    policy, cache, json = False, False, False
    for name, value in headers:
        if name == b"content-security-policy":
            policy = True
        elif name == b"cache-control":
            cache = True
        elif name == b"content-type":
            json = value.startswith(b"application/json")
    extra = SECURITY_HEADERS if policy else [*SECURITY_HEADERS, NO_CONTENT_POLICY]
    if json and not cache:
        extra = [*extra, NO_STORE]
    return [*headers, *extra]
