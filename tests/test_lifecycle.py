"""A job's deadline, longest run, retention and deletion, end to end (real processes)."""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path

import boto3
import httpx
import pytest
import redis

from core import keys
from core.store import Change, JobStore, Ledger
from core.tenants import KeyStore
from tests.conftest import BOB_KEY, Gateway, WorkerProcess, client_for, settings_from, wait_for

QUICK = {"prompt": "a kite", "width": 64, "height": 64, "steps": 2}
LONG = {"prompt": "a long one", "width": 64, "height": 64, "steps": 150, "num_images": 4}


@pytest.fixture
def fast_env(env: dict[str, str]) -> dict[str, str]:
    """Sweeps twice a second."""
    return {**env, "DQ_SWEEP_INTERVAL_S": "0.5"}


def runs_of(worker: WorkerProcess, job_id: str) -> int:
    """Pipeline calls the worker logged for a job."""
    lines = worker.log_path.read_text().splitlines()
    return sum(1 for line in lines if "ran batch of jobs" in line and job_id in line)


def test_a_queued_job_past_its_deadline_never_runs(
    fast_env: dict[str, str],
    gateway_factory: Callable[[dict[str, str]], Gateway],
    worker_factory: Callable[..., WorkerProcess],
) -> None:
    with client_for(gateway_factory(fast_env)) as client:
        late = client.post("/v1/jobs", json={**QUICK, "deadline_s": 0.5}).json()
        header = client.post("/v1/jobs", json=QUICK, headers={"Cancel-After": "300ms"}).json()
        bad = client.post("/v1/jobs", json=QUICK, headers={"Cancel-After": "soon"})
        assert late["deadline_at"] is not None
        time.sleep(0.6)  # both deadlines pass while no worker runs
        worker = worker_factory(fast_env)
        on_time = client.post("/v1/jobs", json={**QUICK, "deadline_s": 60}).json()
        for job in (late, header):
            done = wait_for(client, job["id"])
            assert (done["status"], done["error"]["code"]) == ("failed", "deadline_exceeded")
            assert done["metrics"]["attempts"] == 0
        assert wait_for(client, on_time["id"])["status"] == "succeeded"
    assert (bad.status_code, bad.json()["error"]["field"]) == (422, "Cancel-After")
    assert runs_of(worker, late["id"]) == runs_of(worker, header["id"]) == 0


def test_a_running_job_past_its_deadline_stops_and_stores_nothing(
    fast_env: dict[str, str],
    client: httpx.Client,
    worker_factory: Callable[..., WorkerProcess],
    tmp_path: Path,
) -> None:
    worker_factory(fast_env)
    job = client.post("/v1/jobs", json={**LONG, "deadline_s": 2}).json()
    running = wait_for(client, job["id"], done=lambda j: j["status"] != "queued")
    assert running["status"] == "running"
    done = wait_for(client, job["id"])
    assert (done["status"], done["error"]["code"]) == ("failed", "deadline_exceeded")
    stopped_after = datetime.fromisoformat(done["finished_at"]) - datetime.fromisoformat(
        done["created_at"]
    )
    assert stopped_after.total_seconds() < 8  # the whole job takes far longer than that
    assert not list((tmp_path / "images").rglob(f"{job['id']}/*.png"))
    # The worker goes on.
    after = client.post("/v1/jobs", json=QUICK).json()
    assert wait_for(client, after["id"])["status"] == "succeeded"


@pytest.mark.parametrize("where", ["setting", "catalog"])
def test_a_job_running_longer_than_its_model_allows_fails_and_the_worker_goes_on(
    where: str,
    fast_env: dict[str, str],
    client: httpx.Client,
    worker_factory: Callable[..., WorkerProcess],
    tmp_path: Path,
) -> None:
    if where == "setting":
        worker_factory(fast_env, DQ_MAX_RUN_S="1.5")
    else:  # the model's own entry; the deployment's setting is more generous
        catalog = tmp_path / "models.toml"
        catalog.write_text('default = "tiny"\n[models.tiny]\nsource = "tiny"\nmax_run_s = 1.5\n')
        worker_factory(fast_env, DQ_MODELS=str(catalog), DQ_MAX_RUN_S="600")
    long = client.post("/v1/jobs", json=LONG).json()
    done = wait_for(client, long["id"])
    assert (done["status"], done["error"]["code"]) == ("failed", "run_timeout")
    quick = client.post("/v1/jobs", json=QUICK).json()
    assert wait_for(client, quick["id"])["status"] == "succeeded"


def test_delete_removes_the_images_and_the_record_and_old_urls_fail(
    env: dict[str, str],
    client: httpx.Client,
    gateway: Gateway,
    worker_factory: Callable[..., WorkerProcess],
    tmp_path: Path,
) -> None:
    worker_factory(env)
    job = client.post("/v1/jobs", json={**QUICK, "num_images": 2}).json()
    done = wait_for(client, job["id"])
    urls = [gateway.url + o["url"] for o in done["outputs"]]  # relative without DQ_PUBLIC_URL
    assert [httpx.get(u).status_code for u in urls] == [200, 200]
    assert client.delete(f"/v1/jobs/{job['id']}").status_code == 204
    assert not (tmp_path / "images" / job["id"]).exists()
    assert [httpx.get(u).status_code for u in urls] == [404, 404]
    assert client.get(f"/v1/jobs/{job['id']}").status_code == 404
    assert client.delete(f"/v1/jobs/{job['id']}").status_code == 404
    assert job["id"] not in [j["id"] for j in client.get("/v1/jobs").json()["jobs"]]
    with client_for(gateway, BOB_KEY) as bob:
        other = bob.post("/v1/jobs", json=QUICK).json()
    assert client.delete(f"/v1/jobs/{other['id']}").status_code == 404  # another tenant's


def test_delete_removes_the_objects_from_s3(
    env: dict[str, str],
    s3_endpoint: str,
    gateway_factory: Callable[[dict[str, str]], Gateway],
    worker_factory: Callable[..., WorkerProcess],
) -> None:
    s3 = boto3.client("s3", endpoint_url=s3_endpoint)
    s3.create_bucket(Bucket="deleting")
    env = {**env, "DQ_STORAGE_URL": "s3://deleting/out", "DQ_S3_ENDPOINT_URL": s3_endpoint}
    worker_factory(env)
    with client_for(gateway_factory(env)) as client:
        job = client.post("/v1/jobs", json=QUICK).json()
        done = wait_for(client, job["id"])
        assert httpx.get(done["outputs"][0]["url"]).status_code == 200
        queued = client.post("/v1/jobs", json={**QUICK, "prompt": "never mind"}).json()
        assert client.delete(f"/v1/jobs/{job['id']}").status_code == 204
        assert client.delete(f"/v1/jobs/{queued['id']}").status_code == 204  # canceled, then gone
    listed = s3.list_objects_v2(Bucket="deleting", Prefix=f"out/{job['id']}/")
    assert listed.get("KeyCount", 0) == 0
    assert httpx.get(done["outputs"][0]["url"]).status_code == 404


def test_a_finished_job_shows_when_it_expires_by_its_tenants_retention(
    env: dict[str, str],
    client: httpx.Client,
    rclient: redis.Redis,
    worker_factory: Callable[..., WorkerProcess],
) -> None:
    KeyStore(rclient).set_limits("alice", {"retention_s": 90})
    worker_factory(env)
    job = client.post("/v1/jobs", json=QUICK).json()
    assert job["expires_at"] is None
    done = wait_for(client, job["id"])
    kept = datetime.fromisoformat(done["expires_at"]) - datetime.fromisoformat(done["finished_at"])
    assert 85 <= kept.total_seconds() <= 95
    assert 85 <= rclient.ttl(keys.job(job["id"])) <= 90


def test_the_gateway_alone_sweeps_deadlines_and_expired_leases(
    fast_env: dict[str, str],
    gateway_factory: Callable[[dict[str, str]], Gateway],
    rclient: redis.Redis,
) -> None:
    # No worker, no scaler: as with KEDA and every worker scaled to zero.
    with client_for(gateway_factory(fast_env)) as client:
        late = client.post("/v1/jobs", json={**QUICK, "deadline_s": 0.5}).json()
        orphan = client.post("/v1/jobs", json=QUICK).json()
        # A worker took `orphan` and died: its lease ran out.
        claim = Change("claim", orphan["id"], worker="gone@x", lease=time.time() - 1)
        assert JobStore(rclient, Ledger.of(settings_from(fast_env))).change(claim).ok
        done = wait_for(client, late["id"], timeout=30)
        back = wait_for(client, orphan["id"], 30, done=lambda j: j["status"] == "queued")
    assert (done["status"], done["error"]["code"]) == ("failed", "deadline_exceeded")
    assert (back["status"], back["metrics"]["attempts"]) == ("queued", 1)
