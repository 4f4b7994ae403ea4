"""The system under test, on loopback: one Redis, and per variant a gateway and its workers.

Every variant (batched, unbatched, fixed timeout, gateway alone) gets a Redis database of its own,
so their queues, ledgers and heartbeats never meet, and processes of its own, started with
`python -m api` and `python -m worker` exactly as an operator would, configured by `DQ_*` variables.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import IO

import httpx
from redis import Redis

from bench import BenchError
from bench.cpu import start_ticks
from core import keys
from core.embedded import EmbeddedRedis, free_port
from core.processes import stop_process

ROOT = Path(__file__).resolve().parent.parent
API_KEY = "bench-key-0123456789abcdef"


def child_env(overrides: dict[str, str]) -> dict[str, str]:
    """This process's environment, plus the repo on the path and `overrides` on top."""
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, "PYTHONPATH": path, "PYTHONUNBUFFERED": "1", **overrides}


class Child:
    """A subprocess whose output goes to a log file."""

    def __init__(self, args: Sequence[str], env: dict[str, str], log: Path) -> None:
        self.log_path = log
        log.parent.mkdir(parents=True, exist_ok=True)
        self.log: IO[bytes] = log.open("wb")
        self.process = subprocess.Popen(
            list(args), cwd=ROOT, env=env, stdout=self.log, stderr=subprocess.STDOUT
        )

    @property
    def pid(self) -> int:
        """The process id."""
        return self.process.pid

    def check(self) -> None:
        """Raise with the log's tail if the process has exited."""
        if self.process.poll() is not None:
            tail = self.log_path.read_text(errors="replace")[-3000:]
            raise BenchError(f"{self.log_path.stem} exited ({self.process.returncode}):\n{tail}")

    def stop(self, timeout: float = 30) -> None:
        """SIGTERM (workers drain), then SIGKILL if it lingers."""
        stop_process(self.process, timeout)
        self.log.close()

    @staticmethod
    def kill_orphan(pid: int, started: int | None) -> None:
        """SIGKILL a process the bench started that outlived its parent, if it still is that one."""
        if started is None or start_ticks(pid) != started:
            return  # gone, or the id now belongs to another process
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


class Stack:
    """A gateway and `workers` workers on Redis database `db`, with `env` on top of the base."""

    def __init__(self, name: str, redis: EmbeddedRedis, db: int, env: dict[str, str]) -> None:
        self.name, self.db = name, db
        self.redis_url = f"redis://127.0.0.1:{redis.port}/{db}"
        self.port = free_port()
        self.env = child_env({**env, "DQ_REDIS_URL": self.redis_url})
        self.gateway: Child | None = None
        self.workers: dict[str, Child] = {}

    @property
    def url(self) -> str:
        """The gateway's base URL."""
        return f"http://127.0.0.1:{self.port}"

    def start(self, workers: int, logs: Path, gateway_processes: int = 1) -> Stack:
        """Start the gateway and the workers (without waiting for them)."""
        args = [sys.executable, "-m", "api", "--host", "127.0.0.1", "--port", str(self.port)]
        args += ["--workers", str(gateway_processes)]
        self.gateway = Child(args, self.env, logs / f"{self.name}-gateway.log")
        for i in range(workers):
            name = f"bench-{self.name}-{i}@{socket.gethostname()}"
            args = [sys.executable, "-m", "worker", "--name", name]
            self.workers[name] = Child(args, self.env, logs / f"{self.name}-worker{i}.log")
        return self

    def wait_ready(self, timeout: float = 300) -> None:
        """Block until the gateway answers /readyz and every worker's model is loaded."""
        deadline = time.monotonic() + timeout
        with Redis.from_url(self.redis_url, decode_responses=True) as client:
            while not (self._gateway_ready() and self._workers_ready(client)):
                for child in self.children():
                    child.check()
                if time.monotonic() > deadline:
                    raise BenchError(f"{self.name}: not ready after {timeout:.0f} s")
                time.sleep(0.1)

    def _gateway_ready(self) -> bool:
        try:
            return httpx.get(f"{self.url}/readyz", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    def _workers_ready(self, client: Redis) -> bool:
        beats = client.mget([keys.worker(name) for name in self.workers]) if self.workers else []
        return all(b and '"state":"starting"' not in b for b in beats)

    def children(self) -> list[Child]:
        """The gateway and the workers."""
        return ([self.gateway] if self.gateway else []) + list(self.workers.values())

    def roles(self) -> dict[str, list[int]]:
        """Process ids by role, for CPU accounting."""
        gateway = [self.gateway.pid] if self.gateway else []
        return {"gateway": gateway, "worker": [w.pid for w in self.workers.values()]}

    def workers_of(self, job_ids: Sequence[str]) -> list[str | None]:
        """Which worker ran each job, from the ledger."""
        with Redis.from_url(self.redis_url, decode_responses=True) as client:
            pipe = client.pipeline(transaction=False)
            for job_id in job_ids:
                pipe.hget(keys.job(job_id), "worker")
            return [w or None for w in pipe.execute()]

    def flush(self) -> None:
        """Empty this stack's database (the gateway-only burst leaves thousands of jobs)."""
        with Redis.from_url(self.redis_url) as client:
            client.flushdb()

    def stop(self) -> None:
        """Stop the workers (they drain) and then the gateway."""
        for child in reversed(self.children()):
            child.stop()


class Moto:
    """moto's S3 server in a process of its own, with one bucket: S3 storage on loopback."""

    BUCKET = "dq-bench"

    def __init__(self, logs: Path) -> None:
        self.port = free_port()
        self.env = {
            "AWS_ACCESS_KEY_ID": "bench",
            "AWS_SECRET_ACCESS_KEY": "bench",
            "AWS_DEFAULT_REGION": "us-east-1",
        }
        args = [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)]
        self.child = Child(args, child_env(self.env), logs / "moto.log")

    @property
    def endpoint(self) -> str:
        """The S3 endpoint URL."""
        return f"http://127.0.0.1:{self.port}"

    def wait_ready(self, timeout: float = 60) -> None:
        """Block until the server answers, then make the bucket."""
        deadline = time.monotonic() + timeout
        while True:
            self.child.check()
            try:
                httpx.put(f"{self.endpoint}/{self.BUCKET}", timeout=2).raise_for_status()
                return
            except httpx.HTTPError:
                if time.monotonic() > deadline:
                    raise BenchError("moto's S3 server did not start") from None
                time.sleep(0.2)

    def stack_env(self, stack: str) -> dict[str, str]:
        """What a stack needs to store its images in the bucket."""
        return {
            **self.env,
            "DQ_STORAGE_URL": f"s3://{self.BUCKET}/{stack}",
            "DQ_S3_ENDPOINT_URL": self.endpoint,
            "DQ_S3_REGION": "us-east-1",
        }
