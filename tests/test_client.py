"""The Python SDK against a real `dq up`: one per module, real processes, real faults."""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from dq_client import (
    AsyncClient,
    Client,
    Conflict,
    ConnectionFailed,
    JobFailed,
    JobStatus,
    NotFound,
    PayloadTooLarge,
    RateLimited,
    RetryPolicy,
    Unauthorized,
    Unavailable,
    ValidationError,
    WaitTimeout,
    verify_webhook,
)
from tests.client_parts import KEY, TINY, DqUp, Proxy
from tests.conftest import BOB_KEY, ROOT, Gateway, wait_until

LONG = {"width": 64, "height": 64, "steps": 80}  # a few seconds on one CPU thread


@pytest.fixture(scope="module")
def dq(tmp_path_factory: pytest.TempPathFactory, model_cache: Path) -> Iterator[DqUp]:
    """One `dq up` for the module: progress written often, webhooks allowed to loopback."""
    up = DqUp(
        tmp_path_factory.mktemp("dq"),
        model_cache,
        DQ_PROGRESS_INTERVAL_S="0.05",
        DQ_WEBHOOK_ALLOW_PRIVATE="1",
    )
    try:
        yield up.wait_ready()
    finally:
        up.stop()


@pytest.fixture
def client(dq: DqUp) -> Iterator[Client]:
    """Alice's client."""
    with Client(dq.url, KEY) as c:
        yield c


@pytest.fixture
def proxy(dq: DqUp) -> Iterator[Proxy]:
    """A proxy in front of the gateway that cuts connections when told."""
    p = Proxy(dq.port)
    yield p
    p.close()


class Records(logging.Handler):
    """The SDK's log lines, and a signal when one contains a given text."""

    def __init__(self, signal_on: str) -> None:
        super().__init__(logging.DEBUG)
        self.signal_on = signal_on
        self.lines: list[str] = []
        self.seen = threading.Event()

    def emit(self, record: logging.LogRecord) -> None:
        line = record.getMessage()
        self.lines.append(line)
        if self.signal_on in line:
            self.seen.set()


@pytest.fixture
def sdk_log() -> Iterator[Callable[[str], Records]]:
    """Capture the SDK's debug log."""
    logger = logging.getLogger("dq_client")
    handlers: list[Records] = []

    def attach(signal_on: str) -> Records:
        handler = Records(signal_on)
        logger.addHandler(handler)
        handlers.append(handler)
        return handler

    level = logger.level
    logger.setLevel(logging.DEBUG)
    yield attach
    for handler in handlers:
        logger.removeHandler(handler)
    logger.setLevel(level)


def test_run_returns_every_image_of_a_multi_image_job(client: Client, tmp_path: Path) -> None:
    images = client.run("three red squares", num_images=3, seed=7, **TINY)
    assert [(i.index, i.seed, i.width, i.height, i.format) for i in images] == [
        (0, 7, 64, 64, "png"),
        (1, 8, 64, 64, "png"),
        (2, 9, 64, 64, "png"),
    ]
    assert [i.to_pil().size for i in images] == [(64, 64)] * 3
    job_id = images[0].job_id
    paths = client.download(job_id, tmp_path / "out")
    assert [p.name for p in paths] == [f"{job_id}-{i}.png" for i in range(3)]
    assert [p.read_bytes() for p in paths] == [i.data for i in images]


def test_submit_wait_get_list_and_cancel(client: Client) -> None:
    tag = uuid.uuid4().hex
    job = client.submit(f"listed {tag}", metadata={"tag": tag}, **TINY)
    assert job.status == JobStatus.QUEUED
    assert job.request.seed is not None
    done = client.wait(job, timeout=60)
    assert (done.id, done.status, len(done.outputs)) == (job.id, "succeeded", 1)
    again = client.get(job.id)  # the same job, its URLs minted afresh
    assert (again.id, again.status, again.request, again.metrics) == (
        done.id,
        done.status,
        done.request,
        done.metrics,
    )
    with pytest.raises(Conflict) as ended:
        client.cancel(job)
    assert (ended.value.status, ended.value.code) == (409, "already_finished")
    long = client.submit("to be canceled", **LONG)
    canceled = client.cancel(long)
    assert canceled.status == JobStatus.CANCELED
    assert client.wait(long).status == JobStatus.CANCELED
    with pytest.raises(JobFailed) as failed:
        client.images(long)
    assert failed.value.job.status == "canceled"
    newest = list(client.list(limit=2, page_size=1))
    assert [j.id for j in newest] == [long.id, job.id]
    assert [j.id for j in client.list("canceled", limit=1)] == [long.id]


def test_list_walks_every_page(dq: DqUp) -> None:
    with Client(dq.url, BOB_KEY) as bob:
        ids = [bob.submit(f"page {i}", **TINY).id for i in range(5)]
        assert [j.id for j in bob.list(page_size=2)] == ids[::-1]
        assert [j.id for j in bob.list(page_size=2, limit=3)] == ids[::-1][:3]


def test_wait_gives_up_after_its_timeout(client: Client) -> None:
    job = client.submit("slow", **LONG)
    started = time.monotonic()
    with pytest.raises(WaitTimeout) as timed_out:
        client.wait(job, timeout=0.5)
    assert 0.5 <= time.monotonic() - started < 5
    assert timed_out.value.job.id == job.id
    assert isinstance(timed_out.value, TimeoutError)
    client.cancel(job)


def test_events_stream_status_and_progress(client: Client) -> None:
    job = client.submit("streamed", **{**TINY, "steps": 30})
    seen = [(j.status, j.progress.step if j.progress else None) for j in client.events(job)]
    assert seen[-1] == ("succeeded", None)
    steps = [step for status, step in seen if status == "running" and step is not None]
    assert len(steps) >= 3
    assert steps == sorted(steps)


def test_events_survive_a_dropped_connection(dq: DqUp, proxy: Proxy) -> None:
    proxy.cut(b"/events", after=b"data: ")  # cut the first stream after its first event
    with Client(proxy.url, KEY) as client:
        job = client.submit("streamed through a bad proxy", **{**TINY, "steps": 40})
        seen = list(client.events(job))
    assert proxy.seen(b"/events") >= 2
    assert seen[-1].status == JobStatus.SUCCEEDED
    assert len(seen[-1].outputs) == 1
    order = {"queued": 0, "running": 1, "succeeded": 2}
    keys = [(order[j.status], j.progress.step if j.progress else 0) for j in seen[:-1]]
    assert keys == sorted(keys)
    assert len(set(keys)) == len(keys)  # the reconnection repeated nothing


def test_a_lost_submit_answer_is_retried_into_one_job(dq: DqUp, proxy: Proxy) -> None:
    tag = uuid.uuid4().hex
    proxy.cut(b"POST /v1/jobs ")  # the request reaches the gateway; its answer is lost
    with Client(proxy.url, KEY) as client:
        job = client.submit(f"once {tag}", **TINY)
        assert proxy.seen(b"POST /v1/jobs ") == 2
        mine = [j for j in client.list(limit=50) if tag in j.request.prompt]
    assert [j.id for j in mine] == [job.id]


def test_wait_outlasts_a_gateway_restart(
    dq: DqUp, client: Client, sdk_log: Callable[[str], Records]
) -> None:
    old = dq.gateway_pid()
    assert old is not None
    job = client.submit("across a restart", **LONG)
    log = sdk_log("waiting on")
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        waiting = pool.submit(client.wait, job, 120)
        assert log.seen.wait(10)
        os.kill(old, signal.SIGKILL)
        done = waiting.result(120)
    assert (done.id, done.status, done.metrics.attempts) == (job.id, "succeeded", 1)
    new = dq.gateway_pid()
    assert new is not None
    assert new != old
    assert any("failed (" in line for line in log.lines), log.lines  # it did reconnect


def test_every_error_is_typed(dq: DqUp, client: Client) -> None:
    with Client(dq.url, "wrong-key") as stranger, pytest.raises(Unauthorized) as denied:
        stranger.get("job_x")
    assert (denied.value.status, denied.value.code) == (401, "unauthorized")
    with pytest.raises(NotFound) as missing:
        client.get("job_nope")
    assert (missing.value.status, missing.value.code) == (404, "not_found")
    with pytest.raises(ValidationError) as invalid:
        client.submit("odd size", width=65, height=64)
    assert (invalid.value.status, invalid.value.code, invalid.value.field) == (
        422,
        "validation_error",
        "width",
    )
    with pytest.raises(PayloadTooLarge) as large:
        client.submit("x" * 100_000)
    assert (large.value.status, large.value.code) == (413, "too_large")
    with Client(dq.url, BOB_KEY) as bob, pytest.raises(NotFound):
        bob.get(client.submit("alice's", **TINY))  # another tenant's job is not found


def test_a_rate_limit_raises_rate_limited_and_no_server_raises_connection_failed(
    env: dict[str, str],
    rclient: Any,
    gateway_factory: Callable[[dict[str, str]], Gateway],
) -> None:
    from core.embedded import free_port
    from core.tenants import KeyStore

    KeyStore(rclient).set_limits("alice", {"rate": 1, "burst": 1})
    gw = gateway_factory(env)  # no worker: nothing here needs one
    with Client(gw.url, KEY, retry=RetryPolicy.never()) as client:
        client.submit("the one the burst allows", **TINY)
        with pytest.raises(RateLimited) as limited:
            client.submit("one too soon", **TINY)
    assert (limited.value.status, limited.value.limit) == (429, "rate")
    assert limited.value.retry_after_s == 1
    nowhere = f"http://127.0.0.1:{free_port()}"
    with (
        Client(nowhere, KEY, retry=RetryPolicy.never()) as nobody,
        pytest.raises(ConnectionFailed) as failed,
    ):
        nobody.submit("to no one", **TINY)
    assert failed.value.sent is False  # nothing reached a server: safe to send again


def test_a_full_queue_raises_unavailable(
    env: dict[str, str], gateway_factory: Callable[[dict[str, str]], Gateway]
) -> None:
    gw = gateway_factory({**env, "DQ_MAX_QUEUE": "1"})  # no worker: the queue stays full
    with Client(gw.url, KEY, retry=RetryPolicy.never()) as client:
        client.submit("fills the queue", **TINY)
        with pytest.raises(Unavailable) as full:
            client.submit("one too many", **TINY)
    assert (full.value.status, full.value.code, full.value.retry_after_s) == (503, "queue_full", 10)


@pytest.mark.slow
def test_a_submit_refused_by_a_full_queue_goes_through_after_retry_after(
    env: dict[str, str],
    gateway_factory: Callable[[dict[str, str]], Gateway],
    sdk_log: Callable[[str], Records],
) -> None:
    gw = gateway_factory({**env, "DQ_MAX_QUEUE": "1"})
    log = sdk_log("failed (")
    with Client(gw.url, KEY) as client:
        blocker = client.submit("fills the queue", **TINY)
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            started = time.monotonic()
            later = pool.submit(client.submit, "waits its turn", **TINY)
            assert log.seen.wait(10)  # the first try got its 503
            client.cancel(blocker)  # room in the queue
            job = later.result(30)
        waited = time.monotonic() - started
        jobs = list(client.list())
    assert waited >= 10  # the queue's Retry-After, honoured
    assert [j.id for j in jobs] == [job.id, blocker.id]


class Receiver(BaseHTTPRequestHandler):
    """Records webhook deliveries."""

    got: list[tuple[bytes, dict[str, str]]] = []

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        Receiver.got.append((body, dict(self.headers.items())))
        self.send_response(204)
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        pass


def test_verify_webhook_accepts_a_real_delivery(dq: DqUp, client: Client) -> None:
    server = ThreadingHTTPServer(("127.0.0.1", 0), Receiver)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        hook = {"url": f"http://127.0.0.1:{server.server_port}/hook", "events": ["job.succeeded"]}
        job = client.wait(client.submit("hooked", webhook=hook, **TINY))
        body, headers = wait_until(lambda: Receiver.got and Receiver.got[-1], 30, "a delivery")
    finally:
        server.shutdown()
    # Alice's own secret, as the operator reads it beside `dq up` (the same data folder).
    out = subprocess.run(
        [sys.executable, "-m", "core.cli", "keys", "webhook-secret", "alice"],
        cwd=ROOT,
        env=dq.env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    secret = out.stdout.strip()
    event = verify_webhook(secret, body, headers)
    assert (event["type"], event["data"]["id"], event["data"]["status"]) == (
        "job.succeeded",
        job.id,
        "succeeded",
    )
    with pytest.raises(Exception, match="no valid signature"):
        verify_webhook(secret, body.replace(b"succeeded", b"failed"), headers)


def test_queue_and_models(client: Client) -> None:
    queue = client.queue()
    assert queue.workers >= 1
    assert queue.raw["workers"] == queue.workers
    models = client.models()
    assert [m.name for m in models] == ["tiny"]
    assert models[0].raw["default"] is True
    state = models[0].raw["state"]
    assert state["workers_serving"] + state["workers_starting"] >= 1  # as the queue counts them


def test_the_async_client_is_a_twin(dq: DqUp, proxy: Proxy, tmp_path: Path) -> None:
    proxy.cut(b"POST /v1/jobs ")  # the first submit's answer is lost
    proxy.cut(b"/events", after=b"data: ")  # the first stream is cut after one event

    async def scenario() -> dict[str, Any]:
        async with AsyncClient(proxy.url, KEY) as client:
            images = await client.run("async squares", num_images=2, **TINY)
            job = await client.submit("async stream", **{**TINY, "steps": 20})
            statuses = [j.status async for j in client.events(job)]
            paths = await client.download(job, tmp_path)
            listed = [j.id async for j in client.list(limit=2, page_size=1)]
            with pytest.raises(NotFound):
                await client.get("job_nope")
            with pytest.raises(Conflict):
                await client.cancel(job)
            long = await client.submit("async cancel", **LONG)
            with pytest.raises(WaitTimeout):
                await client.wait(long, timeout=0.3)
            canceled = await client.cancel(long)
            queue = await client.queue()
            return {
                "images": [(i.index, i.width) for i in images],
                "last status": statuses[-1],
                "files": [p.name for p in paths],
                "listed": listed == [job.id, images[0].job_id],
                "canceled": canceled.status,
                "workers": queue.workers >= 1,
            }

    result = asyncio.run(scenario())
    assert (proxy.seen(b"POST /v1/jobs "), proxy.seen(b"/events")) == (4, 2)
    job_file = result["files"][0]
    assert result == {
        "images": [(0, 64), (1, 64)],
        "last status": "succeeded",
        "files": [job_file],
        "listed": True,
        "canceled": "canceled",
        "workers": True,
    }
