"""Submit → Redis/Celery → batched worker → storage → poll, with real processes."""

from __future__ import annotations

import io
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from PIL import Image

from tests.conftest import Gateway, WorkerProcess, client_for, wait_for

SMALL = {"width": 64, "height": 64, "steps": 4}


def fetch_image(client: httpx.Client, url: str) -> Image.Image:
    """Download and decode an output."""
    resp = client.get(url)
    assert resp.status_code == 200, resp.text
    return Image.open(io.BytesIO(resp.content))


def test_submit_to_png_in_local_storage(
    env: dict[str, str], client: httpx.Client, worker_factory: Callable[..., WorkerProcess]
) -> None:
    worker_factory(env)
    resp = client.post("/v1/jobs", json={"prompt": "a red fox", "seed": 7, **SMALL})
    assert resp.status_code == 202, resp.text
    job = resp.json()
    assert resp.headers["location"] == f"/v1/jobs/{job['id']}"
    assert job["status"] == "queued"
    done = wait_for(client, job["id"])
    assert done["status"] == "succeeded", done
    assert done["metrics"]["attempts"] == 1
    assert done["outputs"][0]["seed"] == 7
    image = fetch_image(client, done["outputs"][0]["url"])
    assert (image.format, image.size) == ("PNG", (64, 64))
    np.asarray(image)


def test_submit_to_webp_in_s3_through_presigned_urls(
    env: dict[str, str],
    s3_endpoint: str,
    gateway_factory: Callable[[dict[str, str]], Gateway],
    worker_factory: Callable[..., WorkerProcess],
) -> None:
    import boto3

    boto3.client("s3", endpoint_url=s3_endpoint).create_bucket(Bucket="images")
    s3_env = {**env, "DQ_STORAGE_URL": "s3://images/out", "DQ_S3_ENDPOINT_URL": s3_endpoint}
    worker_factory(s3_env)
    with client_for(gateway_factory(s3_env)) as client:
        body = {"prompt": "a boat", "output_format": "webp", "num_images": 2, "seed": 40, **SMALL}
        job_id = client.post("/v1/jobs", json=body).json()["id"]
        done = wait_for(client, job_id)
        assert done["status"] == "succeeded", done
        assert [o["seed"] for o in done["outputs"]] == [40, 41]
        url = done["outputs"][1]["url"]
        assert url.startswith(f"{s3_endpoint}/images/out/{job_id}/1.webp?")
        assert "Signature" in url or "X-Amz-Signature" in url
        image = fetch_image(client, url)
        assert (image.format, image.size) == ("WEBP", (64, 64))
    keys = boto3.client("s3", endpoint_url=s3_endpoint).list_objects_v2(Bucket="images")
    assert sorted(o["Key"] for o in keys["Contents"]) == [
        f"out/{job_id}/0.webp",
        f"out/{job_id}/1.webp",
    ]


def submit_all(client: httpx.Client, bodies: list[dict[str, Any]]) -> list[str]:
    """Submit several jobs; their ids in order."""
    return [client.post("/v1/jobs", json=b).json()["id"] for b in bodies]


def test_concurrent_jobs_share_batches_but_never_across_sizes(
    env: dict[str, str], client: httpx.Client, worker_factory: Callable[..., WorkerProcess]
) -> None:
    small = [{"prompt": f"small {i}", **SMALL} for i in range(8)]
    wide = [{"prompt": f"wide {i}", **SMALL, "width": 72} for i in range(4)]
    ids = submit_all(client, small + wide)  # queued before the worker starts: all wait together
    worker_factory(env, DQ_MAX_BATCH_SIZE="4")
    jobs = [wait_for(client, i) for i in ids]
    assert all(j["status"] == "succeeded" for j in jobs)
    batches: dict[str, set[int]] = {}
    for j in jobs:
        batches.setdefault(j["metrics"]["batch_id"], set()).add(j["request"]["width"])
    assert all(len(widths) == 1 for widths in batches.values())
    small_batches = {j["metrics"]["batch_id"] for j in jobs[:8]}
    assert len(small_batches) < 8
    assert max(j["metrics"]["batch_size"] for j in jobs) > 1
    assert all(j["metrics"]["batch_size"] <= 4 for j in jobs)


def pixels(client: httpx.Client, job: dict[str, Any]) -> np.ndarray:
    """A finished job's first image as an array."""
    return np.asarray(fetch_image(client, job["outputs"][0]["url"]).convert("RGB"), dtype=float)


def test_same_prompt_and_seed_give_the_same_image_alone_or_batched(
    env: dict[str, str], client: httpx.Client, worker_factory: Callable[..., WorkerProcess]
) -> None:
    target = {"prompt": "a lighthouse", "seed": 1234, **SMALL}
    others = [{"prompt": f"noise {i}", "seed": i, **SMALL} for i in range(3)]
    batched_ids = submit_all(client, [others[0], target, *others[1:]])
    worker = worker_factory(env)
    batched = [wait_for(client, i) for i in batched_ids]
    assert batched[1]["metrics"]["batch_size"] > 1
    alone = wait_for(client, submit_all(client, [target])[0])
    assert alone["metrics"]["batch_size"] == 1
    diff = np.abs(pixels(client, alone) - pixels(client, batched[1])).mean()
    assert diff < 1.0, diff
    assert np.abs(pixels(client, alone) - pixels(client, batched[0])).mean() > 5
    worker.stop()


def test_a_lone_job_does_not_wait_for_a_long_batch_timeout(
    env: dict[str, str], client: httpx.Client, worker_factory: Callable[..., WorkerProcess]
) -> None:
    worker_factory(env, DQ_BATCH_TIMEOUT_S="30")
    start = time.monotonic()
    job = wait_for(client, submit_all(client, [{"prompt": "quick", **SMALL}])[0], timeout=25)
    assert job["status"] == "succeeded"
    assert time.monotonic() - start < 10


def test_cancel_a_running_job_discards_its_images_and_interrupts(
    env: dict[str, str],
    tmp_path: Path,
    client: httpx.Client,
    worker_factory: Callable[..., WorkerProcess],
) -> None:
    worker = worker_factory(env, DQ_PROGRESS_INTERVAL_S="0")
    job_id = submit_all(client, [{"prompt": "slow", "width": 64, "height": 64, "steps": 150}])[0]
    running = wait_for(client, job_id, done=lambda j: (j["progress"] or {}).get("step", 0) > 1)
    assert running["status"] == "running"
    assert running["progress"]["total_steps"] == 150
    canceled = client.post(f"/v1/jobs/{job_id}/cancel").json()
    assert canceled["status"] == "canceled"
    follow = wait_for(client, submit_all(client, [{"prompt": "next", **SMALL}])[0])
    assert follow["status"] == "succeeded"
    final = client.get(f"/v1/jobs/{job_id}").json()
    assert (final["status"], final["outputs"]) == ("canceled", [])
    assert not list((tmp_path / "images").glob(f"{job_id}/*"))
    worker.stop()
    assert "interrupting the pipeline" in worker.log_path.read_text()


def test_a_queued_job_canceled_never_runs(
    env: dict[str, str], client: httpx.Client, worker_factory: Callable[..., WorkerProcess]
) -> None:
    job_id, other = submit_all(client, [{"prompt": "never", **SMALL}, {"prompt": "yes", **SMALL}])
    assert client.post(f"/v1/jobs/{job_id}/cancel").json()["status"] == "canceled"
    worker_factory(env)
    assert wait_for(client, other)["status"] == "succeeded"
    final = client.get(f"/v1/jobs/{job_id}").json()
    assert (final["status"], final["started_at"], final["metrics"]["attempts"]) == (
        "canceled",
        None,
        0,
    )
