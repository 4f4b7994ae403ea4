"""Waiting for a job without polling: the long poll (`?wait=`) and the event stream, both pushed
by the ledger's change channel, against a real gateway and Redis (and a real worker where named)."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest
import redis

from api.watch import FALLBACK_S
from core import keys
from core.embedded import EmbeddedRedis
from tests.conftest import ALICE_KEY, BOB_KEY, Gateway, WorkerProcess, client_for, wait_until

GOOD = {"prompt": "a cat", "width": 64, "height": 64, "steps": 2}


def once_waiting(gw: Gateway, job_id: str, action: Callable[[], Any]) -> threading.Thread:
    """Run `action` in a thread as soon as a request of `gw` waits on `job_id`."""

    def run() -> None:
        waiters = gw.app.state.resources.watcher.waiters
        wait_until(lambda: waiters.get(job_id), 10, f"a request waiting on {job_id}")
        action()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def sse_events(lines: Iterator[str]) -> Iterator[tuple[str, dict[str, Any]]]:
    """(event, data) pairs of a text/event-stream; comment lines are skipped."""
    event = None
    for line in lines:
        if line.startswith("event: "):
            event = line.removeprefix("event: ")
        elif line.startswith("data: ") and event is not None:
            yield event, json.loads(line.removeprefix("data: "))
            event = None


def test_a_long_poll_answers_the_moment_the_job_ends(
    gateway: Gateway, client: httpx.Client
) -> None:
    job_id = client.post("/v1/jobs", json=GOOD).json()["id"]
    once_waiting(gateway, job_id, lambda: client.post(f"/v1/jobs/{job_id}/cancel"))
    start = time.monotonic()
    resp = client.get(f"/v1/jobs/{job_id}", params={"wait": 30})
    took = time.monotonic() - start
    assert resp.status_code == 200
    assert resp.json()["status"] == "canceled"
    # Told by the change channel, not by the periodic re-read that backs it up.
    assert took < FALLBACK_S - 1, took


def test_a_long_poll_on_an_unfinished_job_answers_when_the_wait_is_over(
    client: httpx.Client,
) -> None:
    job_id = client.post("/v1/jobs", json=GOOD).json()["id"]
    start = time.monotonic()
    resp = client.get(f"/v1/jobs/{job_id}", params={"wait": 0.5})
    assert resp.status_code == 200
    assert resp.json()["status"] == "queued"
    assert resp.json()["queue"]["position"] == 1
    assert time.monotonic() - start >= 0.5


def test_a_long_poll_on_a_finished_job_answers_at_once(client: httpx.Client) -> None:
    job_id = client.post("/v1/jobs", json=GOOD).json()["id"]
    client.post(f"/v1/jobs/{job_id}/cancel")
    start = time.monotonic()
    assert client.get(f"/v1/jobs/{job_id}", params={"wait": 30}).json()["status"] == "canceled"
    assert time.monotonic() - start < FALLBACK_S - 1


@pytest.mark.parametrize("wait", ["-1", "61", "soon"])
def test_a_bad_wait_is_a_422_naming_it(client: httpx.Client, wait: str) -> None:
    job_id = client.post("/v1/jobs", json=GOOD).json()["id"]
    resp = client.get(f"/v1/jobs/{job_id}", params={"wait": wait})
    assert resp.status_code == 422
    assert resp.json()["error"]["field"] == "wait"


def test_a_long_poll_on_another_tenants_job_is_not_found(gateway: Gateway) -> None:
    with client_for(gateway, ALICE_KEY) as alice, client_for(gateway, BOB_KEY) as bob:
        job_id = alice.post("/v1/jobs", json=GOOD).json()["id"]
        assert bob.get(f"/v1/jobs/{job_id}", params={"wait": 5}).status_code == 404


def test_the_event_stream_sends_each_change_and_ends_with_the_job(
    gateway: Gateway, client: httpx.Client
) -> None:
    job_id = client.post("/v1/jobs", json=GOOD).json()["id"]
    once_waiting(gateway, job_id, lambda: client.post(f"/v1/jobs/{job_id}/cancel"))
    start = time.monotonic()
    with client.stream("GET", f"/v1/jobs/{job_id}/events") as resp:
        assert resp.headers["content-type"].startswith("text/event-stream")
        events = list(sse_events(resp.iter_lines()))
    assert [e for e, _ in events] == ["queued", "canceled"]
    assert events[-1][1]["id"] == job_id
    assert time.monotonic() - start < FALLBACK_S - 1


def test_waiting_survives_a_redis_restart(
    env: dict[str, str], gateway_factory: Callable[[dict[str, str]], Gateway], tmp_path: Any
) -> None:
    own = EmbeddedRedis(tmp_path / "r", aof=True).start()
    r = redis.Redis.from_url(own.url, decode_responses=True)

    def subscribers() -> int:
        """The gateway's subscriptions to the change channel, as Redis counts them."""
        try:
            return int(dict(r.pubsub_numsub(keys.CHANGES))[keys.CHANGES])
        except redis.RedisError:
            return -1

    gw = gateway_factory({**env, "DQ_REDIS_URL": own.url})
    try:
        with client_for(gw) as c:
            job_id = c.post("/v1/jobs", json=GOOD).json()["id"]
            wait_until(lambda: subscribers() == 1, 10, "the gateway to subscribe")
            own.stop()
            own.start()  # same port, same data (AOF); a new server knows no subscriber
            wait_until(lambda: subscribers() == 1, 15, "the gateway to subscribe again")
            wait_until(
                lambda: c.get(f"/v1/jobs/{job_id}").status_code == 200, 10, "reads to come back"
            )
            once_waiting(gw, job_id, lambda: c.post(f"/v1/jobs/{job_id}/cancel"))
            start = time.monotonic()
            assert c.get(f"/v1/jobs/{job_id}", params={"wait": 30}).json()["status"] == "canceled"
            # Woken by the channel (milliseconds), not by the re-reads of an unsubscribed waiter.
            assert time.monotonic() - start < FALLBACK_S - 1
    finally:
        r.close()
        own.stop()


def test_with_a_worker_the_stream_shows_progress_and_the_long_poll_the_images(
    env: dict[str, str], client: httpx.Client, worker_factory: Callable[..., WorkerProcess]
) -> None:
    worker_factory(env, DQ_PROGRESS_INTERVAL_S="0")
    body = {**GOOD, "steps": 6}
    streamed = client.post("/v1/jobs", json=body).json()["id"]
    with client.stream("GET", f"/v1/jobs/{streamed}/events") as resp:
        events = list(sse_events(resp.iter_lines()))
    kinds = [e for e, _ in events]
    assert kinds[-1] == "succeeded", kinds
    assert "running" in kinds, kinds
    steps = [d["progress"]["step"] for e, d in events if e == "running" and d["progress"]]
    assert steps == sorted(steps), steps
    assert len(set(steps)) > 1, steps
    assert events[-1][1]["outputs"][0]["url"]

    polled = client.post("/v1/jobs", json=body).json()["id"]
    job: dict[str, Any] = {"status": "queued"}
    while job["status"] not in ("succeeded", "failed", "canceled"):
        job = client.get(f"/v1/jobs/{polled}", params={"wait": 20}).json()
    assert job["status"] == "succeeded"
    assert job["outputs"][0]["url"]
