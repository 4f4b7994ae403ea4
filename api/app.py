"""The FastAPI gateway: built by `create_app(settings)`, resources made in the lifespan."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from api import admin, catalog, docs, errors, openapi, page, queueview, routes, uploads
from api.metrics import instrument
from api.middleware import Gate
from api.resources import build
from api.sweeps import Sweeps
from core.errors import ConfigError
from core.settings import Settings
from core.tracing import Tracing

log = logging.getLogger(__name__)


def check(settings: Settings) -> None:
    """Refuse settings the gateway must not start with; the ConfigError says what to set."""
    settings.tenants()  # every key well-formed and long enough
    if settings.storage.startswith("file:") and settings.url_secret() is None:
        raise ConfigError(
            "DQ_SECRET_KEY is not set: with local storage every gateway process signs and checks"
            " image URLs with it, so it must be one key, the same everywhere; set it to 32 or more"
            " random characters (`dq up` makes one in its data dir)"
        )


def create_app(settings: Settings) -> FastAPI:
    """The gateway app for these settings."""
    check(settings)
    tracing = Tracing.start("dq-gateway")  # off unless OTEL_* asks for it

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        app.state.resources = res = build(settings, tracing)
        res.watcher.start()
        sweeps = Sweeps(settings, res.storage)
        sweeps.start()
        try:
            yield
        finally:
            await sweeps.stop()
            await res.watcher.stop()
            await res.redis.aclose()
            tracing.shutdown()

    app = FastAPI(
        title="diffusion-queue",
        version="1",
        summary="Text-to-image jobs: submit, poll or stream, fetch images.",
        lifespan=lifespan,
        # The gateway's metrics are Prometheus' (/metrics). FastAPI's OpenTelemetry hooks, on by
        # default, look for configured providers on every request: 2 % of a submit's work.
        telemetry={"tracing": False, "metrics": False, "logs": False},
        docs_url=None,  # FastAPI's pages load their scripts from a CDN: see api/docs.py
        redoc_url=None,
    )
    errors.install(app)
    app.include_router(routes.router)
    app.include_router(queueview.router)
    app.include_router(catalog.router)
    app.include_router(uploads.router)
    app.include_router(admin.router)
    app.include_router(page.router)
    docs.install(app)
    openapi.install(app)
    app.add_middleware(Gate, settings=settings)
    instrument(app, settings, tracing)  # outermost: requests the gate refuses are counted too
    return app
