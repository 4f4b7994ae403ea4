"""The gateway's defences with real `python -m api` processes: memory, floods, start-up, workers."""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import os
import resource
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis

from core.jobs import JobStatus, StoredImage
from core.storage import FileStore
from tests.conftest import ALICE_KEY, ROOT, WorkerProcess, client_for, settings_from, wait_for
from tests.test_gateway import wait_accepting, wait_serving
from tests.test_hardening import put_job

# The gateway processes here start with the soft open-files limit many systems default to; the
# gateway raises it to the hard limit at start.
SOFT_FILES, HARD_FILES = 1024, 8192


def lowered_files_limit() -> None:
    """In the child, before exec: the soft limit of a default shell."""
    resource.setrlimit(resource.RLIMIT_NOFILE, (SOFT_FILES, HARD_FILES))


class GatewayProcess:
    """`python -m api` on a free port, its output in a file."""

    def __init__(self, env: dict[str, str], log: Path, *args: str) -> None:
        from core.embedded import free_port

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path, self.log = log, log.open("wb")
        argv = [sys.executable, "-m", "api", "--port", str(self.port), *args]
        self.process = subprocess.Popen(
            argv,
            cwd=ROOT,
            env={**os.environ, **env},
            stdout=self.log,
            stderr=subprocess.STDOUT,
            preexec_fn=lowered_files_limit,
        )

    def wait_ready(self, timeout: float = 30) -> GatewayProcess:
        """Until /healthz answers."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.process.poll() is None, self.log_path.read_text()[-2000:]
            try:
                if httpx.get(f"{self.url}/healthz", timeout=1).status_code == 200:
                    return self
            except httpx.HTTPError:
                time.sleep(0.1)
        raise AssertionError("the gateway did not come up")

    def rss_mb(self) -> float:
        """Resident memory now."""
        status = Path(f"/proc/{self.process.pid}/status").read_text()
        return int(status.split("VmRSS:")[1].split()[0]) / 1024

    def stop(self) -> None:
        """SIGTERM, then wait."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.log.close()


@pytest.fixture
def gateway_process(env: dict[str, str], tmp_path: Path) -> Iterator[GatewayProcess]:
    """One production gateway process on the test's environment."""
    gw = GatewayProcess(env, tmp_path / "gateway.log")
    yield gw.wait_ready()
    gw.stop()


# 2. Five 100 MB chunked bodies without a key: refused at once, never held in memory.


def send_chunked(port: int, megabytes: int, replies: list[bytes]) -> None:
    """POST a chunked body of `megabytes` MB with no key; keep the reply's status line."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(b"POST /v1/jobs HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n")
        chunk = b"%x\r\n%s\r\n" % (65536, b"a" * 65536)
        try:
            for _ in range(megabytes * 16):
                sock.sendall(chunk)
            sock.sendall(b"0\r\n\r\n")
        except OSError:
            pass  # the server may close once it has answered
        replies.append(sock.recv(200).split(b"\r\n")[0])


@pytest.mark.slow
def test_five_100_mb_chunked_bodies_without_a_key_leave_the_gateway_small(
    gateway_process: GatewayProcess,
) -> None:
    before, peak, replies = gateway_process.rss_mb(), 0.0, []
    senders = [
        threading.Thread(target=send_chunked, args=(gateway_process.port, 100, replies))
        for _ in range(5)
    ]
    for t in senders:
        t.start()
    while any(t.is_alive() for t in senders):
        peak = max(peak, gateway_process.rss_mb())
        time.sleep(0.02)
    print(f"\ngateway RSS under five 100 MB chunked bodies: {before:.0f} MB, peak {peak:.0f} MB")
    assert replies == [b"HTTP/1.1 401 Unauthorized"] * 5
    assert peak - before < 50


# 3. A flood of slow connections from one client; real requests are still answered.

FLOOD_SOCKETS = 3000
FLOOD_S = 14.0
HALF_SENT = b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: "


def flood(port: int, count: int, seconds: float, opened: Any) -> None:
    """Keep `count` sockets open: a third idle, a third half-sent, a third a byte a second."""

    async def one(kind: int, deadline: float) -> None:
        loop = asyncio.get_running_loop()
        while loop.time() < deadline:
            try:
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
            except OSError:
                await asyncio.sleep(0.2)
                continue
            opened.value += 1
            try:
                if kind:
                    writer.write(HALF_SENT)
                while loop.time() < deadline:
                    if kind == 2:
                        writer.write(b"y")
                    try:
                        if not await asyncio.wait_for(reader.read(1024), 1.0):
                            break  # the server closed it: open another
                    except TimeoutError:
                        pass
            except OSError:
                pass
            finally:
                opened.value -= 1
                writer.close()

    async def run() -> None:
        deadline = asyncio.get_running_loop().time() + seconds
        await asyncio.gather(*(one(i % 3, deadline) for i in range(count)))

    resource.setrlimit(resource.RLIMIT_NOFILE, (count + 256, max(count + 256, HARD_FILES)))
    asyncio.run(run())


@pytest.mark.slow
def test_real_requests_are_answered_during_a_slow_connection_flood(
    gateway_process: GatewayProcess,
) -> None:
    spawn = multiprocessing.get_context("spawn")
    opened = spawn.Value("i", 0, lock=False)
    attacker = spawn.Process(
        target=flood, args=(gateway_process.port, FLOOD_SOCKETS, FLOOD_S, opened)
    )
    attacker.start()
    try:
        deadline = time.monotonic() + 10
        while opened.value < FLOOD_SOCKETS * 0.9 and time.monotonic() < deadline:
            time.sleep(0.05)
        at_start = opened.value
        latencies, failures = [], []
        auth = {"Authorization": f"Bearer {ALICE_KEY}"}
        # A new connection for each request: it must be accepted while the flood fills the cap.
        fresh = httpx.Limits(max_keepalive_connections=0)
        until = time.monotonic() + FLOOD_S - 4
        with httpx.Client(base_url=gateway_process.url, headers=auth, limits=fresh) as client:
            while time.monotonic() < until:
                started = time.monotonic()
                try:
                    client.get("/v1/queue", timeout=5).raise_for_status()
                    latencies.append(time.monotonic() - started)
                except httpx.HTTPError as e:
                    failures.append(repr(e))
                time.sleep(0.02)
    finally:
        attacker.join(FLOOD_S + 10)
        if attacker.is_alive():
            attacker.kill()
    assert at_start >= FLOOD_SOCKETS * 0.9
    assert failures == [], f"{len(failures)} of {len(failures) + len(latencies)}: {failures[:3]}"
    cuts = statistics.quantiles(latencies, n=100, method="inclusive")
    print(
        f"\n{len(latencies)} requests during a flood of {at_start} slow sockets: "
        f"p50 {cuts[49] * 1000:.1f} ms, p99 {cuts[98] * 1000:.1f} ms, "
        f"max {max(latencies) * 1000:.1f} ms"
    )
    assert cuts[98] < 1.0


# 8. One URL key for every gateway process; none is made up when it is missing.


@pytest.mark.parametrize("secret", [None, "", "   "])
def test_the_gateway_refuses_to_start_without_a_url_key_on_local_storage(
    env: dict[str, str], tmp_path: Path, secret: str | None
) -> None:
    run_env = {k: v for k, v in {**os.environ, **env}.items() if k != "DQ_SECRET_KEY"}
    if secret is not None:
        run_env["DQ_SECRET_KEY"] = secret
    out = subprocess.run(
        [sys.executable, "-m", "api", "--port", "1"],
        cwd=ROOT,
        env=run_env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 2
    assert "DQ_SECRET_KEY is not set" in out.stdout


def test_s3_storage_needs_no_url_key(env: dict[str, str]) -> None:
    from api.app import check

    check(settings_from({**env, "DQ_STORAGE_URL": "s3://bucket/out", "DQ_SECRET_KEY": ""}))


@pytest.mark.skipif(sys.platform != "linux", reason="SO_REUSEPORT spreads connections on Linux")
def test_every_gateway_process_checks_the_urls_any_other_minted(
    env: dict[str, str], tmp_path: Path, rclient: redis.Redis
) -> None:
    settings = settings_from(env)
    store = FileStore(Path(settings.storage.removeprefix("file://")), b"unused")
    store.put("out/0.png", b"the image", "image/png")
    image = StoredImage(key="out/0.png", seed=1, width=64, height=64)
    job_id = put_job(rclient, "alice", status=JobStatus.SUCCEEDED.value, outputs=[image])
    gw = GatewayProcess(env, tmp_path / "gateways.log", "--workers", "2")
    try:
        pids = wait_serving(gw.url, gw.process, 2)
        wait_accepting(gw.url, gw.port, pids)
        for _ in range(30):  # each URL minted on a new connection, fetched on another
            auth = {"Authorization": f"Bearer {ALICE_KEY}"}
            job = httpx.get(f"{gw.url}/v1/jobs/{job_id}", headers=auth, timeout=10).json()
            reply = httpx.get(gw.url + job["outputs"][0]["url"], timeout=10)
            assert (reply.status_code, reply.content) == (200, b"the image")
        assert len(pids) == 2
    finally:
        gw.stop()


# 9. The worker's log carries no prompt; 8. links point at DQ_PUBLIC_URL.


@pytest.mark.slow
def test_a_long_prompt_stays_out_of_the_worker_log(
    env: dict[str, str],
    gateway_factory: Callable[[dict[str, str]], Any],
    worker_factory: Callable[..., WorkerProcess],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    words = " ".join(f"zebra{i:04d}" for i in range(180))  # ~1,800 characters, far past 77 tokens
    gw = gateway_factory({**env, "DQ_PUBLIC_URL": "http://images.example:8000"})
    worker = worker_factory(env)
    with client_for(gw) as c:
        job_id = c.post("/v1/jobs", json={"prompt": words, "width": 64, "height": 64}).json()["id"]
        done = wait_for(c, job_id)
    assert done["status"] == "succeeded"
    assert done["outputs"][0]["url"].startswith("http://images.example:8000/v1/files/")
    log = worker.log_path.read_text()
    assert "ready" in log  # the log is there and being written
    assert "zebra" not in log
    # The gateway's own log of the submit and the polls: no prompt either, and a few lines.
    ours = [r.getMessage() for r in caplog.records if r.name.split(".")[0] in ("api", "core")]
    assert not [line for line in ours if "zebra" in line]
    after_start = log[log.index("ready") :]
    assert len(after_start.encode()) < 4096, after_start[-2000:]
    print(
        f"\nLOGS for one 1,800-character prompt: worker {len(after_start.encode())} B after"
        f" start-up, gateway {sum(len(m) for m in ours)} B in {len(ours)} line(s)"
    )
