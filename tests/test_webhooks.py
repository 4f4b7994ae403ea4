"""Webhooks end to end: gateway, ledger, GPU worker and sender processes, receivers on 127.0.0.1.

Every delivery is checked with `standardwebhooks`, the spec's reference library, as a receiver
would check it.
"""

from __future__ import annotations

import io
import time
from collections.abc import Callable, Iterator
from datetime import datetime
from itertools import pairwise
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image
from standardwebhooks.webhooks import Webhook, WebhookVerificationError

from core.signing import new_secret
from tests.conftest import Gateway, WorkerProcess, client_for
from tests.webhook_parts import Answer, Canary, Receiver, SenderProcess, wait_deliveries

SMALL = {"width": 64, "height": 64, "steps": 4}
ALL_EVENTS = ["job.running", "job.progress", "job.succeeded", "job.failed", "job.canceled"]

GatewayFactory = Callable[[dict[str, str]], Gateway]


@pytest.fixture
def secret() -> str:
    """The global signing secret of the test's server."""
    return new_secret()


@pytest.fixture
def hook_env(env: dict[str, str], secret: str) -> dict[str, str]:
    """The test environment with webhooks on, loopback receivers allowed, retries compressed."""
    env.update(
        {
            "DQ_WEBHOOK_SECRET": secret,
            "DQ_WEBHOOK_ALLOW_PRIVATE": "1",
            "DQ_WEBHOOK_RETRY_SCHEDULE": "0.2,0.2,0.2,0.2",
            "DQ_WEBHOOK_CONNECT_TIMEOUT_S": "1",
            "DQ_WEBHOOK_TIMEOUT_S": "1",
        }
    )
    return env


@pytest.fixture
def receivers() -> Iterator[Callable[..., Receiver]]:
    """Start receivers answering a script; all stopped at the end."""
    started: list[Receiver] = []

    def start(*answers: Answer) -> Receiver:
        receiver = Receiver(list(answers) or [Answer()]).start()
        started.append(receiver)
        return receiver

    yield start
    for receiver in started:
        receiver.stop()


@pytest.fixture
def sender_factory(tmp_path: Path) -> Iterator[Callable[[dict[str, str]], SenderProcess]]:
    """Start webhook sender processes; all stopped at the end."""
    started: list[SenderProcess] = []

    def start(env: dict[str, str]) -> SenderProcess:
        proc = SenderProcess(env, tmp_path / f"sender{len(started)}.log")
        started.append(proc)
        return proc

    yield start
    for proc in started:
        proc.stop()


def submit(client: httpx.Client, url: str, **webhook: Any) -> str:
    """Submit a small job with a webhook; its id."""
    body = {"prompt": "a lighthouse", "seed": 3, **SMALL, "webhook": {"url": url, **webhook}}
    resp = client.post("/v1/jobs", json=body)
    assert resp.status_code == 202, resp.text
    job_id: str = resp.json()["id"]
    return job_id


def submit_and_cancel(client: httpx.Client, url: str) -> str:
    """A job whose only event (job.canceled) comes at once, with no GPU worker running."""
    job_id = submit(client, url)
    assert client.post(f"/v1/jobs/{job_id}/cancel").status_code == 200
    return job_id


def attempts(log: list[dict[str, Any]]) -> list[tuple[int, int | None, str]]:
    """(attempt, status code, outcome) of each logged delivery."""
    return [(e["attempt"], e["status_code"], e["outcome"]) for e in log]


def without(obj: dict[str, Any], *names: str) -> dict[str, Any]:
    """A dict less some keys."""
    return {k: v for k, v in obj.items() if k not in names}


def test_job_events_arrive_signed_during_rotation(
    hook_env: dict[str, str],
    secret: str,
    gateway_factory: GatewayFactory,
    worker_factory: Callable[..., WorkerProcess],
    sender_factory: Callable[[dict[str, str]], SenderProcess],
    receivers: Callable[..., Receiver],
) -> None:
    old = new_secret()
    hook_env["DQ_WEBHOOK_SECRETS"] = f"alice:{secret},alice:{old}"  # alice is rotating
    hook_env["DQ_WEBHOOK_SECRET"] = new_secret()  # everyone else's; not alice's
    hook_env["DQ_PROGRESS_INTERVAL_S"] = "60"  # progress is written once, at the last step
    gateway = gateway_factory(hook_env)
    hook_env["DQ_PUBLIC_URL"] = gateway.url
    worker_factory(hook_env)
    sender_factory(hook_env)
    rx = receivers()
    with client_for(gateway) as client:
        job_id = submit(client, rx.url, events=ALL_EVENTS)
        log = wait_deliveries(client, job_id, lambda log: len(log) == 3)
        done = client.get(f"/v1/jobs/{job_id}").json()
        events = {}
        for hit in rx.hits:
            event = Webhook(secret).verify(hit.body, hit.headers)
            assert Webhook(old).verify(hit.body, hit.headers) == event
            assert hit.path == "/hooks/dq"
            events[event["type"]] = (hit, event)
        assert sorted(events) == ["job.progress", "job.running", "job.succeeded"]
        assert [e["outcome"] for e in log] == ["delivered"] * 3
        hit, succeeded = events["job.succeeded"]
        assert hit.headers["webhook-id"] == f"msg_{job_id}_succeeded"
        assert hit.headers["content-type"] == "application/json"
        data = succeeded["data"]
        assert without(data, "outputs") == without(done, "outputs", "webhook")
        assert data["expires_at"] == done["expires_at"]  # when the job and its images go
        assert data["expires_at"] is not None
        assert data["outputs"][0]["url"].startswith(f"{gateway.url}/v1/files/{job_id}/0.png?")
        image = Image.open(io.BytesIO(client.get(data["outputs"][0]["url"]).content))
        assert (image.format, image.size) == ("PNG", (64, 64))
    assert done["status"] == "succeeded"
    assert "webhook" not in done["request"]
    assert without(done["webhook"], "deliveries") == {"url": rx.url, "events": ALL_EVENTS}
    happened = datetime.fromisoformat(succeeded["timestamp"])
    assert abs((happened - datetime.fromisoformat(done["finished_at"])).total_seconds()) < 1
    with pytest.raises(WebhookVerificationError, match="No matching signature"):
        Webhook(hook_env["DQ_WEBHOOK_SECRET"]).verify(hit.body, hit.headers)
    tampered = hit.body.replace(b'"succeeded"', b'"failed"', 1)
    with pytest.raises(WebhookVerificationError, match="No matching signature"):
        Webhook(secret).verify(tampered, hit.headers)
    stale = {**hit.headers, "webhook-timestamp": str(int(time.time()) - 600)}
    with pytest.raises(WebhookVerificationError, match="too old"):
        Webhook(secret).verify(hit.body, stale)


def test_retries_keep_one_webhook_id_and_honour_retry_after(
    hook_env: dict[str, str],
    secret: str,
    gateway_factory: GatewayFactory,
    sender_factory: Callable[[dict[str, str]], SenderProcess],
    receivers: Callable[..., Receiver],
) -> None:
    rx = receivers(Answer(500), Answer(429, (("Retry-After", "1"),)), Answer(503), Answer(200))
    sender_factory(hook_env)
    with client_for(gateway_factory(hook_env)) as client:
        job_id = submit_and_cancel(client, rx.url)
        log = wait_deliveries(client, job_id, lambda log: len(log) == 4)
        assert attempts(log) == [
            (1, 500, "retrying"),
            (2, 429, "retrying"),
            (3, 503, "retrying"),
            (4, 200, "delivered"),
        ]
        resp = client.post(f"/v1/jobs/{job_id}/webhooks/redeliver")
        assert resp.status_code == 202, resp.text
        assert resp.json() == {"event": "job.canceled", "webhook_id": f"msg_{job_id}_canceled"}
        log = wait_deliveries(client, job_id, lambda log: len(log) == 5)
    assert attempts(log)[4] == (1, 200, "delivered")  # a new series
    assert {h.headers["webhook-id"] for h in rx.hits} == {f"msg_{job_id}_canceled"}
    assert [Webhook(secret).verify(h.body, h.headers)["type"] for h in rx.hits] == [
        "job.canceled"
    ] * 5
    gaps = [round(b.at - a.at, 2) for a, b in pairwise(rx.hits[:4])]
    assert 0.1 < gaps[0] < 1.5, gaps  # 0.2 s +- jitter, plus the pump's tick
    assert gaps[1] >= 1.0, gaps  # the 429's Retry-After: 1 outlasts the 0.2 s schedule
    for entry, hit in zip(log, rx.hits, strict=False):
        print(f"attempt {entry['attempt']} at +{hit.at - rx.hits[0].at:.2f}s:", attempts([entry]))


def test_redirect_is_a_failure_and_never_followed(
    hook_env: dict[str, str],
    gateway_factory: GatewayFactory,
    sender_factory: Callable[[dict[str, str]], SenderProcess],
    receivers: Callable[..., Receiver],
) -> None:
    hook_env["DQ_WEBHOOK_RETRY_SCHEDULE"] = "0.2"
    sender_factory(hook_env)
    with Canary() as canary, client_for(gateway_factory(hook_env)) as client:
        rx = receivers(Answer(302, (("Location", f"http://127.0.0.1:{canary.port}/"),)))
        job_id = submit_and_cancel(client, rx.url)
        log = wait_deliveries(client, job_id, lambda log: len(log) == 2)
    assert attempts(log) == [(1, 302, "retrying"), (2, 302, "gave_up")]
    assert log[1]["next_retry_at"] is None
    assert len(rx.hits) == 2
    assert canary.connections == 0


def test_gone_stops_retries_until_a_redelivery_is_asked_for(
    hook_env: dict[str, str],
    gateway_factory: GatewayFactory,
    sender_factory: Callable[[dict[str, str]], SenderProcess],
    receivers: Callable[..., Receiver],
) -> None:
    rx = receivers(Answer(410), Answer(200))
    sender_factory(hook_env)
    with client_for(gateway_factory(hook_env)) as client:
        job_id = submit_and_cancel(client, rx.url)
        log = wait_deliveries(client, job_id, lambda log: len(log) == 1)
        time.sleep(1.0)  # the 0.2 s schedule would have retried four times by now
        assert attempts(client.get(f"/v1/jobs/{job_id}").json()["webhook"]["deliveries"]) == [
            (1, 410, "gone")
        ]
        assert len(rx.hits) == 1
        assert client.post(f"/v1/jobs/{job_id}/webhooks/redeliver").status_code == 202
        log = wait_deliveries(client, job_id, lambda log: len(log) == 2)
    assert attempts(log) == [(1, 410, "gone"), (1, 200, "delivered")]
    assert rx.hits[0].headers["webhook-id"] == rx.hits[1].headers["webhook-id"]


def test_hanging_receiver_times_out(
    hook_env: dict[str, str],
    gateway_factory: GatewayFactory,
    sender_factory: Callable[[dict[str, str]], SenderProcess],
    receivers: Callable[..., Receiver],
) -> None:
    hook_env["DQ_WEBHOOK_RETRY_SCHEDULE"] = ""  # one attempt only
    rx = receivers(Answer(200, hang_s=5))
    sender_factory(hook_env)
    with client_for(gateway_factory(hook_env)) as client:
        job_id = submit_and_cancel(client, rx.url)
        (entry,) = wait_deliveries(client, job_id, lambda log: len(log) == 1)
    assert without(entry, "at") == {
        "event": "job.canceled",
        "webhook_id": f"msg_{job_id}_canceled",
        "attempt": 1,
        "outcome": "gave_up",
        "status_code": None,
        "error": "timeout",
        "next_retry_at": None,
    }
    waited = datetime.fromisoformat(entry["at"]).timestamp() - rx.hits[0].at
    assert 0.9 < waited < 3.0  # DQ_WEBHOOK_TIMEOUT_S=1, not the receiver's 5 s
