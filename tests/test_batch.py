"""One batch against the real tiny pipeline, a real Redis ledger and real local storage."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path

import pytest
import redis
from PIL.Image import Image

from core.broker import generate_message
from core.jobs import Bucket, JobStatus
from core.records import JobRecord
from core.storage import FileStore
from core.store import Change, DispatchConfig, JobStore, Ledger
from tests.conftest import WorkerProcess
from tests.test_store import record
from worker.batch import run_batch
from worker.batcher import Limits
from worker.claims import BatchContext
from worker.inference import Engine, Row, StepHook
from worker.models import load_pipeline
from worker.runner import Message, Runner

BUCKET = Bucket(64, 64, 2, 7.5)


class PoisonedEngine:
    """The real engine, except that a call with the prompt 'poison' raises, as a bad row would."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.calls: list[list[str]] = []

    def generate(self, rows: Sequence[Row], bucket: Bucket, on_step: StepHook) -> list[Image]:
        """Record the call, fail it if poisoned, else run the pipeline."""
        self.calls.append([r.prompt for r in rows])
        if any(r.prompt == "poison" for r in rows):
            raise ValueError("this prompt breaks the model")
        return self.engine.generate(rows, bucket, on_step)


class TimedEngine:
    """The real engine, noting when each call starts and ends."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.calls: list[tuple[float, float]] = []

    def generate(self, rows: Sequence[Row], bucket: Bucket, on_step: StepHook) -> list[Image]:
        """Run the pipeline and note the call."""
        start = time.monotonic()
        images = self.engine.generate(rows, bucket, on_step)
        self.calls.append((start, time.monotonic()))
        return images


class SlowStore(FileStore):
    """Real local storage that takes `delay_s` per object, as a far bucket would."""

    def __init__(self, root: Path, delay_s: float) -> None:
        super().__init__(root, b"k")
        self.delay_s = delay_s
        self.puts: list[tuple[float, float]] = []

    def put(self, key: str, data: bytes, content_type: str) -> None:
        """Wait, then write."""
        start = time.monotonic()
        time.sleep(self.delay_s)
        super().put(key, data, content_type)
        self.puts.append((start, time.monotonic()))


@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory) -> Engine:
    """The tiny pipeline, loaded once for the module."""
    return Engine(load_pipeline("tiny", tmp_path_factory.mktemp("models")))


def queued(store: JobStore, prompt: str) -> str:
    """A job submitted and dispatched (the window is wide enough here)."""
    rec = record(prompt=prompt, steps=2, seed=3, model="tiny")
    assert store.submit(rec).outcome == "created"
    return rec.id


def wide(rclient: redis.Redis) -> JobStore:
    """A ledger whose window holds every job these tests submit."""
    return JobStore(rclient, Ledger(dispatch=DispatchConfig(margin=50)))


def test_one_bad_row_fails_alone_and_the_others_run_without_it(
    rclient: redis.Redis, engine: Engine, tmp_path: Path
) -> None:
    store = wide(rclient)
    poisoned = PoisonedEngine(engine)
    ctx = BatchContext(store, FileStore(tmp_path, b"k"), poisoned, "w", 30.0, 0.0)
    ids = [queued(store, p) for p in ("first", "poison", "last")]
    records = [r for r in store.get_many(ids) if isinstance(r, JobRecord)]
    assert run_batch(ctx, records, BUCKET, capacity=4) == 2
    assert poisoned.calls == [["first", "poison", "last"], ["first"], ["poison"], ["last"]]
    first, poison, last = (store.get(i) for i in ids)
    assert first is not None
    assert poison is not None
    assert last is not None
    assert (first.status, last.status, poison.status) == (
        JobStatus.SUCCEEDED,
        JobStatus.SUCCEEDED,
        JobStatus.FAILED,
    )
    assert poison.error is not None
    assert poison.error.code == "pipeline_error"
    assert "this prompt breaks the model" in poison.error.message
    assert sorted(p.name for p in tmp_path.rglob("*.png")) == ["0.png", "0.png"]


def test_a_lora_that_cannot_be_put_to_use_fails_its_job_with_lora_failed(
    rclient: redis.Redis, engine: Engine, tmp_path: Path
) -> None:
    store = wide(rclient)
    ctx = BatchContext(store, FileStore(tmp_path, b"k"), engine, "w", 30.0, 0.0)
    job_id = queued(store, "inked")
    records = [r for r in store.get_many([job_id]) if isinstance(r, JobRecord)]
    with_lora = replace(BUCKET, loras=(("ink", 1.0),))  # this engine has no LoRA folder
    assert run_batch(ctx, records, with_lora, capacity=4) == 0
    failed = store.get(job_id)
    assert failed is not None
    assert failed.status == JobStatus.FAILED
    assert failed.error is not None
    assert (failed.error.code, failed.error.message) == (
        "lora_failed",
        "the model could not run this job: this model takes no LoRAs",
    )


def test_a_job_that_left_the_queue_is_not_run(
    rclient: redis.Redis, engine: Engine, tmp_path: Path
) -> None:
    store = wide(rclient)
    poisoned = PoisonedEngine(engine)
    ctx = BatchContext(store, FileStore(tmp_path, b"k"), poisoned, "w", 30.0, 0.0)
    kept, canceled = queued(store, "kept"), queued(store, "gone")
    records = [r for r in store.get_many([kept, canceled]) if isinstance(r, JobRecord)]
    store.must(Change("cancel", canceled))
    run_batch(ctx, records, BUCKET, capacity=4)
    assert poisoned.calls == [["kept"]]


def test_a_redelivered_finished_job_is_settled_without_a_run(
    env: dict[str, str], rclient: redis.Redis, worker_factory: Callable[..., WorkerProcess]
) -> None:
    worker = worker_factory(env)
    store = wide(rclient)
    job_id = queued(store, "once")
    rclient.lpush("dq.jobs", generate_message(job_id, "dq.jobs"))
    deadline = time.monotonic() + 60
    while (record := store.get(job_id)) and record.status is not JobStatus.SUCCEEDED:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    queue = store.ledger.queue_of("tiny")
    rclient.lpush(queue, generate_message(job_id, queue))  # a duplicate delivery
    while "message settled without a run" not in worker.log_path.read_text():
        assert time.monotonic() < deadline
        time.sleep(0.05)
    worker.stop()
    again = store.get(job_id)
    assert again is not None
    assert (again.status, again.attempt) == (JobStatus.SUCCEEDED, 1)
    assert rclient.llen(queue) == 0


def test_the_runner_stores_one_batch_while_the_pipeline_runs_the_next(
    rclient: redis.Redis, engine: Engine, tmp_path: Path
) -> None:
    store = wide(rclient)
    storage, timed = SlowStore(tmp_path, 0.4), TimedEngine(engine)
    settled: list[tuple[str, str]] = []

    def delivery(tag: str) -> Message:
        def note(kind: str) -> Callable[[], None]:
            return lambda: settled.append((tag, kind))

        return Message(tag, note("ack"), note("requeue"), note("ack"), note("requeue"))

    runner = Runner(
        rclient,
        store,
        Limits(max_rows=1, max_pixels=10**9, timeout_s=0.0),
        lambda: BatchContext(store, storage, timed, "w@test", 30.0, 0.0),
        name="w@test",
        model="tiny",
        queue="dq.test",
        heartbeat_s=0.1,
        prefetch=8,
    )
    runner.start()
    ids = [queued(store, f"job {i}") for i in range(3)]
    for job_id in ids:
        runner.offer(job_id, delivery(job_id))
    deadline = time.monotonic() + 60
    while len(settled) < len(ids):
        assert time.monotonic() < deadline, settled
        time.sleep(0.05)
    runner.stop(10)
    assert sorted(settled) == sorted((job_id, "ack") for job_id in ids)
    records = store.get_many(ids)
    assert [r.status for r in records if isinstance(r, JobRecord)] == [JobStatus.SUCCEEDED] * 3
    # Each call after the first began while the image of the one before was still being stored.
    assert len(timed.calls) == 3
    for (call_start, _), (_, put_end) in zip(timed.calls[1:], storage.puts, strict=False):
        assert call_start < put_end
