"""The OpenAPI reference at /docs, served with its assets: it works with no network at all.

FastAPI's own /docs loads Swagger UI from a CDN, so an offline server shows a blank page; the
assets here come from the `fastapi-offline` package (Swagger UI's files, nothing else of it used).
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from fastapi import FastAPI
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles

from api.page import content_policy

ASSETS = "/docs/assets"


def assets_dir() -> Path:
    """Swagger UI's files, as installed."""
    return Path(str(resources.files("fastapi_offline").joinpath("static")))


def install(app: FastAPI) -> None:
    """Serve /docs and its assets (the app must be made with docs_url=None, redoc_url=None)."""
    page = bytes(
        get_swagger_ui_html(
            openapi_url=app.openapi_url or "/openapi.json",
            title=f"{app.title} - API reference",
            swagger_js_url=f"{ASSETS}/swagger-ui-bundle.js",
            swagger_css_url=f"{ASSETS}/swagger-ui.css",
            swagger_favicon_url=f"{ASSETS}/favicon.png",
        ).body
    ).decode()
    # Swagger UI sets style attributes as it renders; its icons are data: URLs.
    policy = content_policy(page, images="'self' data:", inline_styles=True)

    @app.get("/docs", include_in_schema=False)
    async def docs() -> HTMLResponse:
        return HTMLResponse(page, headers={"Content-Security-Policy": policy})

    app.mount(ASSETS, StaticFiles(directory=assets_dir()), name="docs-assets")
