"""Real parts for the tests: a throwaway Redis, moto's S3 server, a gateway, worker processes."""

from __future__ import annotations

import os
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
import uvicorn

from core import heartbeats
from core.embedded import EmbeddedRedis, free_port
from core.processes import stop_process
from core.settings import Settings

ROOT = Path(__file__).resolve().parent.parent
# API keys must be at least 24 characters long (core.settings.MIN_API_KEY_LENGTH).
ALICE_KEY = "key-alice-0123456789abcdef"
BOB_KEY = "key-bob-0123456789abcdefgh"
TEST_KEYS = f"alice:{ALICE_KEY},bob:{BOB_KEY}"


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedRedis]:
    """One redis-server for the session; each test flushes it."""
    server = EmbeddedRedis(tmp_path_factory.mktemp("redis")).start()
    yield server
    server.stop()


@pytest.fixture
def redis_url(redis_server: EmbeddedRedis) -> str:
    """A clean database."""
    client = redis.Redis.from_url(redis_server.url)
    client.flushall()
    client.close()
    return redis_server.url


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[EmbeddedRedis]:
    """A redis-server of the test's own, for a test that counts its connections or commands
    (the session's server is shared: what another test left running would count too)."""
    server = EmbeddedRedis(tmp_path / "private-redis").start()
    yield server
    server.stop()


@pytest.fixture
def rclient(redis_url: str) -> Iterator[redis.Redis]:
    """A client on the test's Redis."""
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    yield client
    client.close()


@pytest.fixture(scope="session")
def model_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model, built once per session."""
    return tmp_path_factory.mktemp("models")


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    """moto's S3 server over real HTTP."""
    from moto.server import ThreadedMotoServer

    os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing")
    os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    yield f"http://127.0.0.1:{port}"
    server.stop()


def stack_env(redis_url: str, model_cache: Path, folder: Path) -> dict[str, str]:
    """The DQ_ environment of a test stack on `redis_url`, its files under `folder`."""
    return {
        "DQ_REDIS_URL": redis_url,
        "DQ_DATA_DIR": str(folder / "data"),
        "DQ_STORAGE_URL": (folder / "images").as_uri(),
        "DQ_MODEL_CACHE": str(model_cache),
        "DQ_SECRET_KEY": "test-secret-0123456789abcdef",
        "DQ_API_KEYS": TEST_KEYS,
        "DQ_CPU_THREADS": "1",
        "DQ_BATCH_TIMEOUT_S": "0.5",
        "DQ_HEARTBEAT_S": "1",
        "DQ_LEASE_S": "10",
        "DQ_LOG_LEVEL": "INFO",
    }


@pytest.fixture
def env(redis_url: str, model_cache: Path, tmp_path: Path) -> dict[str, str]:
    """The DQ_ environment every process of one test shares (tests may edit it)."""
    return stack_env(redis_url, model_cache, tmp_path)


def settings_from(env: dict[str, str]) -> Settings:
    """Settings as a process started with `env` would read them."""
    fields = {k.removeprefix("DQ_").lower(): v for k, v in env.items() if k.startswith("DQ_")}
    return Settings(**fields)  # type: ignore[arg-type]


class Gateway:
    """A real uvicorn server in a thread, on a free port."""

    def __init__(self, settings: Settings) -> None:
        from api.__main__ import server_options
        from api.app import create_app

        self.port = free_port()
        self.app = create_app(settings)
        config = uvicorn.Config(
            self.app,
            host="127.0.0.1",
            port=self.port,
            log_level="warning",
            **server_options(settings),  # the production server's protocol, limits and timeouts
        )
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    @property
    def url(self) -> str:
        """Base URL."""
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> Gateway:
        """Serve and wait until it answers."""
        self.thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started:
            if time.monotonic() > deadline:
                raise RuntimeError("gateway did not start")
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        """Shut down."""
        self.server.should_exit = True
        self.thread.join(10)


@pytest.fixture
def gateway_factory() -> Iterator[Callable[[dict[str, str]], Gateway]]:
    """Start gateways with a given environment; all stopped at the end."""
    started: list[Gateway] = []

    def start(env: dict[str, str]) -> Gateway:
        gw = Gateway(settings_from(env)).start()
        started.append(gw)
        return gw

    yield start
    for gw in started:
        gw.stop()


@pytest.fixture
def gateway(env: dict[str, str], gateway_factory: Callable[[dict[str, str]], Gateway]) -> Gateway:
    """A gateway on the test's environment."""
    return gateway_factory(env)


def client_for(gw: Gateway, key: str = ALICE_KEY) -> httpx.Client:
    """An HTTP client with a tenant's key."""
    return httpx.Client(base_url=gw.url, headers={"Authorization": f"Bearer {key}"}, timeout=30)


@pytest.fixture
def client(gateway: Gateway) -> Iterator[httpx.Client]:
    """Alice's client."""
    with client_for(gateway) as c:
        yield c


class WorkerProcess:
    """A real `python -m worker` process."""

    def __init__(self, env: dict[str, str], log_path: Path, name: str) -> None:
        self.name = name
        self.log_path = log_path
        full_env = {**os.environ, **env, "PYTHONUNBUFFERED": "1"}
        self.log = log_path.open("wb")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "worker", "--name", name],
            cwd=ROOT,
            env=full_env,
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )

    def wait_ready(self, rclient: redis.Redis, timeout: float = 90) -> WorkerProcess:
        """Wait until the worker's heartbeat says its model is loaded."""
        from core import keys

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            raw = rclient.get(keys.worker(self.name))
            if raw and '"state":"starting"' not in str(raw):
                return self
            if self.process.poll() is not None:
                raise RuntimeError(f"worker exited:\n{self.log_path.read_text()[-3000:]}")
            time.sleep(0.1)
        raise RuntimeError(f"worker not ready:\n{self.log_path.read_text()[-3000:]}")

    def stop(self, timeout: float = 60) -> int:
        """SIGTERM and wait (a drain)."""
        code = stop_process(self.process, timeout)
        self.log.close()
        return code


@pytest.fixture
def worker_factory(tmp_path: Path, rclient: redis.Redis) -> Iterator[Callable[..., WorkerProcess]]:
    """Start worker processes; all stopped at the end."""
    started: list[WorkerProcess] = []

    def start(env: dict[str, str], *, ready: bool = True, **extra: str) -> WorkerProcess:
        name = f"w{len(started)}-{os.getpid()}@test"
        proc = WorkerProcess({**env, **extra}, tmp_path / f"{name}.log", name)
        started.append(proc)
        return proc.wait_ready(rclient) if ready else proc

    yield start
    for proc in started:
        proc.stop()


def wait_for(
    client: httpx.Client, job_id: str, timeout: float = 60, done: Any = None
) -> dict[str, Any]:
    """Poll a job until it ends (or `done(job)` says so)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job: dict[str, Any] = client.get(f"/v1/jobs/{job_id}").json()
        if done(job) if done else job["status"] in ("succeeded", "failed", "canceled"):
            return job
        time.sleep(0.05)
    raise AssertionError(f"job {job_id} did not finish: {job}")


class Scaler:
    """A real `python -m scaler` process with the process backend."""

    def __init__(self, env: dict[str, str], log: Path, *args: str) -> None:
        self.log_path = log
        self.log = log.open("wb")
        argv = [sys.executable, "-m", "scaler", "--backend", "process", "--interval", "0.5", *args]
        self.process = subprocess.Popen(
            argv, cwd=ROOT, env={**os.environ, **env}, stdout=self.log, stderr=subprocess.STDOUT
        )

    def stop(self) -> None:
        """SIGTERM: the scaler drains its workers and exits."""
        stop_process(self.process, 90)
        self.log.close()


@pytest.fixture
def scaler_factory(tmp_path: Path) -> Iterator[Callable[..., Scaler]]:
    """Start scalers; all stopped at the end."""
    started: list[Scaler] = []

    def start(env: dict[str, str], *args: str) -> Scaler:
        proc = Scaler(env, tmp_path / f"scaler{len(started)}.log", *args)
        started.append(proc)
        return proc

    yield start
    for proc in started:
        proc.stop()


def live_workers(r: redis.Redis, env: dict[str, str]) -> list[heartbeats.WorkerBeat]:
    """Workers with a fresh heartbeat and their model loaded."""
    beats = heartbeats.live(r, float(env["DQ_HEARTBEAT_S"]) * 3)
    return [b for b in beats if b.state != "starting"]


def wait_until(check: Callable[[], Any], timeout: float, what: str) -> Any:
    """Poll `check` until it returns something truthy."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")
