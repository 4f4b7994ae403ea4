"""The FastAPI gateway: built by `create_app(settings)`, resources made in the lifespan."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request, Response
from fastapi.responses import JSONResponse

from api import errors, page, routes
from api.metrics import instrument
from api.resources import build
from core.settings import Settings

log = logging.getLogger(__name__)


def create_app(settings: Settings) -> FastAPI:
    """The gateway app for these settings."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        app.state.resources = build(settings)
        try:
            yield
        finally:
            await app.state.resources.redis.aclose()

    app = FastAPI(
        title="diffusion-queue",
        version="1",
        summary="Text-to-image jobs: submit, poll or stream, fetch images.",
        lifespan=lifespan,
    )
    errors.install(app)
    app.include_router(routes.router)
    app.include_router(page.router)
    instrument(app)
    app.middleware("http")(_limit_body(settings.max_body_bytes))
    return app


def _limit_body(
    limit: int,
) -> Callable[[Request, Callable[[Request], Awaitable[Response]]], Awaitable[Response]]:
    """Refuse bodies over `limit` bytes with 413 before reading them."""

    async def middleware(
        request: Request, call_next: Callable[[Request], Awaitable[Response]]
    ) -> Response:
        length = request.headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > limit):
            return JSONResponse(
                errors.body("too_large", f"the body must be at most {limit} bytes"), 413
            )
        return await call_next(request)

    return middleware
