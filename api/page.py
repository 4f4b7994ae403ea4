"""The small web page: a prompt box, live progress, a gallery."""

from __future__ import annotations

from importlib import resources

from fastapi import APIRouter
from fastapi.responses import HTMLResponse

router = APIRouter()


@router.get("/", include_in_schema=False)
async def index() -> HTMLResponse:
    """The page (static; it talks to the same JSON API)."""
    return HTMLResponse(resources.files("api").joinpath("index.html").read_text())
