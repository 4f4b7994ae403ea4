"""Webhook events in the ledger (created once, in the status change) and the sender's decisions."""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from datetime import UTC, datetime

import pytest
import redis

from core import keys
from core.callbacks import Attempt
from core.deliveries import RetrySchedule
from core.events import DeliveryOrder, DeliveryRecord, EventType, Outcome
from core.jobs import JobStatus, Progress
from core.signing import new_secret
from core.store import Change, JobStore, Ledger
from tests.conftest import Gateway, client_for, settings_from
from tests.webhook_parts import queued_orders
from worker.webhooks import decide, receiver_gone

QUEUE = "dq.webhooks"
ALL_EVENTS = [e.value for e in EventType]
HOOK = "http://127.0.0.1:9/hook"  # never called: no sender runs in these tests


class NoJitter(random.Random):
    """A random source whose jitter factor is always 1."""

    def uniform(self, a: float, b: float) -> float:
        """The middle of every range."""
        return 1.0


@pytest.fixture
def hook_env(env: dict[str, str]) -> dict[str, str]:
    """Webhooks on for loopback URLs; progress events at most once a minute."""
    env.update(
        {
            "DQ_WEBHOOK_SECRET": new_secret(),
            "DQ_WEBHOOK_ALLOW_PRIVATE": "1",
            "DQ_WEBHOOK_PROGRESS_INTERVAL_S": "60",
        }
    )
    return env


def submit(gateway: Gateway, webhook: dict[str, object] | None) -> str:
    """Submit a job, with a webhook or without; its id."""
    body: dict[str, object] = {"prompt": "a kite", "steps": 4}
    if webhook is not None:
        body["webhook"] = webhook
    with client_for(gateway) as client:
        resp = client.post("/v1/jobs", json=body)
    assert resp.status_code == 202, resp.text
    job_id: str = resp.json()["id"]
    return job_id


def run_twice_and_succeed(store: JobStore, job_id: str) -> None:
    """Every kind of status change a job sees: claim, progress, renewal, reap, re-claim, finish."""
    step = Progress(step=1, total_steps=4)
    lease = time.time() + 10
    store.must(Change("claim", job_id, worker="w1", lease=lease, fields={"progress": step}))
    renewal = Change("renew", job_id, attempt=1, worker="w1", lease=lease)
    store.must(Change("renew", job_id, 1, "w1", lease, fields={"progress": step}))
    store.must(Change("renew", job_id, 1, "w1", lease, fields={"progress": step}))  # throttled
    store.must(renewal)
    store.must(Change("handback", job_id, attempt=1))  # the sweep hands it back
    store.must(Change("claim", job_id, worker="w2", lease=lease))
    done = {"finished_at": time.time()}
    store.must(Change("finish", job_id, 2, "w2", to=JobStatus.SUCCEEDED, fields=done))
    assert not store.change(Change("cancel", job_id)).ok


def test_each_event_is_created_once_by_the_status_change(
    hook_env: dict[str, str],
    gateway_factory: Callable[[dict[str, str]], Gateway],
    rclient: redis.Redis,
) -> None:
    gateway = gateway_factory(hook_env)
    job_id = submit(gateway, {"url": HOOK, "events": ALL_EVENTS})
    assert queued_orders(rclient, QUEUE) == []  # queued makes no event
    run_twice_and_succeed(JobStore(rclient, Ledger.of(settings_from(hook_env))), job_id)
    orders = queued_orders(rclient, QUEUE)
    assert [(o.event, o.attempt, o.manual) for o in orders] == [
        (EventType.RUNNING, 1, False),
        (EventType.PROGRESS, 1, False),
        (EventType.SUCCEEDED, 1, False),
    ]
    assert orders[0].webhook_id == f"msg_{job_id}_running"
    assert orders[1].webhook_id.startswith(f"msg_{job_id}_progress_")
    assert orders[2].webhook_id == f"msg_{job_id}_succeeded"


def test_only_subscribed_events_are_created(
    hook_env: dict[str, str],
    gateway_factory: Callable[[dict[str, str]], Gateway],
    rclient: redis.Redis,
) -> None:
    gateway = gateway_factory(hook_env)
    default = submit(gateway, {"url": HOOK})
    none = submit(gateway, None)
    store = JobStore(rclient, Ledger.of(settings_from(hook_env)))
    for job_id in (default, none):
        run_twice_and_succeed(store, job_id)
    assert [(o.job_id, o.event) for o in queued_orders(rclient, QUEUE)] == [
        (default, EventType.SUCCEEDED)
    ]


def test_job_shows_its_webhook_and_keeps_it_out_of_the_request(
    hook_env: dict[str, str], gateway_factory: Callable[[dict[str, str]], Gateway]
) -> None:
    with client_for(gateway_factory(hook_env)) as client:
        body = {"prompt": "a kite", "seed": 1, "webhook": {"url": HOOK}}
        job = client.post("/v1/jobs", json=body, headers={"Idempotency-Key": "k1"}).json()
        again = client.post("/v1/jobs", json=body, headers={"Idempotency-Key": "k1"}).json()
        other = {**body, "webhook": {"url": HOOK + "2"}}
        clash = client.post("/v1/jobs", json=other, headers={"Idempotency-Key": "k1"})
        bad = client.post("/v1/jobs", json={**body, "webhook": {"url": HOOK, "events": ["x"]}})
        none_yet = client.post(f"/v1/jobs/{job['id']}/webhooks/redeliver")
    assert job["webhook"] == {
        "url": HOOK,
        "events": ["job.succeeded", "job.failed", "job.canceled"],
        "deliveries": [],
    }
    assert "webhook" not in job["request"]
    assert again["id"] == job["id"]
    assert clash.status_code == 422
    assert clash.json()["error"]["code"] == "idempotency_mismatch"
    assert (bad.status_code, bad.json()["error"]["field"]) == (422, "webhook.events.0")
    assert none_yet.status_code == 409
    assert none_yet.json()["error"]["code"] == "no_webhook_event"


def answer(status: int | None, retry_after_s: float | None = None) -> Attempt:
    """An attempt's outcome: a status code, or (None) a timeout."""
    return Attempt(status, None if status else "timeout", retry_after_s, 0.1)


@pytest.mark.parametrize(
    ("attempt", "attempt_no", "schedule", "expected"),
    [
        (answer(200), 1, (5, 300), ("delivered", None)),
        (answer(204), 3, (5, 300), ("delivered", None)),
        (answer(410), 1, (5, 300), ("gone", None)),
        (answer(500), 1, (5, 300), ("retrying", 5)),
        (answer(302), 2, (5, 300), ("retrying", 300)),
        (answer(None), 2, (5, 300), ("retrying", 300)),
        (answer(429, retry_after_s=600), 1, (5, 300), ("retrying", 600)),
        (answer(503, retry_after_s=1), 1, (5, 300), ("retrying", 5)),
        (answer(503), 3, (5, 300), ("gave_up", None)),
        (answer(500), 1, (), ("gave_up", None)),
    ],
)
def test_what_follows_an_attempt(
    attempt: Attempt,
    attempt_no: int,
    schedule: tuple[float, ...],
    expected: tuple[Outcome, float | None],
) -> None:
    assert decide(attempt, attempt_no, schedule, NoJitter()) == expected


def logged(*outcomes: Outcome) -> list[DeliveryRecord]:
    """A delivery log with these outcomes."""
    now = datetime.now(UTC)
    return [
        DeliveryRecord(event=EventType.SUCCEEDED, webhook_id="msg_x", attempt=1, at=now, outcome=o)
        for o in outcomes
    ]


@pytest.mark.parametrize(
    ("log", "gone"),
    [
        (logged(), False),
        (logged("retrying", "gone"), True),
        (logged("gone", "skipped", "skipped"), True),
        (logged("gone", "delivered"), False),
    ],
)
def test_receiver_gone_after_410_until_it_answers_again(
    log: list[DeliveryRecord], gone: bool
) -> None:
    assert receiver_gone(log) is gone


def test_due_retries_are_released_once_however_many_pumps_run(rclient: redis.Redis) -> None:
    pumps = [RetrySchedule(rclient, QUEUE) for _ in range(2)]
    orders = [
        DeliveryOrder(
            job_id=f"job_{i}", event=EventType.FAILED, webhook_id=f"msg_{i}", occurred_at=1.0
        )
        for i in range(3)
    ]
    now = time.time()
    pumps[0].add(orders[0], now - 1)
    pumps[1].add(orders[0], now - 1)  # the same order parked twice is parked once
    pumps[0].add(orders[1], now - 1)
    pumps[0].add(orders[2], now + 60)
    assert sum(pump.release_due(now) for pump in pumps) == 2
    assert queued_orders(rclient, QUEUE) == orders[:2]
    assert rclient.zrange(keys.WEBHOOK_RETRIES, 0, -1) == [orders[2].model_dump_json()]
