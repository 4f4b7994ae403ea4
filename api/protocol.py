"""The gateway's HTTP/1.1 connections: uvicorn's httptools protocol with limits it lacks.

uvicorn closes an idle keep-alive connection after a while, and nothing else: a connection that
never sends a byte, or sends its headers a byte a second, or a body that never ends, stays open
for good, and headers may be of any size. Here every connection must finish its request's headers
within `header_timeout_s` of connecting (or of starting the request, on a kept-alive one) and its
body within `body_timeout_s` of the headers; headers are bounded in bytes and in number (431);
and a process holds at most `max_connections`. uvicorn's `limit_concurrency` counts the slow
sockets too, and then answers every new request 503: here a new connection over the limit closes
the connection that has waited longest without a request in progress (slow and idle ones), so
real requests are still answered under a flood of sockets that send nothing.

Deadlines are checked by one sweep a second per process, so a request costs two clock reads.
"""

from __future__ import annotations

import asyncio
import json
import math
import time
from dataclasses import dataclass
from typing import Any

import httptools
from uvicorn.config import Config
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol
from uvicorn.server import ServerState

from api.errors import body
from api.middleware import NO_CONTENT_POLICY, NO_STORE, SECURITY_HEADERS
from core.settings import Settings

SWEEP_S = 1.0
NEVER = math.inf


@dataclass(frozen=True)
class Limits:
    """What one connection may take, and how many a process holds."""

    max_header_bytes: int
    max_headers: int
    header_timeout_s: float
    body_timeout_s: float
    max_connections: int

    @classmethod
    def of(cls, settings: Settings) -> Limits:
        """The limits the settings name."""
        return cls(
            max_header_bytes=settings.max_header_bytes,
            max_headers=settings.max_headers,
            header_timeout_s=settings.header_timeout_s,
            body_timeout_s=settings.body_timeout_s,
            max_connections=settings.max_connections,
        )


class Refused(Exception):
    """Raised in a parser callback to stop parsing a request that is refused."""


class Connections:
    """One server process's connections: their count, deadlines, and who waits without a request.

    Owned by the event loop's thread (every call comes from a protocol callback or the sweep).
    """

    def __init__(self, limits: Limits) -> None:
        self.limits = limits
        self.open: set[GatewayProtocol] = set()
        # Connections with no request in progress, in the order they started waiting: the oldest
        # is the first to go when a new connection needs room.
        self.waiting: dict[GatewayProtocol, None] = {}
        self._sweeper: asyncio.TimerHandle | None = None

    def __getstate__(self) -> dict[str, Any]:
        """Only the limits cross to another process (uvicorn pickles its config for workers)."""
        return {"limits": self.limits}

    def __setstate__(self, state: dict[str, Any]) -> None:
        """A fresh, empty registry in the new process."""
        self.__init__(state["limits"])  # type: ignore[misc]

    def admit(self, conn: GatewayProtocol) -> bool:
        """Count a new connection, making room if needed; False: no room, refuse it."""
        if len(self.open) >= self.limits.max_connections:
            if not self.waiting:
                return False
            oldest = next(iter(self.waiting))
            self.forget(oldest)
            oldest.transport.abort()
        self.open.add(conn)
        self.waiting[conn] = None
        if self._sweeper is None:
            self._sweeper = conn.loop.call_later(SWEEP_S, self._sweep, conn.loop)
        return True

    def forget(self, conn: GatewayProtocol) -> None:
        """The connection is gone."""
        self.open.discard(conn)
        self.waiting.pop(conn, None)

    def _sweep(self, loop: asyncio.AbstractEventLoop) -> None:
        """Close every connection past its deadline; run again while any is open."""
        now = time.monotonic()
        for conn in [c for c in self.open if c.deadline < now]:
            self.forget(conn)
            conn.transport.abort()
        self._sweeper = loop.call_later(SWEEP_S, self._sweep, loop) if self.open else None


class GatewayProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with header limits, request deadlines and a connection cap."""

    def __init__(
        self,
        config: Config,
        server_state: ServerState,
        app_state: dict[str, Any],
        _loop: asyncio.AbstractEventLoop | None = None,
        *,
        connections: Connections,
    ) -> None:
        super().__init__(config, server_state, app_state, _loop)
        self.registry = connections
        self.limits = connections.limits
        self.deadline = NEVER  # when this connection is closed unless its request moves on
        self.in_headers = True  # the next bytes belong to a request's headers
        self.header_bytes = 0  # raw bytes received while in the headers
        self.header_size = 0  # the request line's URL and every header name and value
        self.header_count = 0
        self.refusal: tuple[int, str] | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        """Count the connection (or refuse it) and start the clock on its first request."""
        super().connection_made(transport)
        if not self.registry.admit(self):
            self.refuse(503, "unavailable", "the server is at its connection limit; retry")
            return
        self.deadline = time.monotonic() + self.limits.header_timeout_s

    def connection_lost(self, exc: Exception | None) -> None:
        """Forget the connection."""
        self.registry.forget(self)
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        """Parse, refusing headers over the limits as soon as they are."""
        if self.in_headers:
            self.header_bytes += len(data)
        self._unset_keepalive_if_required()
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            if self._should_upgrade():
                self.handle_websocket_upgrade()
            else:
                self._unsupported_upgrade_warning()
            return
        except httptools.HttpParserError:
            status, message = self.refusal or (400, "the request is not valid HTTP/1.1")
            code = "too_large" if status == 431 else "bad_request"
            self.refuse(status, code, message)
            return
        if self.in_headers and self.header_bytes > self.limits.max_header_bytes:
            self.refuse(431, "too_large", self._too_large())

    def send_400_response(self, msg: str) -> None:
        """A malformed request: the JSON error, as everywhere else."""
        self.refuse(400, "bad_request", msg)

    def refuse(self, status: int, code: str, message: str) -> None:
        """Answer with a JSON error and close the connection."""
        if self.transport.is_closing():
            return
        content = json.dumps(body(code, message)).encode()
        headers = [
            *self.server_state.default_headers,
            (b"content-type", b"application/json"),
            (b"content-length", str(len(content)).encode()),
            (b"connection", b"close"),
            *SECURITY_HEADERS,
            NO_CONTENT_POLICY,
            NO_STORE,
        ]
        lines = [STATUS_LINE[status], *(b"%s: %s\r\n" % pair for pair in headers), b"\r\n"]
        self.transport.write(b"".join(lines) + content)
        self.transport.close()

    def _too_large(self) -> str:
        limits = self.limits
        return f"headers must be at most {limits.max_header_bytes} bytes and {limits.max_headers}"

    def _refuse_in_parser(self) -> None:
        self.refusal = (431, self._too_large())
        raise Refused

    # Parser callbacks (httptools calls them from `feed_data`).
    def on_message_begin(self) -> None:
        """A request starts: its headers are counted from here."""
        super().on_message_begin()
        self.header_size = self.header_count = 0
        if self.deadline is NEVER:  # a kept-alive connection: its clock starts with the request
            self.deadline = time.monotonic() + self.limits.header_timeout_s

    def on_url(self, url: bytes) -> None:
        """Count the URL with the headers."""
        self.header_size += len(url)
        if self.header_size > self.limits.max_header_bytes:
            self._refuse_in_parser()
        super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        """Count each header, in number and in bytes."""
        self.header_count += 1
        self.header_size += len(name) + len(value)
        if (
            self.header_count > self.limits.max_headers
            or self.header_size > self.limits.max_header_bytes
        ):
            self._refuse_in_parser()
        super().on_header(name, value)

    def on_headers_complete(self) -> None:
        """The headers are in: a request is in progress, and the body has its own deadline."""
        # Only now does the connection stop waiting: one that trickles its headers is as good
        # as idle, and goes first when room is needed.
        self.registry.waiting.pop(self, None)
        self.in_headers = False
        self.deadline = time.monotonic() + self.limits.body_timeout_s
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        """The request is in; the app takes as long as it takes (a long poll, a stream)."""
        super().on_message_complete()
        self.in_headers, self.header_bytes, self.deadline = True, 0, NEVER

    def on_response_complete(self) -> None:
        """Between requests: the connection waits again (and may make room for a new one)."""
        super().on_response_complete()
        if not self.transport.is_closing():
            self.registry.waiting[self] = None
