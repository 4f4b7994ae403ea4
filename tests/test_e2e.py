"""Submit → Redis/Celery → batched worker → storage → poll, with real processes."""

from __future__ import annotations

import io
from collections.abc import Callable

import httpx
import numpy as np
from PIL import Image

from tests.conftest import WorkerProcess, wait_for

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
