"""Image inputs uploaded ahead of a job: `POST /v1/uploads` hands out where to PUT one.

With S3 storage the URL is a presigned PUT straight to the bucket; with local storage it is the
gateway's own `PUT /v1/uploads/<key>`, signed apart from read URLs and refused once expired. A job
then names the upload as `image: "upload:<id>"`; the worker reads it back within the input limits
(the bytes are untrusted until then: type sniffed, pixels counted before decoding). Uploads nobody
used expire after `DQ_UPLOAD_TTL_S`.
"""

from __future__ import annotations

import asyncio
import time

from fastapi import APIRouter, Request
from pydantic import BaseModel, Field

from api.deps import CallerDep, ResourcesDep
from api.openapi import OPEN, UPLOAD_BODY, errors
from core import keys
from core.errors import NotFound, ValidationFailed
from core.storage import FileStore, new_upload_id, upload_key

router = APIRouter()

CONTENT_TYPES = ("image/png", "image/jpeg", "image/webp")


class UploadAsk(BaseModel):
    """What is about to be uploaded."""

    content_type: str = Field("image/png", description="image/png, image/jpeg or image/webp")


class Upload(BaseModel):
    """Where to PUT an image input, and how a job names it afterwards."""

    id: str
    ref: str  # the value of a job's `image` or `mask`
    method: str = "PUT"
    url: str
    headers: dict[str, str]
    expires_at: float
    max_bytes: int


@router.post(
    "/v1/uploads",
    response_model=Upload,
    status_code=201,
    tags=["inputs"],
    summary="A place to upload an image input to",
    operation_id="new_upload",
    responses=errors(401, 413, 422, 429, 503),
)
async def new_upload(ask: UploadAsk, http: Request, caller: CallerDep) -> Upload:
    """A place to upload one image input to (it expires if no job uses it in time)."""
    res = caller.res
    if ask.content_type not in CONTENT_TYPES:
        raise ValidationFailed(
            f"content_type must be one of {', '.join(CONTENT_TYPES)}", field="content_type"
        )
    upload_id = new_upload_id()
    key = upload_key(getattr(res.storage, "prefix", ""), upload_id)
    ttl = res.settings.upload_ttl_s
    url = res.storage.upload_url(key, ttl, ask.content_type)
    if url.startswith("/"):
        url = (res.settings.public_url or "").rstrip("/") + url
    expires = time.time() + ttl
    await res.redis.zadd(keys.UPLOADS, {f"{caller.tenant} {upload_id}": expires})
    return Upload(
        id=upload_id,
        ref=f"upload:{upload_id}",
        url=url,
        headers={"Content-Type": ask.content_type},
        expires_at=expires,
        max_bytes=res.settings.input_max_bytes,
    )


@router.put(
    "/v1/uploads/{key:path}",
    status_code=204,
    tags=["inputs"],
    summary="Upload an image input, through the signed URL POST /v1/uploads handed out",
    operation_id="put_upload",
    responses=errors(404, 413, 422),
    openapi_extra={**OPEN, **UPLOAD_BODY},
)
async def put_upload(key: str, expires: int, sig: str, http: Request, res: ResourcesDep) -> None:
    """The local store's upload URL (S3 deployments upload to the bucket instead)."""
    store = res.storage
    if not isinstance(store, FileStore) or not store.verify_upload(key, expires, sig):
        raise NotFound("no such upload place, or its link expired")
    data = await http.body()  # bounded by the gateway's body limit for this route
    await asyncio.to_thread(store.put, key, data, http.headers.get("content-type", ""))
