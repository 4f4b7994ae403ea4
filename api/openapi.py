"""What /openapi.json says beyond the routes' types: errors, examples, auth, tags.

Routes take their error responses from `errors(...)` and their examples from here, as decorator
arguments; `install` adds the bearer scheme and the tags' descriptions, and gives any guarded
route that names no errors of its own (one added later, say) the ones every guarded route has.
The document is what a generated client is built from (tests/test_openapi.py builds one).
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, Field
from pydantic.json_schema import models_json_schema

SCHEME = "bearerAuth"


class ErrorDetail(BaseModel):
    """What went wrong, in words a client can act on."""

    code: str = Field(description="stable, for programs: `validation_error`, `not_found`, …")
    message: str = Field(description="for people: what happened and what to do")
    field: str | None = Field(
        None, description="422: the field to fix, dotted (`loras.0.name`, `body` for the whole)"
    )
    details: list[dict[str, Any]] | None = Field(
        None, description="422 from the request's schema: every field in error, not only the first"
    )
    limit: str | None = Field(
        None, description="429: the limit hit (`rate`, `quota`, `max_queued`, `reads`)"
    )
    retry_after_s: float | None = Field(None, description="429: seconds until a retry may pass")


class ErrorResponse(BaseModel):
    """The body of every error: `{"error": {code, message, …}}`."""

    error: ErrorDetail


def _header(text: str) -> dict[str, Any]:
    return {"description": text, "schema": {"type": "string"}}


RETRY_AFTER = _header("seconds to wait before retrying")

ERRORS: dict[int, dict[str, Any]] = {
    400: {"description": "Not an HTTP request this server can read (`bad_request`)."},
    401: {
        "description": "No valid key: send `Authorization: Bearer <key>` (`unauthorized`).",
        "headers": {"WWW-Authenticate": _header("`Bearer`")},
    },
    403: {"description": "The key lacks the role this needs: an admin key (`forbidden`)."},
    404: {"description": "No such job, or it belongs to another key's tenant (`not_found`)."},
    409: {"description": "The job's state forbids it: it has ended already (`already_finished`)."},
    413: {"description": "The body is larger than the server accepts (`too_large`)."},
    422: {
        "description": "A value is refused; `error.field` names it (`validation_error`, or a "
        "code of its own such as `unknown_model`, `idempotency_mismatch`)."
    },
    429: {
        "description": "A limit was hit (`rate_limited`; `error.limit` says which), or too many "
        "failed keys from this address (`too_many_failures`).",
        "headers": {
            "Retry-After": RETRY_AFTER,
            "RateLimit": _header("IETF draft: the policy's remaining allowance and reset"),
            "RateLimit-Policy": _header("IETF draft: the limit that was hit"),
        },
    },
    503: {
        "description": "The job store is unreachable (`unavailable`) or the queue is full "
        "(`queue_full`): retry after `Retry-After` seconds.",
        "headers": {"Retry-After": RETRY_AFTER},
    },
}

GUARDED = (401, 429, 503)  # any route behind a key: no key, failed keys, Redis down


ENVELOPE = {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorResponse"}}}


def errors(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """The `responses=` of a route: each status with the error envelope and what it means."""
    # The envelope by reference, not `model=`: FastAPI would give it the route's media type,
    # and an event stream's errors are JSON all the same. `install` defines the schema.
    return {status: {**ERRORS[status], "content": ENVELOPE} for status in statuses}


OPEN: dict[str, Any] = {"security": []}  # `openapi_extra` of a route that needs no key


class EventStream(StreamingResponse):
    """Server-Sent Events (the documented media type of a route that streams them)."""

    media_type = "text/event-stream"


EVENTS: dict[int | str, dict[str, Any]] = {
    200: {
        "description": "One event per change until the job ends: `event: <status>` and "
        "`data: <the job as JSON>`; a `: keep-alive` comment while nothing changes.",
        "content": {
            "text/event-stream": {
                "example": 'event: running\ndata: {"id": "job_…", "status": "running", '
                '"progress": {"step": 3, "total_steps": 25}, …}\n\n'
            }
        },
    }
}

FILE: dict[int | str, dict[str, Any]] = {
    200: {
        "description": "The image.",
        "content": {
            kind: {"schema": {"type": "string", "format": "binary"}}
            for kind in ("image/png", "image/jpeg", "image/webp")
        },
    }
}

SUBMIT_EXAMPLES: dict[str, Any] = {
    "requestBody": {
        "content": {
            "application/json": {
                "examples": {
                    "text-to-image": {
                        "summary": "A prompt; the model's defaults for the rest",
                        "value": {"prompt": "a lighthouse at dusk, oil painting"},
                    },
                    "every-knob": {
                        "summary": "Size, steps, guidance, a fixed seed, two images",
                        "value": {
                            "prompt": "a lighthouse at dusk, oil painting",
                            "negative_prompt": "blurry",
                            "width": 512,
                            "height": 512,
                            "steps": 25,
                            "guidance_scale": 7.5,
                            "seed": 1234,
                            "num_images": 2,
                            "output_format": "webp",
                            "priority": "low",
                            "metadata": {"user": "42"},
                        },
                    },
                    "model-and-lora": {
                        "summary": "A model of GET /v1/models with one of its LoRAs",
                        "value": {
                            "prompt": "a harbour at night",
                            "model": "sd15",
                            "loras": [{"name": "pixel-art", "scale": 0.8}],
                            "scheduler": "dpmpp_2m",
                        },
                    },
                    "img2img": {
                        "summary": "Redo an uploaded image (POST /v1/uploads first)",
                        "value": {
                            "prompt": "the same street in winter",
                            "task": "img2img",
                            "image": "upload:upl_0123456789abcdef0123456789abcdef",
                            "strength": 0.6,
                        },
                    },
                    "webhook": {
                        "summary": "Be called when it ends (signed, Standard Webhooks)",
                        "value": {
                            "prompt": "a lighthouse at dusk",
                            "webhook": {
                                "url": "https://example.com/hooks/dq",
                                "events": ["job.succeeded", "job.failed"],
                            },
                        },
                    },
                }
            }
        }
    }
}

TAGS = [
    {"name": "jobs", "description": "Submit a job, read it, wait for it, stream it, cancel it."},
    {"name": "models", "description": "The models served: what a request may ask of each."},
    {"name": "inputs", "description": "Image inputs for img2img and inpainting, uploaded first."},
    {"name": "queue", "description": "The queue as a whole: depth, workers, throughput."},
    {"name": "webhooks", "description": "Signed callbacks when a job changes."},
    {"name": "files", "description": "Signed, expiring URLs the API hands out; no key needed."},
    {"name": "health", "description": "Probes for load balancers and orchestrators."},
]

DESCRIPTION = """\
Submit a prompt, get a job id at once, then poll it (`?wait=` holds the request until it ends),
stream its progress (`/events`), or receive a signed webhook.

**Auth**: `Authorization: Bearer <key>`; each key is a tenant and sees only its own jobs.

**Errors** are JSON, `{"error": {"code", "message", "field"}}`, with the status that fits:
`401` (with `WWW-Authenticate: Bearer`), `403`, `404`, `409`, `413`, `422` (naming the field),
`429` and `503` (with `Retry-After`).
"""


def install(app: FastAPI) -> None:
    """Make the app's /openapi.json the complete document."""
    app.openapi_tags = TAGS

    def document() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = completed(
                get_openapi(
                    title=app.title,
                    version=app.version,
                    summary=app.summary,
                    description=DESCRIPTION,
                    routes=app.routes,
                    tags=app.openapi_tags,
                )
            )
        return app.openapi_schema

    app.openapi = document  # type: ignore[method-assign]


def completed(schema: dict[str, Any]) -> dict[str, Any]:
    """The document with the bearer scheme, required everywhere a route does not waive it."""
    components = schema.setdefault("components", {})
    components.setdefault("securitySchemes", {})[SCHEME] = {
        "type": "http",
        "scheme": "bearer",
        "description": "An API key from the operator (`DQ_API_KEYS`, or `dq keys`).",
    }
    schema["security"] = [{SCHEME: []}]
    _, defs = models_json_schema(
        [(ErrorResponse, "serialization")], ref_template="#/components/schemas/{model}"
    )
    components.setdefault("schemas", {}).update(defs["$defs"])
    for path, methods in schema.get("paths", {}).items():
        for operation in methods.values():
            if operation.get("security") != [] and "401" not in operation.get("responses", {}):
                _add_errors(operation, admin=path.startswith(ADMIN))
    return schema


ADMIN = "/v1/admin/"  # routes for admin keys: a user key is refused with 403


def _add_errors(operation: dict[str, Any], *, admin: bool) -> None:
    """A route added without `errors(...)`: at least what every guarded route may answer."""
    answers = operation.setdefault("responses", {})
    for status, answer in errors(*GUARDED, *([403] if admin else [])).items():
        answers.setdefault(str(status), answer)


UPLOAD_BODY: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {
            kind: {"schema": {"type": "string", "format": "binary"}}
            for kind in ("image/png", "image/jpeg", "image/webp")
        },
    }
}
