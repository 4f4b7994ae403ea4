"""The gateway over real HTTP against a real Redis, with no worker running."""

from __future__ import annotations

import concurrent.futures
from collections.abc import Callable
from typing import Any

import httpx
import pytest

from core.embedded import EmbeddedRedis
from tests.conftest import ALICE_KEY, BOB_KEY, Gateway, client_for

GOOD = {"prompt": "a cat", "width": 64, "height": 64, "steps": 2}


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"prompt": ""}, "prompt"),
        ({"prompt": "   "}, "prompt"),
        ({"prompt": "x" * 2001}, "prompt"),
        ({"negative_prompt": "x" * 2001}, "negative_prompt"),
        ({"width": 60}, "width"),
        ({"width": 68}, "width"),
        ({"height": 2056}, "height"),
        ({"steps": 0}, "steps"),
        ({"steps": 151}, "steps"),
        ({"guidance_scale": -1}, "guidance_scale"),
        ({"guidance_scale": 31}, "guidance_scale"),
        ({"num_images": 0}, "num_images"),
        ({"num_images": 5}, "num_images"),
        ({"seed": -1}, "seed"),
        ({"seed": 2**32}, "seed"),
        ({"output_format": "gif"}, "output_format"),
        ({"metadata": {"k": "x" * 4100}}, "metadata"),
        ({"surprise": 1}, "surprise"),
        ({"width": "wide"}, "width"),
    ],
)
def test_each_rule_is_a_422_naming_the_field(
    client: httpx.Client, change: dict[str, Any], field: str
) -> None:
    resp = client.post("/v1/jobs", json={**GOOD, **change})
    assert resp.status_code == 422
    assert resp.json()["error"]["field"] == field
    assert resp.json()["error"]["code"] == "validation_error"


def test_malformed_json_is_a_422_not_a_500(client: httpx.Client) -> None:
    resp = client.post(
        "/v1/jobs", content=b"{not json", headers={"content-type": "application/json"}
    )
    assert resp.status_code == 422
    assert resp.json()["error"]["code"] == "invalid_json"


def test_body_too_large_is_a_413(client: httpx.Client) -> None:
    resp = client.post("/v1/jobs", json={**GOOD, "prompt": "x" * 70_000})
    assert resp.status_code == 413


def test_submit_answers_202_with_the_job_and_a_chosen_seed(client: httpx.Client) -> None:
    resp = client.post("/v1/jobs", json=GOOD)
    assert resp.status_code == 202
    job = resp.json()
    assert job["id"].startswith("job_")
    assert len(job["id"]) == 36
    assert resp.headers["location"] == f"/v1/jobs/{job['id']}"
    assert job["status"] == "queued"
    assert 0 <= job["request"]["seed"] < 2**32
    # No worker runs in this test: the job says it waits for one of its model to start.
    waiting = "waiting for a worker of model tiny to start"
    assert job["queue"] == {"position": 1, "eta_s": None, "waiting_for": waiting}
    assert client.get(f"/v1/jobs/{job['id']}").json()["request"] == job["request"]


def test_queue_positions_count_from_the_front(client: httpx.Client) -> None:
    ids = [client.post("/v1/jobs", json=GOOD).json()["id"] for _ in range(3)]
    assert [client.get(f"/v1/jobs/{i}").json()["queue"]["position"] for i in ids] == [1, 2, 3]


def test_missing_or_wrong_key_is_a_401_with_a_challenge(gateway: Gateway) -> None:
    for headers in ({}, {"Authorization": "Bearer nope"}, {"Authorization": "Basic x"}):
        resp = httpx.post(f"{gateway.url}/v1/jobs", json=GOOD, headers=headers)
        assert resp.status_code == 401
        assert resp.headers["www-authenticate"] == "Bearer"


def test_another_tenants_job_is_not_found(gateway: Gateway) -> None:
    with client_for(gateway, ALICE_KEY) as alice, client_for(gateway, BOB_KEY) as bob:
        job_id = alice.post("/v1/jobs", json=GOOD).json()["id"]
        assert bob.get(f"/v1/jobs/{job_id}").status_code == 404
        assert bob.post(f"/v1/jobs/{job_id}/cancel").status_code == 404
        assert bob.get("/v1/jobs").json()["jobs"] == []


def test_list_is_newest_first_paginated_and_filtered(client: httpx.Client) -> None:
    ids = [client.post("/v1/jobs", json=GOOD).json()["id"] for _ in range(5)]
    client.post(f"/v1/jobs/{ids[1]}/cancel")
    seen, cursor = [], None
    while True:
        page = client.get("/v1/jobs", params={"limit": 2, **({"cursor": cursor} if cursor else {})})
        body = page.json()
        seen += [j["id"] for j in body["jobs"]]
        cursor = body["next_cursor"]
        if not cursor:
            break
    assert seen == ids[::-1]
    canceled = client.get("/v1/jobs", params={"status": "canceled"}).json()["jobs"]
    assert [j["id"] for j in canceled] == [ids[1]]
    assert client.get("/v1/jobs", params={"cursor": "garbage"}).status_code == 422


def test_cancel_a_queued_job_then_again_is_a_conflict(client: httpx.Client) -> None:
    job_id = client.post("/v1/jobs", json=GOOD).json()["id"]
    resp = client.post(f"/v1/jobs/{job_id}/cancel")
    assert resp.status_code == 200
    assert resp.json()["status"] == "canceled"
    assert resp.json()["finished_at"] is not None
    again = client.post(f"/v1/jobs/{job_id}/cancel")
    assert again.status_code == 409


def test_unknown_job_is_a_404(client: httpx.Client) -> None:
    resp = client.get("/v1/jobs/job_0000")
    assert resp.status_code == 404
    assert resp.json()["error"]["code"] == "not_found"


def test_health_readiness_docs_and_metrics(client: httpx.Client) -> None:
    assert client.get("/healthz").json() == {"status": "ok"}
    assert client.get("/readyz").json() == {"status": "ready"}
    assert "/v1/jobs" in client.get("/openapi.json").json()["paths"]
    assert client.get("/docs").status_code == 200
    client.post("/v1/jobs", json=GOOD)
    assert 'dq_jobs_queued{model="tiny",priority="normal"} 1.0' in client.get("/metrics").text
    assert client.get("/v1/queue").json()["queued"] == 1


def test_idempotency_key_replays_the_same_job(client: httpx.Client) -> None:
    headers = {"Idempotency-Key": "order-17"}
    first = client.post("/v1/jobs", json=GOOD, headers=headers).json()
    second = client.post("/v1/jobs", json=GOOD, headers=headers).json()
    assert first["id"] == second["id"]
    other = client.post("/v1/jobs", json={**GOOD, "prompt": "a dog"}, headers=headers)
    assert other.status_code == 422
    assert other.json()["error"]["code"] == "idempotency_mismatch"


def test_concurrent_duplicates_make_exactly_one_job(client: httpx.Client) -> None:
    def submit(_: int) -> str:
        headers = {"Idempotency-Key": "burst"}
        return str(client.post("/v1/jobs", json=GOOD, headers=headers).json()["id"])

    with concurrent.futures.ThreadPoolExecutor(20) as pool:
        ids = set(pool.map(submit, range(20)))
    assert len(ids) == 1
    assert len(client.get("/v1/jobs").json()["jobs"]) == 1


def test_a_full_queue_answers_503_with_retry_after(
    env: dict[str, str], gateway_factory: Callable[[dict[str, str]], Gateway]
) -> None:
    gw = gateway_factory({**env, "DQ_MAX_QUEUE": "2"})
    with client_for(gw) as c:
        assert [c.post("/v1/jobs", json=GOOD).status_code for _ in range(2)] == [202, 202]
        full = c.post("/v1/jobs", json=GOOD)
        assert full.status_code == 503
        assert full.json()["error"]["code"] == "queue_full"
        assert int(full.headers["retry-after"]) > 0


def test_redis_down_answers_503_never_202(
    env: dict[str, str],
    gateway_factory: Callable[[dict[str, str]], Gateway],
    tmp_path: Any,
) -> None:
    own = EmbeddedRedis(tmp_path / "r").start()
    gw = gateway_factory({**env, "DQ_REDIS_URL": own.url})
    with client_for(gw) as c:
        assert c.post("/v1/jobs", json=GOOD).status_code == 202
        own.stop()
        for resp in (c.post("/v1/jobs", json=GOOD), c.get("/v1/jobs"), c.get("/readyz")):
            assert resp.status_code == 503
            assert "retry-after" in resp.headers
            assert resp.json()["error"]["code"] == "unavailable"
