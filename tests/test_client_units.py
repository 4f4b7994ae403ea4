"""The client's pure parts, table-tested: retry decisions, errors, the event stream, models."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from email.utils import formatdate
from typing import Any

import pytest
from standardwebhooks.webhooks import Webhook

from core.signing import new_secret, signature_headers
from dq_client import calls
from dq_client.errors import (
    APIError,
    Conflict,
    ConnectionFailed,
    DQError,
    NotFound,
    PayloadTooLarge,
    RateLimited,
    ServerError,
    Unauthorized,
    Unavailable,
    ValidationError,
    WebhookVerificationError,
    error_from_response,
    retry_after,
)
from dq_client.models import Job, QueueInfo, QueueStatus
from dq_client.retry import RetryPolicy
from dq_client.stream import EventDecoder, JobEvents, ServerEvent
from dq_client.webhooks import verify_webhook
from tests.conftest import ROOT


def api_error(status: int, headers: dict[str, str] | None = None) -> APIError:
    body = json.dumps({"error": {"code": "x", "message": "m"}}).encode()
    return error_from_response(status, headers or {}, body)


class Clock:
    """A clock the test moves."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def delays(policy: RetryPolicy, errors: list[DQError], resend: bool = True) -> list[float | None]:
    """The pauses a request would take after each error in turn (the clock moves by each)."""
    clock = Clock()
    retrying = policy.start(clock)
    retrying.rand = lambda: 0.5
    out: list[float | None] = []
    for error in errors:
        pause = retrying.delay_s(error, resend=resend)
        out.append(pause)
        clock.now += pause or 0
    return out


REFUSED = ConnectionFailed("refused", sent=False)
CUT = ConnectionFailed("cut", sent=True)


@pytest.mark.parametrize(
    ("errors", "resend", "expected"),
    [
        # Doubling from 0.2 s with the jitter drawn at its middle (x 0.75), capped at 10 s.
        ([REFUSED] * 4, True, [0.15, 0.3, 0.6, 1.2]),
        ([REFUSED] * 9, True, [0.15, 0.3, 0.6, 1.2, 2.4, 4.8, 7.5, 7.5, 7.5]),
        # The server's Retry-After wins over the backoff, for 429 and 503 alike.
        ([api_error(503, {"Retry-After": "3"})], True, [3.0]),
        ([api_error(429, {"Retry-After": "7"}), REFUSED], True, [7.0, 0.3]),
        # Errors that a retry would not fix are raised at once.
        ([api_error(500)], True, [None]),
        ([api_error(422)], True, [None]),
        ([api_error(404)], True, [None]),
        ([DQError("bad URL")], True, [None]),
        # A request that must not run twice is retried only when it surely did not arrive.
        ([CUT], False, [None]),
        ([REFUSED, api_error(503, {"Retry-After": "1"}), CUT], False, [0.15, 1.0, None]),
        ([api_error(502)], False, [None]),
        ([api_error(502)], True, [0.15]),
    ],
)
def test_retry_decisions(errors: list[DQError], resend: bool, expected: list[float | None]) -> None:
    assert delays(RetryPolicy(), errors, resend) == pytest.approx(expected)


def test_retries_stop_when_the_budget_is_spent() -> None:
    policy = RetryPolicy(give_up_after_s=5)
    # 0.15 + 0.3 + 0.6 + 1.2 + 2.4 = 4.65 s; the next 4.8 s would pass 5 s.
    assert delays(policy, [REFUSED] * 6) == pytest.approx([0.15, 0.3, 0.6, 1.2, 2.4, None])
    # A Retry-After longer than the budget is not waited for.
    assert delays(policy, [api_error(503, {"Retry-After": "10"})]) == [None]
    assert delays(RetryPolicy.never(), [REFUSED]) == [None]
    assert delays(RetryPolicy(max_attempts=3), [REFUSED] * 3) == pytest.approx([0.15, 0.3, None])


def test_a_deadline_cuts_retries_short() -> None:
    clock = Clock()
    retrying = RetryPolicy().start(clock)
    assert retrying.delay_s(api_error(503, {"Retry-After": "5"}), resend=True, until=104) is None
    retrying.reset()
    assert retrying.delay_s(api_error(503, {"Retry-After": "3"}), resend=True, until=104) == 3


def test_retry_after_reads_seconds_dates_and_ratelimit() -> None:
    now = time.time()
    assert retry_after({"Retry-After": "12"}) == 12
    assert retry_after({"retry-after": formatdate(now + 30, usegmt=True)}, now) == pytest.approx(
        30, abs=1
    )
    assert retry_after({"Retry-After": formatdate(now - 30, usegmt=True)}, now) == 0
    assert retry_after({"RateLimit": '"default";r=0;t=9'}) == 9
    assert retry_after({"RateLimit": "limit=10, remaining=0, reset=4"}) is None
    assert retry_after({}) is None
    assert retry_after({"Retry-After": "soon"}) is None


@pytest.mark.parametrize(
    ("status", "kind"),
    [
        (401, Unauthorized),
        (404, NotFound),
        (409, Conflict),
        (413, PayloadTooLarge),
        (422, ValidationError),
        (429, RateLimited),
        (503, Unavailable),
        (500, ServerError),
        (502, ServerError),
        (418, APIError),
    ],
)
def test_errors_are_typed_by_status(status: int, kind: type[APIError]) -> None:
    body = {"error": {"code": "c", "message": "what to do", "field": "width"}}
    error = error_from_response(status, {"Retry-After": "2"}, json.dumps(body).encode())
    assert type(error) is kind
    assert (error.status, error.code, error.message, error.field) == (
        status,
        "c",
        "what to do",
        "width",
    )
    assert error.retry_after_s == 2
    assert str(error) == f"what to do ({status} c, field width)"


def test_an_error_from_a_proxy_keeps_its_text() -> None:
    error = error_from_response(502, {}, b"<html>Bad Gateway</html>")
    assert (type(error), error.code, error.message) == (
        ServerError,
        "http_502",
        "<html>Bad Gateway</html>",
    )
    assert error.retryable


def test_a_rate_limit_says_which_limit() -> None:
    body = {"error": {"code": "rate_limited", "message": "slow down", "limit": {"rpm": 60}}}
    headers = {"RateLimit-Policy": '"default";q=60;w=60', "RateLimit": '"default";r=0;t=5'}
    error = error_from_response(429, headers, json.dumps(body).encode())
    assert isinstance(error, RateLimited)
    assert (error.limit, error.policy, error.retry_after_s) == (
        {"rpm": 60},
        '"default";q=60;w=60',
        5,
    )


def test_the_event_decoder_follows_the_sse_rules() -> None:
    decoder = EventDecoder()
    lines = [": keep-alive", "", "event: running", "data: a", "data: b", "id: 7", "", "data: c", ""]
    events = [e for e in map(decoder.feed, lines) if e is not None]
    assert events == [ServerEvent("running", "a\nb", "7"), ServerEvent("message", "c", "7")]


def job_json(status: str, **fields: Any) -> dict[str, Any]:
    return {
        "id": "job_1",
        "status": status,
        "created_at": "2026-12-01T10:00:00Z",
        "request": {"prompt": "p", "width": 64, "height": 64, "steps": 4, "seed": 3},
        "metrics": {"attempts": 0},
        **fields,
    }


def sse(job: dict[str, Any]) -> list[str]:
    return [f"event: {job['status']}", f"data: {json.dumps(job)}", ""]


def test_a_reconnected_stream_does_not_repeat_what_was_seen() -> None:
    stream = JobEvents("job_1")
    running = job_json("running", progress={"step": 1, "total_steps": 4})
    later = job_json("running", progress={"step": 3, "total_steps": 4})
    done = job_json("succeeded", outputs=[{"url": "u", "seed": 3, "width": 64, "height": 64}])
    first = [stream.feed(line) for line in sse(running)]
    stream.reconnecting()  # the stream was cut; the new one starts with the job as it is
    again = [stream.feed(line) for line in [*sse(running), *sse(later), *sse(done)]]
    seen = [j for j in first + again if j is not None]
    assert [(j.status, j.progress.step if j.progress else None) for j in seen] == [
        ("running", 1),
        ("running", 3),
        ("succeeded", None),
    ]
    assert stream.done
    assert stream.seen == 4


def test_a_job_with_fields_from_a_newer_server_parses() -> None:
    data = job_json(
        "queued",
        queue={"position": 2, "eta_s": 1.5, "class": "high"},
        webhook={"url": "https://x", "events": ["job.succeeded"]},
        tenant_quota={"left": 3},
    )
    data["request"] |= {"model": "sdxl", "priority": "high", "loras": [{"name": "a", "scale": 1}]}
    job = Job.from_dict(data)
    assert job.request.extra == {
        "model": "sdxl",
        "priority": "high",
        "loras": [{"name": "a", "scale": 1}],
    }
    assert job.extra == {"webhook": data["webhook"], "tenant_quota": {"left": 3}}
    assert job.queue == QueueInfo(position=2, eta_s=1.5)
    assert not job.terminal
    assert job.raw is data


def test_a_queue_with_new_shapes_parses() -> None:
    data = {
        "queued": 3,
        "running": 1,
        "workers": [{"name": "w1", "state": "busy"}],
        "by_model": {"tiny": {"high": 1, "normal": 2}},
        "images_per_s": None,
        "eta_s": None,
    }
    status = QueueStatus.from_dict(data)
    assert (status.queued, status.running, status.workers, status.scaler) == (3, 1, 1, None)


def test_submit_passes_options_through_and_keeps_one_key() -> None:
    call = calls.submit("p", {"width": 64, "seed": None, "priority": "low"}, None)
    assert call.json == {"prompt": "p", "width": 64, "priority": "low"}
    key = call.headers["Idempotency-Key"]
    assert key.startswith("dqc-")
    assert len(key) > 30
    assert calls.submit("p", {}, "mine").headers["Idempotency-Key"] == "mine"
    assert calls.submit("p", {}, None).headers["Idempotency-Key"] != key


def signed(secrets: list[str], body: bytes, at: int | None = None) -> dict[str, str]:
    return signature_headers(secrets, "msg_job_1_succeeded", at or int(time.time()), body)


def test_verify_webhook_checks_the_server_signature() -> None:
    secret = new_secret()
    body = json.dumps({"type": "job.succeeded", "data": {"id": "job_1"}}).encode()
    headers = signed([secret], body)
    assert verify_webhook(secret, body, headers)["data"]["id"] == "job_1"
    # The spec's reference library agrees with both the signer and the checker.
    assert Webhook(secret).verify(body, headers)["type"] == "job.succeeded"
    upper = {k.upper(): v for k, v in headers.items()}
    assert verify_webhook(secret, body.decode(), upper)["type"] == "job.succeeded"
    # During a rotation the server signs with both secrets; either one verifies.
    assert verify_webhook(secret, body, signed([new_secret(), secret], body))


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("forged body", "no valid signature"),
        ("other secret", "no valid signature"),
        ("stale", "too old"),
        ("no id", "missing header webhook-id"),
    ],
)
def test_verify_webhook_refuses(case: str, message: str) -> None:
    secret = new_secret()
    body = b'{"type":"job.succeeded","data":{}}'
    headers = signed([secret], body, int(time.time()) - 600 if case == "stale" else None)
    if case == "no id":
        del headers["webhook-id"]
    sent = body.replace(b"succeeded", b"failed") if case == "forged body" else body
    key = new_secret() if case == "other secret" else secret
    with pytest.raises(WebhookVerificationError, match=message):
        verify_webhook(key, sent, headers)


def test_the_client_never_imports_the_server() -> None:
    code = (
        "import sys, dq_client, dq_client.cli\n"
        "server = {m for m in sys.modules if m.split('.')[0] in "
        "('api', 'core', 'worker', 'scaler', 'bench')}\n"
        "print(sorted(server))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT / "client", capture_output=True, text=True
    )
    assert (out.returncode, out.stdout.strip()) == (0, "[]"), out.stderr
