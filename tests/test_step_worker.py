"""`DQ_ENGINE=step` end to end: a real Redis, gateway and worker processes, the tiny model.

A step worker's images equal a batch worker's for the same requests (steps, guidance, schedulers,
sizes, img2img, inpainting and a LoRA set mixed in one loop); a bad input fails alone; a job
submitted while a long one runs joins the loop and finishes first; progress is written step by
step; a cancel takes a running job out with nothing uploaded; a drain (SIGTERM) loses no job.
(LoRA jobs in the loop: tests/test_step_loras.py.)
"""

from __future__ import annotations

import base64
import io
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import httpx
import numpy as np
import pytest
import redis
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from core.jobs import Bucket, JobStatus
from core.storage import FileStore
from core.store import DispatchConfig, JobStore, Ledger
from tests.conftest import Gateway, WorkerProcess, client_for, live_workers, wait_for, wait_until
from tests.test_store import record
from worker.batcher import Limits
from worker.claims import BatchContext
from worker.inference import Engine, Row, StepHook
from worker.models import build_tiny_lora, load_pipeline
from worker.runner import EXIT_LOOP_FAILED, Message
from worker.stepper import StepRunner
from worker.steps import LoopStats

Job = dict[str, Any]


def data_uri(image: Image.Image) -> str:
    """A PNG as a data: URI."""
    out = io.BytesIO()
    image.save(out, format="PNG")
    return "data:image/png;base64," + base64.b64encode(out.getvalue()).decode()


def noise(seed: int, mode: str = "RGB") -> Image.Image:
    """A 64x64 noise picture."""
    rng = np.random.default_rng(seed)
    shape = (64, 64, 3) if mode == "RGB" else (64, 64)
    return Image.fromarray(rng.integers(0, 255, shape, dtype=np.uint8), mode)


def right_half() -> Image.Image:
    """An inpainting mask: paint the right half."""
    mask = np.zeros((64, 64), dtype=np.uint8)
    mask[:, 32:] = 255
    return Image.fromarray(mask)


BASE = {"prompt": "a lighthouse at dusk", "width": 64, "height": 64}
# Different steps, guidance (one unguided), schedulers, sizes and tasks, all in one loop.
MIXED: list[Job] = [
    {"steps": 4, "guidance_scale": 7.5, "seed": 11},
    {"steps": 8, "guidance_scale": 3.0, "scheduler": "euler_a", "seed": 12},
    {"steps": 16, "guidance_scale": 7.5, "scheduler": "dpmpp_2m", "seed": 13},
    {"steps": 6, "guidance_scale": 1.0, "scheduler": "pndm", "seed": 14},
    {"steps": 5, "guidance_scale": 5.0, "num_images": 2, "negative_prompt": "fog", "seed": 15},
    {"steps": 4, "width": 96, "height": 64, "seed": 16},
    {"steps": 8, "task": "img2img", "image": data_uri(noise(1)), "strength": 0.6, "seed": 17},
    {
        "steps": 8,
        "task": "inpaint",
        "image": data_uri(noise(2)),
        "mask": data_uri(right_half()),
        "seed": 19,
    },
    # A LoRA set: its own loop key, in the same loop.
    {"steps": 4, "loras": [{"name": "ink", "scale": 1.0}], "seed": 20},
]
# After the LoRA job: the base weights again.
AFTER: Job = {"steps": 6, "guidance_scale": 7.5, "seed": 24}
UNDECODABLE = "data:image/png;base64," + base64.b64encode(b"<html>not a picture</html>").decode()


def images_of(gateway: Gateway, job: Job) -> list[Image.Image]:
    """A finished job's images."""
    return [
        Image.open(io.BytesIO(httpx.get(gateway.url + o["url"]).content)).convert("RGB")
        for o in job["outputs"]
    ]


def distance(a: Image.Image, b: Image.Image) -> float:
    """Mean absolute difference on the 0..255 scale."""
    return float(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)).mean())


def run_all(client: httpx.Client, bodies: list[Job]) -> list[Job]:
    """Submit every body at once, then wait for each job to end."""
    ids = [client.post("/v1/jobs", json={**BASE, **b}).json()["id"] for b in bodies]
    return [wait_for(client, job_id, timeout=120) for job_id in ids]


@pytest.mark.slow
def test_a_step_workers_images_equal_a_batch_workers(
    env: dict[str, str],
    gateway_factory: Callable[[dict[str, str]], Gateway],
    worker_factory: Callable[..., WorkerProcess],
    rclient: redis.Redis,
    tmp_path: Path,
) -> None:
    build_tiny_lora(tmp_path / "loras" / "ink.safetensors", "tiny", seed=1)
    env = {**env, "DQ_LORAS": str(tmp_path / "loras")}
    gateway = gateway_factory(env)
    stepper = worker_factory(env, DQ_ENGINE="step")
    bad = {"steps": 4, "task": "img2img", "image": UNDECODABLE, "seed": 18}
    with client_for(gateway) as client:
        stepped = run_all(client, [*MIXED, bad]) + run_all(client, [AFTER])
        rates = wait_until(
            lambda: [b.images_per_s for b in live_workers(rclient, env) if b.images_per_s],
            10,
            "the step worker's heartbeat to report images/s",
        )
        stepper.stop()
        worker_factory(env)  # DQ_ENGINE=batch, the default
        batched = run_all(client, [*MIXED, AFTER])
    failed = stepped.pop(len(MIXED))
    assert (failed["status"], failed["error"]["code"]) == ("failed", "input_not_image")
    assert [j["status"] for j in stepped] == ["succeeded"] * (len(MIXED) + 1)
    assert [j["status"] for j in batched] == ["succeeded"] * (len(MIXED) + 1)
    assert all(j["metrics"]["batch_id"].startswith("step-") for j in stepped)
    assert not any(j["metrics"]["batch_id"].startswith("step-") for j in batched)
    assert rates[0] > 0
    for step_job, batch_job in zip(stepped, batched, strict=True):
        pairs = zip(images_of(gateway, step_job), images_of(gateway, batch_job), strict=True)
        for a, b in pairs:
            assert a.size == b.size
            assert distance(a, b) <= 1.0, step_job["request"]


class Watch:
    """The progress steps a job shows while it runs, read on a thread of its own until it ends."""

    def __init__(self, gateway: Gateway, job_id: str) -> None:
        self.seen: set[int] = set()
        self.thread = threading.Thread(target=self._poll, args=(gateway, job_id), daemon=True)
        self.thread.start()

    def _poll(self, gateway: Gateway, job_id: str) -> None:
        deadline = time.monotonic() + 120
        with client_for(gateway) as client:
            while time.monotonic() < deadline:
                job = client.get(f"/v1/jobs/{job_id}").json()
                if job["status"] not in ("queued", "running"):
                    return
                if job["status"] == "running" and job["progress"]:
                    self.seen.add(job["progress"]["step"])
                time.sleep(0.05)

    def steps(self) -> set[int]:
        """The steps seen, once the job has ended."""
        self.thread.join(120)
        return self.seen


def started(client: httpx.Client, job_id: str) -> Job:
    """Wait until a job is running and has taken a step."""
    return wait_for(
        client,
        job_id,
        timeout=60,
        done=lambda j: (
            j["status"] != "queued"
            and (j["status"] != "running" or (j["progress"] or {}).get("step", 0) > 0)
        ),
    )


@pytest.mark.slow
def test_jobs_join_a_running_loop_cancel_out_of_it_and_survive_a_drain(
    env: dict[str, str],
    gateway_factory: Callable[[dict[str, str]], Gateway],
    worker_factory: Callable[..., WorkerProcess],
    tmp_path: Path,
) -> None:
    gateway = gateway_factory(env)
    first = worker_factory(env, DQ_ENGINE="step")
    with client_for(gateway) as client:
        # A long job runs; a short one submitted meanwhile joins its loop and finishes first.
        long = client.post("/v1/jobs", json={**BASE, "steps": 150, "seed": 21}).json()["id"]
        watch = Watch(gateway, long)
        assert started(client, long)["status"] == "running"
        short = client.post("/v1/jobs", json={**BASE, "steps": 4, "seed": 22}).json()["id"]
        short_done = wait_for(client, short, timeout=30)
        assert short_done["status"] == "succeeded"
        assert client.get(f"/v1/jobs/{long}").json()["status"] == "running"
        # A second long job is canceled while it runs: it leaves, nothing of it is uploaded.
        victim = client.post("/v1/jobs", json={**BASE, "steps": 150, "seed": 23}).json()["id"]
        assert started(client, victim)["status"] == "running"
        assert client.post(f"/v1/jobs/{victim}/cancel").status_code == 200
        steps = watch.steps()
        long_done = wait_for(client, long, timeout=60)
        canceled = wait_for(client, victim, timeout=30)
        # A drain: jobs that started finish here, those that had not go back to their line.
        batch = [
            client.post("/v1/jobs", json={**BASE, "steps": 40, "seed": 30 + i}).json()["id"]
            for i in range(8)
        ]
        started(client, batch[0])
        assert first.stop() == 0
        after_drain = [client.get(f"/v1/jobs/{j}").json() for j in batch]
        second = worker_factory(env, DQ_ENGINE="step")
        drained = [wait_for(client, j, timeout=120) for j in batch]
    assert long_done["status"] == "succeeded"
    assert short_done["finished_at"] < long_done["finished_at"]
    check_step_rows(gateway)
    assert len({s for s in steps if 0 < s < 150}) >= 5, sorted(steps)  # step by step
    assert (canceled["status"], canceled["outputs"]) == ("canceled", [])
    assert not list((tmp_path / "images").rglob(f"{victim}/*.png"))
    assert {j["status"] for j in after_drain} <= {"succeeded", "queued"}
    assert [j["status"] for j in drained] == ["succeeded"] * len(batch)
    by = {j["id"]: j["metrics"]["worker"] for j in drained}
    assert first.name in by.values()  # what started before the drain finished there
    handed_back = [j for j in drained if j["metrics"]["worker"] == second.name]
    assert handed_back, "every job finished before the drain"
    # Claimed into the engine's line, then handed back (2); or still in the worker's buffer,
    # never claimed, undispatched (1).
    assert {j["metrics"]["attempts"] for j in handed_back} <= {1, 2}


def check_step_rows(gateway: Gateway) -> None:
    """`dq_step_rows`: every step of the long job was a call; alone it had two rows (one guided
    image), with the short one four; never more than the loop's 16."""

    def family() -> dict[str, float]:
        text = httpx.get(f"{gateway.url}/metrics", timeout=10).text
        found = {}
        for f in text_string_to_metric_families(text):
            if f.name == "dq_step_rows":
                for sample in f.samples:
                    found[sample.name + sample.labels.get("le", "")] = sample.value
        return found

    wait_until(lambda: family().get("dq_step_rows_count", 0) >= 150, 10, "the loop's calls")
    rows = family()
    assert rows["dq_step_rows_bucket2"] >= 1
    assert rows["dq_step_rows_bucket4"] > rows["dq_step_rows_bucket2"]
    assert rows["dq_step_rows_bucket16"] == rows["dq_step_rows_count"]
    assert 2 <= rows["dq_step_rows_sum"] / rows["dq_step_rows_count"] <= 16


# --- in one process: the fallback for a model the step engine does not know, the loop watch ---


class OtherFamily:
    """A loaded model of a family the step engine does not know (its images: the tiny model's)."""

    def __init__(self, engine: Engine) -> None:
        self.engine, self.pipe, self.calls = engine, SimpleNamespace(), 0

    def generate(self, rows: Sequence[Row], bucket: Bucket, on_step: StepHook) -> list[Any]:
        """The tiny model's call, counted."""
        self.calls += 1
        return self.engine.generate(rows, bucket, on_step)


class Wedged:
    """A step engine stuck in a step: a job open, its last step long ago."""

    def __init__(self, ago_s: float) -> None:
        self.stats = LoopStats(last_step_at=time.monotonic() - ago_s)

    def open_jobs(self) -> int:
        """One job in it."""
        return 1

    def snapshot(self) -> LoopStats:
        """Its figures."""
        return self.stats


def step_runner(rclient: redis.Redis, engine: Any, tmp_path: Path, **kwargs: Any) -> StepRunner:
    """A step runner over `engine`, on a ledger whose window holds every job."""
    store = JobStore(rclient, Ledger(dispatch=DispatchConfig(margin=50)))
    return StepRunner(
        rclient,
        store,
        Limits(max_rows=4, max_pixels=10**9, timeout_s=0.0),
        lambda: BatchContext(store, FileStore(tmp_path, b"k"), engine, "w@test", 30.0, 0.0),
        name="w@test",
        model="tiny",
        queue="dq.jobs.tiny",
        heartbeat_s=0.1,
        prefetch=8,
        **kwargs,
    )


def test_a_family_the_step_engine_does_not_know_is_served_in_batches(
    rclient: redis.Redis, model_cache: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    other = OtherFamily(Engine(load_pipeline("tiny", model_cache)))
    runner = step_runner(rclient, other, tmp_path)
    job = record(model="tiny", steps=2)
    runner.store.submit(job)

    def status() -> JobStatus | None:
        found = runner.store.get(job.id)
        return None if found is None else found.status

    runner.start()
    try:
        runner.offer(job.id, Message(job.id, *[lambda: None] * 4))
        wait_until(lambda: (s := status()) is not None and s.terminal, 60, "the job to end")
    finally:
        runner.stop(10)
    assert status() is JobStatus.SUCCEEDED
    assert (runner.engine, other.calls) == (None, 1)
    assert "the step engine does not run SimpleNamespace" in caplog.text


def test_a_wedged_step_loop_ends_the_worker(rclient: redis.Redis, tmp_path: Path) -> None:
    exits: list[int] = []
    runner = step_runner(rclient, None, tmp_path, exit=exits.append)
    runner.ctx = runner.make_context()
    runner.looked_at = time.time() - 1
    for ago_s, expected in ((1.0, []), (300.0, [EXIT_LOOP_FAILED])):
        runner.engine = Wedged(ago_s)  # type: ignore[assignment]
        runner.submitted_at = time.monotonic() - 400
        runner._stamp()
        assert abs(time.time() - (runner.loop_at or 0) - ago_s) < 1
        runner._watch_loop()
        assert exits == expected
