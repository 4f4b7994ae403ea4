"""The API's requests, described once for the sync and the async client."""

from __future__ import annotations

import os
import uuid
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

import httpx

from dq_client.errors import ConnectionFailed, DQError, error_from_response
from dq_client.models import Job, Model
from dq_client.retry import RetryPolicy

DEFAULT_URL = "http://127.0.0.1:8000"
USER_AGENT = "diffusion-queue-client/0.1.0"
LONG_POLL_S = 30.0  # one long poll's length: under the idle timeout of most proxies
READ_SLACK_S = 15.0  # how much longer than the server's hold a read may take
STREAM_READ_S = 45.0  # the event stream sends a keep-alive every 15 s; three missed = dead


@dataclass(frozen=True)
class Config:
    """Where the server is, the key, and how requests behave."""

    url: str
    key: str | None
    timeout_s: float
    retry: RetryPolicy

    @classmethod
    def resolve(
        cls, url: str | None, key: str | None, timeout_s: float, retry: RetryPolicy | None
    ) -> Config:
        """Arguments first, then `DQ_URL` and `DQ_API_KEY`, then a local `dq up`."""
        return cls(
            url=(url or os.environ.get("DQ_URL") or DEFAULT_URL).rstrip("/"),
            key=key or os.environ.get("DQ_API_KEY") or None,
            timeout_s=timeout_s,
            retry=retry or RetryPolicy(),
        )

    def headers(self) -> dict[str, str]:
        """Headers every API request carries."""
        headers = {"User-Agent": USER_AGENT, "Accept": "application/json"}
        if self.key:
            headers["Authorization"] = f"Bearer {self.key}"
        return headers


@dataclass(frozen=True)
class Call:
    """One API request: what to send and whether it may be sent again after reaching the server."""

    method: str
    path: str
    params: dict[str, Any] = field(default_factory=dict)
    json: dict[str, Any] | None = None
    headers: dict[str, str] = field(default_factory=dict)
    timeout_s: float | None = None  # None: the client's
    resend: bool = True


def job_id(job: Job | str) -> str:
    """The id of a job given as a `Job` or as its id."""
    return job.id if isinstance(job, Job) else job


def _job_path(job: Job | str, rest: str = "") -> str:
    return f"/v1/jobs/{quote(job_id(job), safe='')}{rest}"


def submit(prompt: str, options: dict[str, Any], idempotency_key: str | None) -> Call:
    """POST /v1/jobs; options go through as JSON fields (None ones are left out)."""
    body = {"prompt": prompt, **{k: v for k, v in options.items() if v is not None}}
    # One key for every try of this submission, so a retry can never make a second job.
    key = idempotency_key or f"dqc-{uuid.uuid4()}"
    return Call("POST", "/v1/jobs", json=body, headers={"Idempotency-Key": key})


def get(job: Job | str, wait_s: float = 0) -> Call:
    """GET /v1/jobs/{id}, held up to `wait_s` until the job ends (a long poll)."""
    if wait_s <= 0:
        return Call("GET", _job_path(job))
    return Call("GET", _job_path(job), {"wait": round(wait_s, 3)}, timeout_s=wait_s + READ_SLACK_S)


def page(status: str | None, limit: int, cursor: str | None) -> Call:
    """GET /v1/jobs: one page, newest first."""
    params: dict[str, Any] = {"limit": limit}
    if status:
        params["status"] = status
    if cursor:
        params["cursor"] = cursor
    return Call("GET", "/v1/jobs", params)


def cancel(job: Job | str) -> Call:
    """POST /v1/jobs/{id}/cancel."""
    return Call("POST", _job_path(job, "/cancel"))


def delete(job: Job | str) -> Call:
    """DELETE /v1/jobs/{id}."""
    return Call("DELETE", _job_path(job))


def redeliver(job: Job | str) -> Call:
    """POST /v1/jobs/{id}/webhooks/redeliver: each one sends the event again, so never resent."""
    return Call("POST", _job_path(job, "/webhooks/redeliver"), resend=False)


def events(job: Job | str, headers: dict[str, str]) -> Call:
    """GET /v1/jobs/{id}/events (Server-Sent Events)."""
    return Call(
        "GET",
        _job_path(job, "/events"),
        headers={"Accept": "text/event-stream", **headers},
        timeout_s=STREAM_READ_S,
    )


def queue() -> Call:
    """GET /v1/queue."""
    return Call("GET", "/v1/queue")


def models() -> Call:
    """GET /v1/models."""
    return Call("GET", "/v1/models")


def poll_s(deadline: float | None, now: float) -> float:
    """How long the next long poll holds: `LONG_POLL_S`, or what is left before `deadline`."""
    return LONG_POLL_S if deadline is None else max(0.0, min(LONG_POLL_S, deadline - now))


def failure(error: httpx.TransportError) -> DQError:
    """The SDK's error for a connection that failed."""
    if isinstance(error, httpx.UnsupportedProtocol):
        return DQError(f"not an http(s) URL: {error}")
    # Failing to connect means nothing reached the server; anything later, it may have.
    sent = not isinstance(error, httpx.ConnectError | httpx.ConnectTimeout | httpx.PoolTimeout)
    try:
        where = f"{error.request.url.scheme}://{error.request.url.netloc.decode()}"
    except RuntimeError:
        where = "the server"
    return ConnectionFailed(f"{where}: {type(error).__name__}: {error}".rstrip(": "), sent=sent)


def checked(response: httpx.Response) -> httpx.Response:
    """The response, unless it is an error answer (read it first): then its typed exception."""
    if response.is_error:
        raise error_from_response(response.status_code, response.headers, response.content)
    return response


def models_of(data: Any) -> list[Model]:
    """The models of `GET /v1/models`: a list, or an object with a `models` list."""
    rows = data.get("models", []) if isinstance(data, dict) else data
    return [Model.from_dict(row) for row in rows]
