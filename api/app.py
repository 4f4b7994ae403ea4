"""The FastAPI gateway: built by `create_app(settings)`, resources made in the lifespan."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from api import errors, page, routes
from api.metrics import instrument
from api.resources import build
from core.settings import Settings

log = logging.getLogger(__name__)


def create_app(settings: Settings) -> FastAPI:
    """The gateway app for these settings."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        app.state.resources = res = build(settings)
        res.watcher.start()
        try:
            yield
        finally:
            await res.watcher.stop()
            await res.redis.aclose()

    app = FastAPI(
        title="diffusion-queue",
        version="1",
        summary="Text-to-image jobs: submit, poll or stream, fetch images.",
        lifespan=lifespan,
        # The gateway's metrics are Prometheus' (/metrics). FastAPI's OpenTelemetry hooks, on by
        # default, look for configured providers on every request: 2 % of a submit's work.
        telemetry={"tracing": False, "metrics": False, "logs": False},
    )
    errors.install(app)
    app.include_router(routes.router)
    app.include_router(page.router)
    instrument(app)
    app.add_middleware(BodyLimit, limit=settings.max_body_bytes)
    return app


class BodyLimit:
    """Refuse bodies over `limit` bytes with 413 before reading them (plain ASGI: no extra task)."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Check Content-Length, then pass the request on."""
        if scope["type"] == "http":
            length = dict(scope["headers"]).get(b"content-length")
            if length is not None and (not length.isdigit() or int(length) > self.limit):
                message = f"the body must be at most {self.limit} bytes"
                response = JSONResponse(errors.body("too_large", message), 413)
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)
