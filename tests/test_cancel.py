"""Canceling work nobody wants: a call that will not stop is abandoned; a job larger than the
pixel budget runs in several calls, never one that holds more (real Redis, the tiny pipeline)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytest
import redis
from PIL.Image import Image

from core.jobs import Bucket, JobStatus
from core.records import JobRecord
from core.storage import FileStore
from core.store import Change, DispatchConfig, JobStore, Ledger
from tests.conftest import wait_until
from tests.test_store import record
from worker.batch import run_batch
from worker.batcher import Limits
from worker.claims import BatchContext
from worker.inference import Engine, Row, StepHook
from worker.models import load_pipeline
from worker.runner import EXIT_ABANDONED, Message, Runner, Supervision


@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory) -> Engine:
    """The tiny pipeline, loaded once for the module."""
    return Engine(load_pipeline("tiny", tmp_path_factory.mktemp("models")))


class CountingEngine:
    """The real engine, noting the rows of every call."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.calls: list[int] = []

    def generate(self, rows: Sequence[Row], bucket: Bucket, on_step: StepHook) -> list[Image]:
        """Note the call's rows, then run it."""
        self.calls.append(len(rows))
        return self.engine.generate(rows, bucket, on_step)


class EndlessStep:
    """An engine whose first denoising step never ends (as one step of a huge job on a slow
    device can take minutes): it reports nothing and returns only when released."""

    def __init__(self) -> None:
        self.started = threading.Event()
        self.release = threading.Event()

    def generate(self, rows: Sequence[Row], bucket: Bucket, on_step: StepHook) -> list[Image]:
        """Block until released."""
        self.started.set()
        self.release.wait(120)
        raise RuntimeError("released")


class SlowSteps:
    """An engine taking steps of 0.3 s that stops when told to (as the pipeline does)."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.steps = 0

    def generate(self, rows: Sequence[Row], bucket: Bucket, on_step: StepHook) -> list[Image]:
        """Step until the hook says no one wants the rows, then finish as the pipeline would."""
        for step in range(1, 60):
            time.sleep(0.3)
            self.steps = step
            if not on_step(step):
                break
        return self.engine.generate(rows, bucket, lambda _: True)


def wide(rclient: redis.Redis) -> JobStore:
    """A ledger whose window holds every job these tests submit."""
    return JobStore(rclient, Ledger(dispatch=DispatchConfig(margin=50)))


def watched_runner(
    rclient: redis.Redis, store: JobStore, engine: Any, tmp_path: Path, exits: list[int]
) -> Runner:
    """A runner of one row per call whose canceled calls have 0.5 s of grace; exits recorded."""
    return Runner(
        rclient,
        store,
        Limits(max_rows=1, max_pixels=10**9, timeout_s=0.0),
        lambda: BatchContext(store, FileStore(tmp_path, b"k"), engine, "w@test", 30.0, 0.0),
        name="w@test",
        model="tiny",
        queue="dq.jobs.tiny",
        heartbeat_s=0.1,
        prefetch=8,
        supervision=Supervision(cancel_grace_s=0.5),
        exit=exits.append,
    )


def test_a_job_larger_than_the_pixel_budget_runs_in_calls_within_it(
    rclient: redis.Redis, engine: Engine, tmp_path: Path
) -> None:
    store = wide(rclient)
    counting = CountingEngine(engine)
    ctx = BatchContext(store, FileStore(tmp_path, b"k"), counting, "w", 30.0, 0.0)
    rec = record(model="tiny", num_images=4, steps=2)
    store.submit(rec)
    limits = Limits(max_rows=4, max_pixels=64 * 64, timeout_s=0.0)  # one 64x64 image per call
    records = [r for r in store.get_many([rec.id]) if isinstance(r, JobRecord)]
    bucket = Bucket.of(records[0].request, "tiny")
    assert run_batch(ctx, records, bucket, limits.capacity(bucket)) == 4
    assert counting.calls == [1, 1, 1, 1]
    done = store.get(rec.id)
    assert done is not None
    assert (done.status, len(done.outputs)) == (JobStatus.SUCCEEDED, 4)
    # The same seeds as one call of four would have used: seed, seed + 1, ...
    assert [o.seed for o in done.outputs] == [1, 2, 3, 4]


def test_a_canceled_call_that_still_steps_is_interrupted_not_abandoned(
    rclient: redis.Redis, engine: Engine, tmp_path: Path
) -> None:
    store = wide(rclient)
    slow = SlowSteps(engine)
    exits: list[int] = []
    runner = watched_runner(rclient, store, slow, tmp_path, exits)
    job = record(model="tiny", steps=2)
    store.submit(job)
    runner.start()
    try:
        noop = Message(job.id, lambda: None, lambda: None, lambda: None, lambda: None)
        runner.offer(job.id, noop)
        wait_until(lambda: slow.steps >= 2, 30, "the call stepping")
        assert store.change(Change("cancel", job.id)).ok
        wait_until(lambda: not runner.ctx or not runner.ctx.calling, 30, "the call to end")
        time.sleep(1.0)  # twice the grace: an abandonment would have come by now
    finally:
        runner.stop(10)
    assert exits == []
    assert slow.steps < 20  # interrupted at a step soon after the cancel, not run to the end


def test_a_canceled_call_that_will_not_stop_is_abandoned(
    rclient: redis.Redis, tmp_path: Path
) -> None:
    store = wide(rclient)
    endless = EndlessStep()
    exits: list[int] = []
    runner = watched_runner(rclient, store, endless, tmp_path, exits)
    settled: list[str] = []

    def delivery(job_id: str) -> Message:
        def note(kind: str) -> Callable[[], None]:
            return lambda: settled.append(f"{kind} {job_id}")

        return Message(job_id, note("ack"), note("requeue"), note("ack"), note("requeue"))

    giant, waiting = record(model="tiny"), record(model="tiny")
    for rec in (giant, waiting):
        store.submit(rec)
    runner.start()
    try:
        runner.offer(giant.id, delivery(giant.id))
        assert endless.started.wait(30)
        runner.offer(waiting.id, delivery(waiting.id))  # received while the call runs
        canceled_at = time.monotonic()
        assert store.change(Change("cancel", giant.id)).ok
        wait_until(lambda: exits, 10, "the worker to give up on the call")
        gave_up_after = time.monotonic() - canceled_at
    finally:
        endless.release.set()
        runner.silenced.set()  # the process would have ended here
    assert exits == [EXIT_ABANDONED]
    assert gave_up_after < 0.5 + 2.0  # the grace, plus heartbeats to notice
    # The job it was holding went back to the front of its line, its message acked.
    back = store.get(waiting.id)
    assert back is not None
    assert back.status is JobStatus.QUEUED
    assert f"ack {waiting.id}" in settled
    print(f"\ncanceled call abandoned {gave_up_after:.2f} s after the cancel")
