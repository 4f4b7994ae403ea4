"""LoRA jobs in a `DQ_ENGINE=step` worker: they run inside the step loop, never mixed, and a LoRA
that cannot be loaded fails its job alone.

One real step worker process (with a real Redis and gateway) serves every test of this module;
each job's images are compared with the batch engine's (`worker.inference.Engine`, the call a
batch worker makes) for the same request, run here in the test process.

The gateway and the worker read different LoRA folders, as two machines might: the gateway's
`bad` is a tiny LoRA, the worker's `bad` one for tiny-sd2 (it does not fit the tiny model), and
only the gateway has `gone`. So both pass the gateway's checks and fail to load in the worker.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
import torch
from PIL.Image import Image

from core.catalog import Catalog
from core.embedded import EmbeddedRedis
from core.jobs import Bucket, JobRequest
from core.settings import Settings
from tests.conftest import Gateway, WorkerProcess, client_for, settings_from, stack_env, wait_for
from tests.test_step_worker import distance, images_of, started
from worker.inference import Engine, Row, load_engine
from worker.loras import AdapterError
from worker.models import build_tiny_lora

Job = dict[str, Any]

BASE: Job = {"prompt": "a lighthouse at dusk", "width": 64, "height": 64, "steps": 4}
INK: Job = {"loras": [{"name": "ink", "scale": 1.0}]}
# A set of two, at other scales: its own loop key.
NEON_INK: Job = {"loras": [{"name": "neon", "scale": 1.0}, {"name": "ink", "scale": 0.5}]}


@dataclass
class Stack:
    """The module's gateway and step worker, and a client on them."""

    gateway: Gateway
    worker: WorkerProcess
    client: httpx.Client

    def submit(self, **body: Any) -> str:
        """A job's id, submitted now."""
        reply = self.client.post("/v1/jobs", json={**BASE, **body})
        assert reply.status_code == 202, reply.text
        return str(reply.json()["id"])

    def end(self, job_id: str) -> Job:
        """The job once it has ended."""
        return wait_for(self.client, job_id, timeout=120)

    def in_batches(self, job_id: str) -> bool:
        """Whether the worker ran the job in batches (the step engine refused it)."""
        return f"job {job_id} runs in batches" in self.worker.log_path.read_text()


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    """The reference engine on one thread, as the worker runs (two threads on a shared two-core
    machine only fight over the cores)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """The gateway's LoRA folder and the worker's."""
    gateway, worker = tmp_path_factory.mktemp("gateway-loras"), tmp_path_factory.mktemp("loras")
    for folder in (gateway, worker):
        build_tiny_lora(folder / "ink.safetensors", "tiny", seed=1)
        build_tiny_lora(folder / "neon.safetensors", "tiny", seed=2)
    build_tiny_lora(gateway / "bad.safetensors", "tiny", seed=3)
    build_tiny_lora(gateway / "gone.safetensors", "tiny", seed=4)
    build_tiny_lora(worker / "bad.safetensors", "tiny-sd2", seed=3)
    return gateway, worker


@pytest.fixture(scope="module")
def stack(
    redis_server: EmbeddedRedis,
    model_cache: Path,
    folders: tuple[Path, Path],
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Stack]:
    """A gateway and one step worker on a clean Redis, for the whole module."""
    tmp = tmp_path_factory.mktemp("step-loras")
    rclient = redis.Redis.from_url(redis_server.url, decode_responses=True)
    rclient.flushall()
    env = stack_env(redis_server.url, model_cache, tmp)
    gateway_loras, worker_loras = folders
    gateway = Gateway(settings_from({**env, "DQ_LORAS": str(gateway_loras)})).start()
    worker_env = {**env, "DQ_LORAS": str(worker_loras), "DQ_ENGINE": "step"}
    worker = WorkerProcess(worker_env, tmp / "worker.log", f"step-loras-{os.getpid()}@test")
    try:
        worker.wait_ready(rclient)
        with client_for(gateway) as client:
            yield Stack(gateway, worker, client)
    finally:
        worker.stop()
        gateway.stop()
        rclient.close()


@pytest.fixture(scope="module")
def batch_engine(model_cache: Path, folders: tuple[Path, Path]) -> Engine:
    """The batch engine over the worker's model and LoRA folder, in this process."""
    _, worker_loras = folders
    catalog = Catalog.from_settings(
        Settings(model="tiny", loras=worker_loras, model_cache=model_cache)
    )
    return load_engine(catalog.get(None), model_cache, catalog.loras, 1 << 30)


def batch_images(engine: Engine, job: Job, **changes: Any) -> list[Image]:
    """The batch engine's images for a job's request (with `changes`), as a batch worker makes
    them."""
    req = JobRequest.model_validate({**job["request"], **changes})
    seed = req.seed or 0
    rows = [
        Row(job["id"], i, req.prompt, req.negative_prompt, seed + i) for i in range(req.num_images)
    ]
    return engine.generate(rows, Bucket.of(req, "tiny"), lambda _step: True)


def assert_stepped(stack: Stack, job: Job) -> None:
    """The job succeeded inside the step engine."""
    assert job["status"] == "succeeded", job.get("error")
    assert job["metrics"]["batch_id"].startswith("step-"), job["metrics"]
    assert not stack.in_batches(job["id"])


def assert_matches(stack: Stack, engine: Engine, job: Job) -> None:
    """The job's images equal the batch engine's within one level of mean absolute difference."""
    made = images_of(stack.gateway, job)
    wanted = batch_images(engine, job)
    assert len(made) == len(wanted)
    for a, b in zip(made, wanted, strict=True):
        assert a.size == b.size
        assert distance(a, b.convert("RGB")) <= 1.0, job["request"]


def test_a_lora_job_runs_inside_the_step_loop_as_the_batch_engine_makes_it(
    stack: Stack, batch_engine: Engine
) -> None:
    job = stack.end(stack.submit(seed=31, num_images=2, **INK))

    assert_stepped(stack, job)
    assert job["metrics"]["batch_size"] == 2
    assert_matches(stack, batch_engine, job)
    # The LoRA did something: without it the batch engine makes other pixels.
    pairs = zip(
        images_of(stack.gateway, job), batch_images(batch_engine, job, loras=[]), strict=True
    )
    assert min(distance(a, b) for a, b in pairs) > 1.0


def test_jobs_of_different_lora_sets_run_together_and_never_mix(
    stack: Stack, batch_engine: Engine
) -> None:
    # A long ink job runs; a job with another set and one with none join its loop meanwhile.
    long = stack.submit(seed=41, steps=40, **INK)
    assert started(stack.client, long)["status"] == "running"
    joined = [stack.submit(seed=42, **NEON_INK), stack.submit(seed=43, steps=5)]
    ended = [stack.end(job_id) for job_id in joined]
    long_job = stack.end(long)

    for job in [long_job, *ended]:
        assert_stepped(stack, job)
        assert_matches(stack, batch_engine, job)
    # They ran at the same time: the short ones finished while the long one was running.
    assert all(job["finished_at"] < long_job["finished_at"] for job in ended)
    # The three sets give three different images for the same seed: a mix would show.
    sets = [INK, NEON_INK, {"loras": []}]
    images = [batch_images(batch_engine, long_job, steps=4, seed=7, **s)[0] for s in sets]
    assert min(distance(images[i], images[j]) for i, j in ((0, 1), (0, 2), (1, 2))) > 1.0


def test_a_lora_that_cannot_be_loaded_fails_its_job_alone(
    stack: Stack, batch_engine: Engine
) -> None:
    long = stack.submit(seed=51, steps=30)
    assert started(stack.client, long)["status"] == "running"
    bad = stack.submit(seed=52, loras=[{"name": "bad", "scale": 1.0}])
    gone = stack.submit(seed=53, loras=[{"name": "gone", "scale": 1.0}])
    fine = stack.submit(seed=54, **INK)
    bad_job, gone_job, fine_job, long_job = map(stack.end, (bad, gone, fine, long))

    # Failed alone, with what the batch engine says for the same request.
    with pytest.raises(AdapterError) as raised:
        batch_images(batch_engine, bad_job)
    assert str(raised.value).startswith("LoRA 'bad' could not be loaded: ")
    assert (bad_job["status"], bad_job["error"]["code"]) == ("failed", "lora_failed")
    message = bad_job["error"]["message"]
    assert message.startswith("the model could not run this job: LoRA 'bad' could not be loaded: ")
    assert (gone_job["status"], gone_job["error"]) == (
        "failed",
        {
            "code": "lora_failed",
            "message": "the model could not run this job: unknown LoRA 'gone': "
            "this worker's LoRA folder has no such file",
        },
    )
    assert not stack.in_batches(bad)
    assert not stack.in_batches(gone)
    # The loop went on: the running job and the one submitted with the failures are intact.
    for job in (long_job, fine_job):
        assert_stepped(stack, job)
        assert_matches(stack, batch_engine, job)
    assert fine_job["finished_at"] < long_job["finished_at"]
