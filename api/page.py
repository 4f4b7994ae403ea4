"""The small web page (a prompt box, live progress, a gallery), and the policy HTML runs under."""

from __future__ import annotations

import base64
import hashlib
import re
from functools import cache
from importlib import resources

from fastapi import APIRouter
from fastapi.responses import HTMLResponse

router = APIRouter()

INLINE = re.compile(r"<(script|style)>(.*?)</\1>", re.DOTALL)


def content_policy(html: str, *, images: str = "'self'", inline_styles: bool = False) -> str:
    """A Content-Security-Policy that runs exactly the page's own inline scripts and styles.

    Each inline block is allowed by its hash, so an injected script never runs; the page may talk
    to this gateway only, and be framed by no one. `inline_styles` allows any inline style (a
    policy that lists hashes ignores 'unsafe-inline', so then no style hash is listed).
    """
    hashes: dict[str, list[str]] = {"script": [], "style": []}
    styles = ["'unsafe-inline'"] if inline_styles else hashes["style"]
    for kind, text in INLINE.findall(html):
        digest = base64.b64encode(hashlib.sha256(text.encode()).digest()).decode()
        hashes[kind].append(f"'sha256-{digest}'")
    return "; ".join(
        [
            "default-src 'none'",
            " ".join(["script-src 'self'", *hashes["script"]]),
            " ".join(["style-src 'self'", *styles]),
            f"img-src {images}",
            "connect-src 'self'",
            "base-uri 'none'",
            "form-action 'self'",
            "frame-ancestors 'none'",
        ]
    )


@cache
def _index() -> tuple[str, str]:
    html = resources.files("api").joinpath("index.html").read_text()
    # Images come from this gateway (local files) or from S3 presigned URLs, on any host.
    return html, content_policy(html, images="'self' https: http: data: blob:")


@router.get("/", include_in_schema=False)
async def index() -> HTMLResponse:
    """The page (static; it talks to the same JSON API)."""
    html, policy = _index()
    return HTMLResponse(html, headers={"Content-Security-Policy": policy})
