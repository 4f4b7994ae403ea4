"""The robustness issue, point by point, against real processes: what breaks, and what it costs.

The slow tests share one stack (a Redis of their own, a gateway, a scaler keeping two workers,
short leases); the workers load the tiny model through `tests.faulty_engine:faulty`, whose
prompt-triggered bugs leave every other job to the real engine. Each test counts pipeline runs
from the workers' logs (`ran batch of jobs <ids>`), never from what it expects.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
import redis

from core import heartbeats, keys, scripts
from core.embedded import EmbeddedRedis
from core.heartbeats import WorkerBeat, WorkerState
from core.storage import FileStore
from core.store import DispatchConfig, JobStore, Ledger
from tests.conftest import (
    Gateway,
    WorkerProcess,
    client_for,
    live_workers,
    settings_from,
    wait_until,
)
from tests.fault_parts import (
    TERMINAL,
    Stack,
    ended,
    ended_at,
    pipeline_runs,
    stack_of,
    stamped,
    submit,
)
from tests.faulty_engine import EXIT, HANG, RAISE
from tests.test_store import record
from worker.app import served
from worker.runner import EXIT_LOOP_FAILED, EXIT_MODEL_FAILED

LEASE_S, SWEEP_S, LOOP_STALE_S = 5.0, 0.5, 5.0


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, model_cache: Path) -> Iterator[Stack]:
    """The shared stack of the slow tests."""
    knobs = {
        "DQ_LEASE_S": str(LEASE_S),
        "DQ_SWEEP_INTERVAL_S": str(SWEEP_S),
        "DQ_LOOP_STALE_S": str(LOOP_STALE_S),
        "DQ_MAX_ATTEMPTS": "2",
        # A Redis reply late by a second is an error: an outage is felt at once.
        "DQ_REDIS_TIMEOUT_S": "1",
        "DQ_ENGINE_FACTORY": "tests.faulty_engine:faulty",
    }
    with stack_of(tmp_path_factory.mktemp("robustness"), model_cache, knobs, workers=2) as built:
        yield built


# --- 6 and 1: records a worker cannot parse, records a newer gateway wrote ----------------------


def submit_as_written(stack: Stack, prompt: str, **fields: str) -> str:
    """Submit a job through the ledger's own script with its hash fields edited, as another
    version of the gateway (or a corruption) would leave them; the job is dispatched at once."""
    rec = record(tenant="alice", model=served(settings_from(stack.env)), prompt=prompt, steps=8)
    args = json.loads(stack.store.ledger.submit_args(rec, {}, None, None))
    stored = dict(zip(args["fields"][::2], args["fields"][1::2], strict=True))
    args["fields"] = [item for pair in (stored | fields).items() for item in pair]
    reply = stack.redis.register_script(scripts.source("submit"))([], [json.dumps(args)])
    assert reply[0] == "created", reply  # type: ignore[index]
    return rec.id


@pytest.mark.slow
def test_unreadable_records_are_set_aside_and_newer_ones_run_and_read(stack: Stack) -> None:
    stack.serving(2)
    newer_request = json.loads(
        record(prompt="from a newer gateway", steps=8).request.model_dump_json()
    ) | {"style": {"preset": "added later"}}
    newer = submit_as_written(
        stack,
        "from a newer gateway",
        request=json.dumps(newer_request),
        metrics=json.dumps({"attempts": 0, "gpu_seconds": None}),
        shard="7",  # a hash field this version has never heard of
    )
    broken = submit_as_written(stack, "broken", request='{"prompt": "broken", "width": ')
    # A heartbeat from a newer worker: the scaler, the sweep and the gateway read it too.
    now = time.time()
    beat = WorkerBeat(name="newer@elsewhere", state=WorkerState.IDLE, started_at=now, at=now)
    raw = json.loads(beat.model_dump_json()) | {"gpu": {"name": "H200", "memory_gb": 141}}
    stack.redis.set(keys.worker(beat.name), json.dumps(raw))
    stack.redis.zadd(keys.WORKERS, {beat.name: now})
    with stack.client() as client:
        plain = submit(client, 1, "plain")[0]
        done = wait_until(
            lambda: (
                all(stack.record(j).get("status") in TERMINAL for j in (newer, broken, plain))
                and [stack.record(j) for j in (newer, broken, plain)]
            ),
            120,
            "the three jobs to end",
        )
        read = client.get(f"/v1/jobs/{newer}")
        queue = client.get("/v1/queue")
    assert [d["status"] for d in done] == ["succeeded", "failed", "succeeded"]
    assert json.loads(done[1]["error"])["code"] == "unreadable_record"
    assert f"job {broken}: its record cannot be read" in stack.log_text()
    assert done[0]["shard"] == "7"  # what the newer version wrote is left in place
    assert read.status_code == 200
    job = read.json()
    assert (job["status"], job["request"]["prompt"], len(job["outputs"])) == (
        "succeeded",
        "from a newer gateway",
        1,
    )
    assert queue.status_code == 200
    # The scaler decided after the newer beat was there (it would fail every tick otherwise).
    wait_until(
        lambda: (s := heartbeats.scaler_status(stack.redis)) and s.at > now + 1, 30, "a tick"
    )
    assert pipeline_runs(*stack.logs())[newer] == 1


# --- 1: a model that fails to load -------------------------------------------------------------


@pytest.mark.slow
def test_a_model_that_fails_to_load_ends_its_worker_and_its_jobs_run_elsewhere(
    stack: Stack,
) -> None:
    stack.serving(2)
    env = {**stack.env, "DQ_ENGINE_FACTORY": "tests.faulty_engine:unloadable"}
    broken = WorkerProcess(env, stack.tmp / "unloadable.log", "unloadable@test")
    stack.extra.append(broken)

    def beat() -> WorkerBeat | None:
        raw = stack.redis.get(keys.worker("unloadable@test"))
        return None if raw is None else WorkerBeat.model_validate_json(raw)

    wait_until(beat, 60, "the worker to start loading its model")
    with stack.client() as client:
        ids = submit(client, 30, "while a worker fails to start")
        # Its consumer takes messages while the model loads: they are in its heartbeat.
        held = wait_until(lambda: (b := beat()) and b.jobs, 30, "the loading worker to hold jobs")
        code = broken.process.wait(60)
        exited = time.time()
        jobs = ended(client, ids, 120)
    text = broken.log_path.read_text()
    assert code == EXIT_MODEL_FAILED, text[-3000:]
    assert "the model could not be loaded" in text
    assert "corrupt (injected)" in text
    assert re.search(r"drained: [1-9]\d* buffered job\(s\) handed back", text)
    assert stack.redis.get(keys.worker("unloadable@test")) is None  # it left no heartbeat
    assert [j["status"] for j in jobs.values()] == ["succeeded"] * 30
    runs = pipeline_runs(*stack.logs())
    assert [runs[j] for j in ids] == [1] * 30
    assert all(jobs[j]["metrics"]["attempts"] == 1 for j in held)  # handed back, never claimed
    late = max(ended_at(jobs[j]) for j in held) - exited
    print(
        f"\nmodel failed to load: exit {code}; the {len(held)} jobs it held ended {late:.1f} s "
        "after it exited"
    )


# --- 3: one attempt, one runner ----------------------------------------------------------------


@pytest.mark.slow
def test_a_frozen_worker_past_its_lease_cannot_take_its_job_back(stack: Stack) -> None:
    stack.serving(2)
    with stack.client() as client:
        (job_id,) = submit(client, 1, "a long one", steps=150)
        wait_until(lambda: stack.record(job_id).get("status") == "running", 60, "the job to run")
        victim = stack.record(job_id)["worker"]
        pid = next(b.pid for b in live_workers(stack.redis, stack.env) if b.name == victim)
        assert pid is not None
        os.kill(pid, signal.SIGSTOP)
        try:
            taken = wait_until(
                lambda: (r := stack.record(job_id)).get("attempt") == "2" and r, 60, "a new claim"
            )
        finally:
            os.kill(pid, signal.SIGCONT)
        (job,) = ended(client, [job_id], 120).values()
    refused = f"job {job_id}: attempt 1 no longer holds the job \\(it is \\w+, attempt 2\\)"
    wait_until(lambda: stamped(stack.log_text(), refused), 30, "the late writes to be refused")
    assert taken["status"] == "running"
    assert taken["worker"] != victim
    assert (job["status"], job["metrics"]["attempts"]) == ("succeeded", 2)
    assert pipeline_runs(*stack.logs())[job_id] <= 2  # the frozen one's call, cut short, and one
    assert len(list((stack.tmp / "images" / job_id).glob("*.png"))) == 1
    os.kill(pid, 0)  # resumed, it goes on serving: a frozen process is not a stuck loop


@pytest.mark.slow
def test_a_frozen_worker_resumed_before_anyone_claims_cannot_renew_its_way_back(
    stack: Stack,
) -> None:
    """Both workers frozen: the job is handed back and waits; its old runner wakes up first."""
    stack.serving(2)
    with stack.client() as client:
        (job_id,) = submit(client, 1, "taken back?", steps=150)
        wait_until(lambda: stack.record(job_id).get("status") == "running", 60, "the job to run")
        victim = stack.record(job_id)["worker"]
        pids = {b.name: b.pid for b in live_workers(stack.redis, stack.env)}
        for pid in pids.values():
            os.kill(pid, signal.SIGSTOP)  # type: ignore[arg-type]
        try:
            wait_until(lambda: stack.record(job_id).get("status") == "queued", 60, "a handback")
        finally:
            os.kill(pids[victim], signal.SIGCONT)  # type: ignore[arg-type]
            refused = f"job {job_id}: attempt 1 no longer holds the job"
            wait_until(lambda: stamped(stack.log_text(), refused), 30, "its renewal refused")
            for name, pid in pids.items():
                if name != victim:
                    os.kill(pid, signal.SIGCONT)  # type: ignore[arg-type]
        (job,) = ended(client, [job_id], 120).values()
    assert (job["status"], job["metrics"]["attempts"]) == ("succeeded", 2)
    assert pipeline_runs(*stack.logs())[job_id] <= 2


# --- 2: a ledger outage is not a model failure ---------------------------------------------------


@pytest.mark.slow
def test_a_redis_pause_during_a_batch_fails_nothing_and_runs_nothing_twice(stack: Stack) -> None:
    stack.serving(2)
    felt = "progress not written|the ledger is unreachable|Redis unavailable"
    before = len(stamped(stack.log_text(), felt))
    with stack.client() as client:
        ids = submit(client, 12, "through an outage", steps=60)
        wait_until(lambda: stack.redis.zcard(keys.RUNNING) >= 2, 60, "batches to run")
        paused = time.time()
        stack.redis.execute_command("CLIENT", "PAUSE", 3000, "ALL")
        jobs = ended(client, ids, 180)
    assert [j["status"] for j in jobs.values()] == ["succeeded"] * 12
    runs = pipeline_runs(*stack.logs())
    assert [runs[j] for j in ids] == [1] * 12
    errors = [t for t in stamped(stack.log_text(), felt)[before:] if t >= paused - 1]
    assert errors, "the workers never noticed the outage: the test tested nothing"
    attempts = sorted(j["metrics"]["attempts"] for j in jobs.values())
    print(f"\nRedis paused 3 s mid-batch: 12 succeeded, one pipeline run each; attempts {attempts}")


# --- 1: bugs at the engine seam ------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_bugs_at_the_engine_seam_end_their_jobs_and_the_queue_keeps_flowing(
    stack: Stack,
) -> None:
    """Each poison has a bucket of its own (its own step count), so it never shares a call."""
    stack.serving(2)
    start = time.time()
    with stack.client() as client:
        raised = submit(client, 1, RAISE, steps=5)[0]
        exits = submit(client, 1, EXIT, steps=6)[0]
        hangs = submit(client, 1, HANG, steps=7)[0]
        good = submit(client, 16, "next to a bug")
        jobs = ended(client, [raised, exits, hangs, *good], 300)
    text = stack.log_text()
    assert [jobs[j]["status"] for j in good] == ["succeeded"] * 16
    runs = pipeline_runs(*stack.logs())
    assert [runs[j] for j in good] == [1] * 16
    outcome = {
        name: (jobs[j]["status"], jobs[j]["error"]["code"], jobs[j]["metrics"]["attempts"])
        for name, j in (("raise", raised), ("exit", exits), ("hang", hangs))
    }
    assert outcome == {
        "raise": ("failed", "pipeline_error", 1),
        "exit": ("failed", "max_attempts", 2),
        "hang": ("failed", "max_attempts", 2),
    }
    # Every worker that met a poison said so with the job's id, and exited for a new one.
    for job_id in (exits, hangs):
        assert len(stamped(text, f"CRITICAL .*exits \\(code {EXIT_LOOP_FAILED}\\).*{job_id}")) == 2
    assert len(stamped(text, f"died \\(exit {EXIT_LOOP_FAILED}\\)")) >= 4
    # No job stayed running without a live worker for longer than its lease and a sweep.
    for job_id in (exits, hangs):
        gone = stamped(text, f"CRITICAL .*exits .*{job_id}")
        back = stamped(text, f"job {job_id}(: attempt \\d lost its worker| failed after)")
        assert len(gone) == len(back) == 2
        waits = [b - g for g, b in zip(gone, back, strict=True)]
        assert max(waits) <= LEASE_S + SWEEP_S + 1.5, waits
    took = {name: ended_at(jobs[j]) - start for name, j in (("exit", exits), ("hang", hangs))}
    print(f"\nengine bugs: poisons ended after {took}; 16 good jobs ran once each")


# --- 4: an accepted job is answered 202 ----------------------------------------------------------


class CuttingProxy:
    """A TCP proxy to Redis that, once armed, passes on the first reply holding `trigger`, then
    cuts every connection and refuses new ones until restored: Redis gone at the worst moment."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream = ("127.0.0.1", upstream_port)
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.trigger: bytes | None = None
        self.down = threading.Event()
        self.open: list[socket.socket] = []
        self.lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def url(self) -> str:
        """Where clients connect instead of Redis."""
        return f"redis://127.0.0.1:{self.port}/0"

    def arm(self, trigger: bytes) -> None:
        """Cut everything right after the next reply that holds `trigger`."""
        self.trigger = trigger

    def restore(self) -> None:
        """Let connections through again."""
        self.down.clear()

    def close(self) -> None:
        """Stop listening and cut what is open."""
        self.listener.close()
        self._cut()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            if self.down.is_set():
                client.close()
                continue
            upstream = socket.create_connection(self.upstream)
            with self.lock:
                self.open += [client, upstream]
            for src, dst, watch in ((client, upstream, False), (upstream, client, True)):
                threading.Thread(target=self._pump, args=(src, dst, watch), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, replies: bool) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
                if replies and self.trigger is not None and self.trigger in data:
                    self.trigger = None
                    self.down.set()
                    self._cut()
        except OSError:
            pass
        finally:
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.close()

    def _cut(self) -> None:
        with self.lock:
            sockets, self.open = self.open, []
        for s in sockets:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            s.close()


GOOD = {"prompt": "a cat", "width": 64, "height": 64, "steps": 2}


def test_the_202_reports_the_real_queue_position(client: httpx.Client) -> None:
    positions = [client.post("/v1/jobs", json=GOOD).json()["queue"]["position"] for _ in range(4)]
    assert positions == [1, 2, 3, 4]


def test_a_recorded_job_is_answered_202_whatever_fails_on_the_way_to_the_answer(
    env: dict[str, str],
    rclient: redis.Redis,
    redis_server: EmbeddedRedis,
    gateway_factory: Callable[[dict[str, str]], Gateway],
    caplog: pytest.LogCaptureFixture,
) -> None:
    proxy = CuttingProxy(redis_server.port)
    try:
        gateway = gateway_factory({**env, "DQ_REDIS_URL": proxy.url})
        # Two jobs ahead, written straight to the ledger: the gateway has read nothing yet (its
        # once-a-second throughput read among them), so answering the third needs Redis again.
        store = JobStore(rclient, Ledger.of(settings_from(env)))
        model = served(settings_from(env))
        for _ in range(2):
            assert store.submit(record(tenant="alice", model=model)).outcome == "created"
        proxy.arm(b"created")  # the submit script's reply: the job is recorded, then Redis goes
        with client_for(gateway) as c:
            resp = c.post("/v1/jobs", json=GOOD)
            assert resp.status_code == 202, resp.text
            job = resp.json()
            assert proxy.down.is_set()
            assert c.get(f"/v1/jobs/{job['id']}").status_code == 503  # Redis is away indeed
            proxy.restore()
            again = wait_until(
                lambda: (r := c.get(f"/v1/jobs/{job['id']}")).status_code == 200 and r.json(),
                30,
                "the gateway to reach Redis again",
            )
    finally:
        proxy.close()
    assert (job["status"], job["queue"]["position"]) == ("queued", 3)
    assert "answered without its queue details" in caplog.text  # the rest really failed
    assert (again["status"], again["queue"]["position"]) == ("queued", 3)


# --- 5: inboxes are never dropped ----------------------------------------------------------------


class Recorded:
    """An in-process runner of the tiny model whose messages only record how they were settled."""

    def __init__(self, r: redis.Redis, tmp_path: Path, model_cache: Path, max_rows: int) -> None:
        from worker.batcher import Limits
        from worker.claims import BatchContext
        from worker.inference import Engine
        from worker.models import load_pipeline
        from worker.runner import Runner

        self.store = JobStore(r, Ledger(dispatch=DispatchConfig(margin=50)))
        self.settled: list[tuple[str, str]] = []
        engine = Engine(load_pipeline("tiny", model_cache))
        images = FileStore(tmp_path / "images", b"k")
        self.runner = Runner(
            r,
            self.store,
            Limits(max_rows=max_rows, max_pixels=10**9, timeout_s=0.0),
            lambda: BatchContext(self.store, images, engine, "w@t", 30.0, 0.0),
            name="w@t",
            model="tiny",
            queue=self.store.ledger.queue_of("tiny"),
            heartbeat_s=0.2,
            prefetch=8,
        )

    def submit(self) -> str:
        """A 2-step tiny job in the ledger; its id."""
        return str(self.store.submit(record(model="tiny", steps=2)).value)

    def offer(self, job_id: str) -> None:
        """Hand the runner the job's message, as Celery's consumer would."""
        from worker.runner import Message

        def note(kind: str) -> Callable[[], None]:
            return lambda: self.settled.append((job_id, kind))

        delivery = Message(job_id, note("ack"), note("requeue"), note("ack"), note("requeue"))
        self.runner.offer(job_id, delivery)


def test_jobs_received_while_redis_is_away_are_kept_then_run_or_handed_back(
    tmp_path: Path, model_cache: Path, caplog: pytest.LogCaptureFixture
) -> None:
    server = EmbeddedRedis(tmp_path / "redis", aof=True).start()  # stopped and started: AOF
    r = redis.Redis.from_url(server.url, decode_responses=True, socket_timeout=2)
    worker = Recorded(r, tmp_path, model_cache, max_rows=4)
    store, runner, settled = worker.store, worker.runner, worker.settled
    ids = [worker.submit() for _ in range(5)]
    runner.start()
    try:
        wait_until(
            lambda: heartbeats.live(r, 5.0) and "idle" in str(r.get(keys.worker("w@t"))),
            60,
            "the runner's model",
        )
        server.stop()
        for job_id in ids[:3]:  # received from the broker just as the ledger went away
            worker.offer(job_id)
        wait_until(lambda: "Redis unavailable" in caplog.text, 30, "the loop to meet the outage")
        server.start()
        wait_until(lambda: len(settled) == 3, 60, "the three to be run and acked")
        server.stop()
        for job_id in ids[3:]:  # received, then the worker drains while Redis is away
            worker.offer(job_id)
        runner.stop(10)
    finally:
        server.stop()
    assert sorted(settled) == sorted(
        [(j, "ack") for j in ids[:3]] + [(j, "requeue") for j in ids[3:]]
    )
    server.start()
    try:
        statuses = [store.get(j).status.value for j in ids]  # type: ignore[union-attr]
    finally:
        r.close()
        server.stop()
    assert statuses == ["succeeded"] * 3 + ["queued"] * 2


def test_a_bug_in_the_storing_thread_is_logged_with_its_jobs_and_the_worker_goes_on(
    rclient: redis.Redis,
    tmp_path: Path,
    model_cache: Path,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from worker import batch

    calls, encode = [], batch.encode

    def buggy_once(image: object, fmt: str) -> bytes:
        """Image encoding (on the storing thread) with a bug its first time."""
        calls.append(image)
        if len(calls) == 1:
            raise ZeroDivisionError("a bug in the storing code")
        return encode(image, fmt)  # type: ignore[arg-type]

    monkeypatch.setattr(batch, "encode", buggy_once)
    worker = Recorded(rclient, tmp_path, model_cache, max_rows=1)
    store, runner, settled = worker.store, worker.runner, worker.settled
    first, second = worker.submit(), worker.submit()
    runner.start()
    try:
        worker.offer(first)
        wait_until(lambda: settled, 60, "the first job's message to be settled")
        worker.offer(second)
        wait_until(lambda: len(settled) == 2, 60, "the second job to be run and acked")
        assert runner.threads[0].is_alive()
        assert not runner.stopping.is_set()
    finally:
        runner.stop(10)
    # The bug is logged with the batch's jobs; their message goes back (the ledger decides what
    # runs again); the next batch is stored as if nothing happened.
    assert settled == [(first, "requeue"), (second, "ack")]
    assert f"storing the batch of jobs {first} failed" in caplog.text
    assert "ZeroDivisionError" in caplog.text
    assert store.get(second).status.value == "succeeded"  # type: ignore[union-attr]


# --- 7: nothing grows without bound --------------------------------------------------------------


@pytest.mark.parametrize("where", ["file", "s3"])
def test_an_expired_job_leaves_its_tenants_index_and_its_images_go(
    where: str, rclient: redis.Redis, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    from core.jobs import JobStatus
    from core.recovery import Recovery, RecoveryConfig
    from core.storage import FileStore as Files
    from core.storage import NotStored, ObjectStore, image_key, open_store
    from core.store import Change
    from tests.test_store import claim
    from tests.test_store import submit as submit_to

    storage: ObjectStore
    if where == "s3":
        import boto3

        endpoint = request.getfixturevalue("s3_endpoint")
        boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket="expiry-ttl")
        storage, prefix = (
            open_store("s3://expiry-ttl/out", secret=b"", endpoint_url=endpoint),
            "out",
        )
    else:
        storage, prefix = Files(tmp_path, b"k"), ""
    store = JobStore(rclient, Ledger(job_ttl_s=1, dispatch=DispatchConfig(margin=10)))
    done, kept = submit_to(store, "t"), submit_to(store, "t")
    attempt = claim(store, done)
    storage.put(image_key(prefix, done, 0, "png"), b"png", "image/png")
    storage.put(image_key(prefix, kept, 0, "png"), b"png", "image/png")
    store.must(Change("finish", done, attempt, "w1", to=JobStatus.SUCCEEDED))
    wait_until(lambda: not rclient.exists(keys.job(done)), 10, "the record to expire")
    swept = Recovery(rclient, store, RecoveryConfig(), storage, prefix).sweep()
    assert swept.expired == 1
    assert rclient.zrange(keys.tenant_jobs("t"), 0, -1) == [kept]
    assert rclient.zcard(keys.EXPIRING) == 0
    with pytest.raises(NotStored):
        storage.get(image_key(prefix, done, 0, "png"))
    assert storage.get(image_key(prefix, kept, 0, "png")) == b"png"


# --- 1: the webhook sender's retry pump ---------------------------------------------------------


def test_the_retry_pump_outlives_an_order_it_cannot_read(
    rclient: redis.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    from core.deliveries import RetrySchedule
    from core.events import DeliveryOrder, EventType
    from worker.webhooks import RetryPump

    queue = "dq.webhooks.test"
    good = DeliveryOrder(
        job_id="job_" + "1" * 32,
        event=EventType.SUCCEEDED,
        webhook_id="msg_1",
        occurred_at=time.time(),
        attempt=2,
    )
    # Parked by something else than this version: not an order it can read.
    rclient.zadd(keys.WEBHOOK_RETRIES, {'{"job_id": 7}': time.time() - 2})
    pump = RetryPump(RetrySchedule(rclient, queue), interval_s=0.05)
    pump.start()
    try:
        wait_until(lambda: "cannot be read; dropped" in caplog.text, 10, "the bad order met")
        RetrySchedule(rclient, queue).add(good, time.time() - 1)  # a good one, due later
        wait_until(lambda: rclient.llen(queue) == 1, 10, "the good order to be released")
        assert pump.thread.is_alive()
    finally:
        pump.stop()
    assert good.job_id in str(rclient.lindex(queue, 0))
    assert rclient.zcard(keys.WEBHOOK_RETRIES) == 0  # set aside, not retried for ever
