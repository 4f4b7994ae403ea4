"""The gateway's own HTTP traffic: each request counted and timed by its route template, and
with tracing on given a server span.

Counted per gateway process. `python -m api --workers N` makes its processes share the counts
through prometheus_client's multiprocess files, so a scrape of any process reports them all.
The labels are bounded: route templates (or UNMATCHED), a fixed set of methods, status codes.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from core.tracing import Tracing

MULTIPROCESS_DIR = "PROMETHEUS_MULTIPROC_DIR"  # prometheus_client's own variable
HTTP_SECONDS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
METHODS = frozenset({"GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"})
UNTRACED = frozenset({"/healthz", "/readyz", "/metrics"})  # probes and scrapes: no spans
UNMATCHED = "(unmatched)"  # the route label of a path no route serves (keeps the label bounded)


class HttpMetrics:
    """Requests by route, method and status, and their duration."""

    def __init__(self, registry: CollectorRegistry | None) -> None:
        self.requests = Counter(
            "dq_http_requests",
            "HTTP requests answered, by route template, method and status",
            ["route", "method", "status"],
            registry=registry,
        )
        self.seconds = Histogram(
            "dq_http_request_duration_seconds",
            "HTTP request duration, first byte in to last byte out (long polls and event"
            " streams included)",
            ["route", "method"],
            buckets=HTTP_SECONDS,
            registry=registry,
        )
        self._children: dict[tuple[str, str, int], tuple[Any, Any]] = {}

    def observe(self, route: str, method: str, status: int, seconds: float) -> None:
        """Count one request."""
        key = (route, method, status)
        children = self._children.get(key)
        if children is None:
            children = (
                self.requests.labels(route, method, str(status)),
                self.seconds.labels(route, method),
            )
            self._children[key] = children
        children[0].inc()
        children[1].observe(seconds)


class Instruments:
    """ASGI middleware: counts and times every request by its route template, and with tracing
    on makes its server span (continuing a `traceparent` the client sent)."""

    def __init__(self, app: ASGIApp, http: HttpMetrics, tracing: Tracing) -> None:
        self.app, self.http, self.tracing = app, http, tracing

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Serve one request, counted."""
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500  # an exception that escapes becomes a 500 outside this middleware

        async def sent(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        method = scope["method"] if scope["method"] in METHODS else "OTHER"
        try:
            if self.tracing.on and scope["path"] not in UNTRACED:
                await self._traced(scope, receive, sent, method)
            else:
                await self.app(scope, receive, sent)
        finally:
            self.http.observe(_route(scope), method, status, time.perf_counter() - start)

    async def _traced(self, scope: Scope, receive: Receive, send: Send, method: str) -> None:
        headers = {
            k.decode("latin-1"): v.decode("latin-1")
            for k, v in scope["headers"]
            if k in (b"traceparent", b"tracestate")
        }
        with self.tracing.span(method, headers=headers, kind="server"):
            try:
                await self.app(scope, receive, send)
            finally:
                self.tracing.rename(f"{method} {_route(scope)}")


def _route(scope: Scope) -> str:
    """The template of the route that served the request (Starlette leaves it in the scope)."""
    route = scope.get("route")
    return getattr(route, "path", None) or UNMATCHED


def http_registry(registry: CollectorRegistry) -> tuple[HttpMetrics, Any]:
    """The HTTP metrics and what collects them: this process's registry, or every process's
    files when the gateway runs as several processes."""
    if os.environ.get(MULTIPROCESS_DIR):
        from prometheus_client.multiprocess import MultiProcessCollector

        return HttpMetrics(None), MultiProcessCollector(None)  # type: ignore[no-untyped-call]
    return HttpMetrics(registry), registry


@contextmanager
def shared_between_processes(processes: int) -> Iterator[None]:
    """Let `processes` gateway processes started within share their HTTP counts (a fresh folder
    of prometheus_client's multiprocess files, removed after; an operator's own is kept)."""
    if processes < 2 or os.environ.get(MULTIPROCESS_DIR):
        yield
        return
    folder = tempfile.mkdtemp(prefix="dq-gateway-metrics-")
    os.environ[MULTIPROCESS_DIR] = folder  # read by prometheus_client as each child imports it
    try:
        yield
    finally:
        del os.environ[MULTIPROCESS_DIR]
        shutil.rmtree(folder, ignore_errors=True)
