"""Admission and dispatch end to end: keys, roles, limits and fair order, with real processes."""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from datetime import datetime

import httpx
import pytest
import redis

from core.embedded import free_port
from core.processes import stop_process
from core.tenants import KeyStore
from tests.conftest import (
    BOB_KEY,
    ROOT,
    Gateway,
    WorkerProcess,
    client_for,
    wait_for,
    wait_until,
)

TINY = {"prompt": "a kite", "width": 64, "height": 64, "steps": 2}


def dq_keys(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    """`dq keys …`, as an operator runs it."""
    return subprocess.run(
        [sys.executable, "-m", "core.cli", "keys", *args],
        cwd=ROOT,
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=60,
    )


def made_key(out: subprocess.CompletedProcess[str]) -> tuple[str, str]:
    """The key and its id from `dq keys create`'s output."""
    assert out.returncode == 0, out.stderr
    fields = {}
    for line in out.stdout.splitlines():
        name, _, value = line.partition(":")
        if value.strip():
            fields[name] = value.split()[0]
    return fields["key"], fields["id"]


@pytest.fixture
def managed_env(env: dict[str, str]) -> dict[str, str]:
    """No static keys: every key is a managed one (and room for the 401s these tests count)."""
    return {**env, "DQ_API_KEYS": "", "DQ_AUTH_FAILURES": "1000"}


@pytest.fixture
def two_processes(managed_env: dict[str, str]) -> Iterator[str]:
    """`python -m api --workers 2`: two gateway processes on one port."""
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "api", "--port", str(port), "--workers", "2"],
        cwd=ROOT,
        env={**os.environ, **managed_env},
    )
    url = f"http://127.0.0.1:{port}"
    wait_until(lambda: _answers(url), 60, "the gateway processes")
    yield url
    stop_process(process, 30)


def _answers(url: str) -> bool:
    try:
        return httpx.get(f"{url}/healthz", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


def statuses(url: str, key: str, n: int = 24) -> set[int]:
    """GET /v1/queue on `n` fresh connections (spread over the processes by the kernel)."""
    auth = {"Authorization": f"Bearer {key}"}
    return {httpx.get(f"{url}/v1/queue", headers=auth, timeout=10).status_code for _ in range(n)}


def test_a_key_is_made_used_rotated_and_revoked_everywhere_within_a_second(
    managed_env: dict[str, str], rclient: redis.Redis, two_processes: str
) -> None:
    old, old_id = made_key(dq_keys(managed_env, "create", "carol", "--rate", "50"))
    assert statuses(two_processes, old) == {200}
    new, new_id = made_key(dq_keys(managed_env, "create", "carol"))  # a rotation: two live
    third = dq_keys(managed_env, "create", "carol")
    assert third.returncode == 2
    assert "revoke one first" in third.stderr
    assert statuses(two_processes, new) == {200}
    assert statuses(two_processes, old) == {200}
    listed = dq_keys(managed_env, "list").stdout
    assert {old_id, new_id} <= set(listed.split())
    assert not {old, new} & set(listed.split())  # never the keys themselves
    assert dq_keys(managed_env, "revoke", old_id).returncode == 0
    wait_until(lambda: statuses(two_processes, old, 8) == {401}, 5, "the old key refused")
    assert statuses(two_processes, old) == {401}
    assert statuses(two_processes, new) == {200}
    # How fast: from the store's revocation (the CLI's start-up left out) to a round of 8 fresh
    # connections all refused, less the time such a round takes on this machine.
    started = time.monotonic()
    assert statuses(two_processes, new, 8) == {200}
    round_s = time.monotonic() - started
    revoked_at = time.monotonic()
    assert KeyStore(rclient).revoke(new_id)
    wait_until(lambda: statuses(two_processes, new, 8) == {401}, 5, "the new key refused")
    refused_within = time.monotonic() - revoked_at - round_s
    assert refused_within < 1.0
    assert statuses(two_processes, new) == {401}
    stored = " ".join(str(v) for v in rclient.hvals("dq:apikeys"))
    assert old not in stored
    assert new not in stored
    print(f"\nrevoked key refused by both gateway processes {refused_within * 1000:.0f} ms after")


def test_admin_routes_need_an_admin_key_and_tenants_stay_apart(
    env: dict[str, str],
    gateway_factory: Callable[[dict[str, str]], Gateway],
) -> None:
    admin_key = "admin-key-0123456789abcdefghij"
    gateway = gateway_factory({**env, "DQ_API_KEYS": f"{env['DQ_API_KEYS']},ops:{admin_key}:admin"})
    with (
        client_for(gateway) as alice,
        client_for(gateway, BOB_KEY) as bob,
        client_for(gateway, admin_key) as admin,
    ):
        job = alice.post("/v1/jobs", json=TINY).json()
        for method, path in (
            ("GET", "/v1/admin/queue"),
            ("POST", "/v1/admin/tenants/alice/cancel"),
            ("POST", "/v1/admin/dispatch/pause"),
            ("POST", "/v1/admin/dispatch/resume"),
        ):
            assert bob.request(method, path).status_code == 403, path
        for method, path in (
            ("GET", f"/v1/jobs/{job['id']}"),
            ("GET", f"/v1/jobs/{job['id']}/events"),
            ("POST", f"/v1/jobs/{job['id']}/cancel"),
            ("POST", f"/v1/jobs/{job['id']}/webhooks/redeliver"),
            ("DELETE", f"/v1/jobs/{job['id']}"),
        ):
            assert bob.request(method, path).status_code == 404, path
        assert bob.get("/v1/queue").json()["by_tenant"] is None
        whole = admin.get("/v1/admin/queue").json()
        line = whole["models"]["tiny"]["classes"]["normal"]
        assert line["waiting"] + whole["models"]["tiny"]["dispatched"] == 1
        assert admin.get("/v1/queue").json()["by_tenant"] in ({"alice": 1}, {})
        more = [alice.post("/v1/jobs", json=TINY).json()["id"] for _ in range(3)]
        assert admin.post("/v1/admin/dispatch/pause").json() == {"paused": ["*"]}
        held = alice.post("/v1/jobs", json=TINY).json()
        assert held["status"] == "queued"
        assert admin.post("/v1/admin/tenants/alice/cancel").json()["canceled"] == 5
        assert {alice.get(f"/v1/jobs/{j}").json()["status"] for j in [job["id"], *more]} == {
            "canceled"
        }
        assert admin.post("/v1/admin/dispatch/resume").json() == {"paused": []}
        other = bob.post("/v1/jobs", json=TINY).json()
        assert admin.post(f"/v1/jobs/{other['id']}/cancel").json()["status"] == "canceled"


def test_limits_answer_429_with_retry_after_and_ratelimit_headers(
    env: dict[str, str],
    rclient: redis.Redis,
    gateway_factory: Callable[[dict[str, str]], Gateway],
) -> None:
    KeyStore(rclient).set_limits("alice", {"rate": 2, "burst": 2})
    KeyStore(rclient).set_limits("bob", {"max_queued": 2, "max_job_units": 0.01})
    gateway = gateway_factory(env)
    with client_for(gateway) as alice, client_for(gateway, BOB_KEY) as bob:
        answers = [alice.post("/v1/jobs", json=TINY) for _ in range(3)]
        assert [a.status_code for a in answers] == [202, 202, 429]
        refused = answers[2]
        error = refused.json()["error"]
        assert (error["code"], error["limit"]) == ("rate_limited", "rate")
        assert refused.headers["retry-after"] == "1"
        assert refused.headers["ratelimit-policy"] == '"rate";q=2;w=1'
        assert refused.headers["ratelimit"].startswith('"rate";r=0;t=')
        time.sleep(error["retry_after_s"])
        assert alice.post("/v1/jobs", json=TINY).status_code == 202
        queued = [bob.post("/v1/jobs", json=TINY).status_code for _ in range(3)]
        assert queued == [202, 202, 429]
        big = bob.post("/v1/jobs", json={**TINY, "width": 512, "height": 512, "steps": 25})
        assert big.status_code == 422
        assert big.json()["error"]["code"] == "job_too_large"


def test_reads_have_a_limit_of_their_own_and_a_quota_counts_work_units(
    env: dict[str, str],
    rclient: redis.Redis,
    gateway_factory: Callable[[dict[str, str]], Gateway],
) -> None:
    store = KeyStore(rclient)
    store.set_limits("alice", {"read_rate": 0.5, "read_burst": 3})
    store.set_limits("bob", {"quota_units": 0.002, "quota_window_s": 3600})
    gateway = gateway_factory(env)
    with client_for(gateway) as alice, client_for(gateway, BOB_KEY) as bob:
        job = alice.post("/v1/jobs", json=TINY).json()
        reads = [alice.get(f"/v1/jobs/{job['id']}") for _ in range(4)]
        assert [r.status_code for r in reads] == [200, 200, 200, 429]
        refused = reads[3]
        assert refused.json()["error"]["limit"] == "reads"
        assert refused.headers["ratelimit-policy"].startswith('"reads";q=3;')
        assert int(refused.headers["retry-after"]) >= 1
        # Polling used up alice's reads, not her submits; bob's reads are his own.
        assert alice.post("/v1/jobs", json=TINY).status_code == 202
        assert bob.get("/v1/jobs?limit=5").status_code == 200
        # A TINY job is 0.00125 work units (64 x 64, 2 steps, guided): the second passes 0.002.
        first, second = (bob.post("/v1/jobs", json=TINY) for _ in range(2))
        assert (first.status_code, second.status_code) == (202, 429)
        error = second.json()["error"]
        assert (error["code"], error["limit"]) == ("rate_limited", "quota")
        assert second.headers["ratelimit-policy"] == '"quota";q=0.002;w=3600'
        to_window_end = 3600 - time.time() % 3600  # the quota's fixed window ends on the hour
        assert abs(int(second.headers["retry-after"]) - to_window_end) <= 2


@pytest.mark.slow
def test_a_light_tenant_runs_before_a_heavy_tenants_fortieth_job(
    env: dict[str, str],
    gateway: Gateway,
    worker_factory: Callable[..., WorkerProcess],
) -> None:
    worker_factory(env)
    with client_for(gateway) as alice, client_for(gateway, BOB_KEY) as bob:
        heavy = [alice.post("/v1/jobs", json=TINY).json()["id"] for _ in range(200)]
        light = [bob.post("/v1/jobs", json=TINY).json()["id"] for _ in range(5)]
        done = {j: wait_for(bob if j in light else alice, j, timeout=300) for j in light + heavy}
    finished = sorted(done, key=lambda j: datetime.fromisoformat(done[j]["finished_at"]))
    fortieth = finished.index(heavy[39])
    assert max(finished.index(j) for j in light) < fortieth
    print(f"\nlight tenant's last job finished {max(finished.index(j) for j in light) + 1}th")


@pytest.mark.slow
def test_weights_three_to_one_serve_work_three_to_one(
    env: dict[str, str],
    rclient: redis.Redis,
    gateway: Gateway,
    worker_factory: Callable[..., WorkerProcess],
) -> None:
    KeyStore(rclient).set_limits("alice", {"weight": 3})
    with client_for(gateway) as alice, client_for(gateway, BOB_KEY) as bob:
        ids: dict[str, list[str]] = {"alice": [], "bob": []}
        for _ in range(60):  # both flood before a worker runs
            ids["alice"].append(alice.post("/v1/jobs", json=TINY).json()["id"])
            ids["bob"].append(bob.post("/v1/jobs", json=TINY).json()["id"])
        worker_factory(env)
        everyone = ids["alice"] + ids["bob"]
        done = {j: wait_for(alice if j in ids["alice"] else bob, j, 300) for j in everyone}
    finished = sorted(done, key=lambda j: datetime.fromisoformat(done[j]["finished_at"]))
    window = finished[10:70]  # past the first dispatch window, while both still have work
    served = sum(1 for j in window if j in ids["alice"]) / max(
        1, sum(1 for j in window if j in ids["bob"])
    )
    assert served == pytest.approx(3.0, rel=0.15)
    print(f"\nweights 3:1 served {served:.2f}:1 (jobs of equal work)")


@pytest.mark.slow
def test_high_overtakes_and_low_still_runs_within_its_bound(
    env: dict[str, str],
    gateway_factory: Callable[[dict[str, str]], Gateway],
    worker_factory: Callable[..., WorkerProcess],
) -> None:
    bound = 3.0
    env = {**env, "DQ_LOW_PRIORITY_MAX_WAIT_S": str(bound)}
    gateway = gateway_factory(env)
    worker_factory(env)
    with client_for(gateway) as alice, client_for(gateway, BOB_KEY) as bob:
        normal = [alice.post("/v1/jobs", json=TINY).json()["id"] for _ in range(60)]
        high = bob.post("/v1/jobs", json={**TINY, "priority": "high"}).json()["id"]
        low = bob.post("/v1/jobs", json={**TINY, "priority": "low"}).json()["id"]
        more: list[str] = []
        while bob.get(f"/v1/jobs/{low}").json()["status"] != "succeeded":
            more.append(alice.post("/v1/jobs", json=TINY).json()["id"])  # a steady flood
            time.sleep(0.1)
            assert len(more) < 600, "the low job never ran"
        jobs = {
            j: wait_for(alice if j != high and j != low else bob, j, 300)
            for j in [*normal, high, low]
        }
    finished = sorted(jobs, key=lambda j: datetime.fromisoformat(jobs[j]["finished_at"]))
    assert finished.index(high) < 20  # ahead of the 40 normal jobs still waiting behind it
    waited = (
        datetime.fromisoformat(jobs[low]["started_at"])
        - datetime.fromisoformat(jobs[low]["created_at"])
    ).total_seconds()
    assert waited < bound + 10  # its bound, plus the dispatch window ahead of it
    print(f"\nhigh finished {finished.index(high) + 1}th of 62; low started after {waited:.1f} s")


@pytest.mark.slow
def test_queue_position_and_eta_hold_on_a_steady_queue(
    env: dict[str, str],
    gateway: Gateway,
    worker_factory: Callable[..., WorkerProcess],
) -> None:
    worker_factory(env)
    with client_for(gateway) as alice, client_for(gateway, BOB_KEY) as bob:
        warm = [alice.post("/v1/jobs", json=TINY).json()["id"] for _ in range(24)]
        for job_id in warm:  # the worker measures its throughput on these
            wait_for(alice, job_id, timeout=120)
        ids = {"alice": [], "bob": []}  # type: dict[str, list[str]]
        for i in range(40):
            tenant, client = ("alice", alice) if i % 4 else ("bob", bob)
            ids[tenant].append(client.post("/v1/jobs", json=TINY).json()["id"])
        asked_at = time.time()
        said = {j: alice.get(f"/v1/jobs/{j}").json()["queue"] for j in ids["alice"]}
        said |= {j: bob.get(f"/v1/jobs/{j}").json()["queue"] for j in ids["bob"]}
        done = {
            j: wait_for(alice if j in ids["alice"] else bob, j, timeout=300)
            for j in ids["alice"] + ids["bob"]
        }
    finished = sorted(done, key=lambda j: datetime.fromisoformat(done[j]["finished_at"]))
    deep = [j for j in finished[12:] if said[j] is not None]  # past the batches under way
    position_errors = [
        abs(said[j]["position"] - (finished.index(j) + 1)) / (finished.index(j) + 1) for j in deep
    ]
    eta_errors, timeline = [], []
    for j in deep:
        took = datetime.fromisoformat(done[j]["finished_at"]).timestamp() - asked_at
        eta_errors.append(abs(said[j]["eta_s"] - took) / took)
        timeline.append((said[j]["eta_s"], round(took, 2)))
    assert statistics.median(position_errors) <= 0.2
    assert statistics.median(eta_errors) <= 0.2, timeline  # (said, took)
    print(
        f"\nposition within {statistics.median(position_errors):.0%} (median), "
        f"ETA within {statistics.median(eta_errors):.0%} (median) of what happened"
    )
