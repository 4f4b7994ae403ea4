"""The web page (create, gallery, job, operator views), and the policy HTML runs under.

The page is plain files in the package (api/index.html, api/static/*): no build step, no CDN, so
it works on a server with no way out. Its scripts are files of this gateway, never inline, and
its Content-Security-Policy lets it load and call nothing but this gateway and the image store.
"""

from __future__ import annotations

import base64
import hashlib
import re
from functools import cache
from importlib import resources
from urllib.parse import urlsplit

from fastapi import APIRouter
from fastapi.responses import HTMLResponse, Response

from api.deps import ResourcesDep
from api.resources import Resources
from core.errors import NotFound

router = APIRouter()

INLINE = re.compile(r"<(script|style)>(.*?)</\1>", re.DOTALL)
STATIC = "/page/"  # where the page's own files are served
TYPES = {
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".svg": "image/svg+xml",
}


def content_policy(
    html: str, *, images: str = "'self'", inline_styles: bool = False, connect: str = "'self'"
) -> str:
    """A Content-Security-Policy that runs exactly the page's own inline scripts and styles.

    Each inline block is allowed by its hash, so an injected script never runs; the page may talk
    to `connect` only (this gateway, by default), and be framed by no one. `inline_styles` allows
    any inline style (a policy that lists hashes ignores 'unsafe-inline', so then no style hash
    is listed).
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
            f"connect-src {connect}",
            "base-uri 'none'",
            "form-action 'self'",
            "frame-ancestors 'none'",
        ]
    )


def origin(url: str) -> str | None:
    """`scheme://host[:port]` of an absolute URL; None for a path on this gateway."""
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}" if parts.scheme and parts.netloc else None


def storage_origins(res: Resources) -> list[str]:
    """Where the page's images come from and its uploads go, besides this gateway.

    Links start with DQ_PUBLIC_URL (which may name this gateway otherwise than the browser
    does); with S3 they are presigned URLs on the bucket's host. Both are asked of the store
    itself, so the policy names exactly the origins it hands out, and no other.
    """
    store, base = res.storage, res.settings.public_url or ""
    made = [store.url("page/probe.png", 60), store.upload_url("page/probe.png", 60, "image/png")]
    found = [origin(url if origin(url) else base + url) for url in made]
    return sorted({o for o in found if o})


@cache
def _index() -> str:
    return resources.files("api").joinpath("index.html").read_text()


@router.get("/", include_in_schema=False)
async def index(res: ResourcesDep) -> HTMLResponse:
    """The page (static; it talks to the same JSON API)."""
    html, others = _index(), " ".join(storage_origins(res))
    policy = content_policy(
        html,
        images=f"'self' data: blob: {others}".strip(),
        connect=f"'self' {others}".strip(),
    )
    return HTMLResponse(html, headers={"Content-Security-Policy": policy})


@cache
def _files() -> dict[str, bytes]:
    """The page's files (api/static), by bare name: nothing outside that folder can be named."""
    folder = resources.files("api").joinpath("static")
    return {
        f.name: f.read_bytes()
        for f in folder.iterdir()
        if f.is_file() and f.name.endswith(tuple(TYPES))
    }


@router.get(STATIC + "{name}", include_in_schema=False)
async def static(name: str) -> Response:
    """One of the page's scripts, styles or icons."""
    data = _files().get(name)
    if data is None:
        raise NotFound(f"no page file {name[:64]}")
    kind = TYPES[name[name.rindex(".") :]]
    # Revalidated each load: a new release's files are picked up at once (they are small).
    return Response(data, media_type=kind, headers={"Cache-Control": "no-cache"})
