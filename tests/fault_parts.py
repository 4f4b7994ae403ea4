"""What the fault tests share: pipeline runs counted from the workers' logs, jobs awaited without
giving up at the first that is late, and the fault table's rows computed from the jobs."""

from __future__ import annotations

import contextlib
import logging
import re
import time
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import redis

from core import keys
from core.embedded import EmbeddedRedis
from core.heartbeats import WorkerBeat
from core.store import JobStore, Ledger
from tests.conftest import (
    Gateway,
    Scaler,
    WorkerProcess,
    client_for,
    live_workers,
    settings_from,
    stack_env,
    wait_until,
)

TERMINAL = ("succeeded", "failed", "canceled")
# worker/batch.py logs this line at INFO once per pipeline call that returned.
RAN = re.compile(r"ran batch of jobs (\S+): ")
STAMP = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) ")
# Short leases and beats, so that recovery fits a test.
FAST = {
    "DQ_LEASE_S": "3",
    "DQ_HEARTBEAT_S": "0.5",
    "DQ_PROGRESS_INTERVAL_S": "0.1",
    "DQ_SWEEP_INTERVAL_S": "0.5",
}


@dataclass
class Stack:
    """A Redis of its own, a gateway, a scaler keeping workers; more workers started by tests."""

    env: dict[str, str]
    tmp: Path
    server: EmbeddedRedis
    redis: redis.Redis
    gateway: Gateway
    scaler: Scaler
    extra: list[WorkerProcess] = field(default_factory=list)

    @property
    def store(self) -> JobStore:
        """The ledger, as every process of the stack sees it."""
        return JobStore(self.redis, Ledger.of(settings_from(self.env)))

    def client(self) -> httpx.Client:
        """Alice's HTTP client."""
        return client_for(self.gateway)

    def logs(self) -> list[Path]:
        """Every worker's log: the scaler's (its workers write there), the extra ones, and the
        recovery sweeps the gateway (in this process) ran."""
        return [self.scaler.log_path, *(w.log_path for w in self.extra), self.tmp / "gateway.log"]

    def log_text(self) -> str:
        """All the workers' logs together."""
        return "\n".join(p.read_text(errors="replace") for p in self.logs())

    def record(self, job_id: str) -> dict[str, str]:
        """A job's hash in the ledger."""
        return self.redis.hgetall(keys.job(job_id))  # type: ignore[return-value]

    def serving(self, n: int) -> list[WorkerBeat]:
        """Wait for `n` workers with their model loaded; their beats."""
        return wait_until(  # type: ignore[no-any-return]
            lambda: (beats := live_workers(self.redis, self.env)) and len(beats) >= n and beats,
            180,
            f"{n} live workers",
        )


@contextlib.contextmanager
def stack_of(
    tmp: Path, model_cache: Path, knobs: Mapping[str, str], workers: int, aof: bool = False
) -> Iterator[Stack]:
    """A stack whose scaler keeps `workers` workers serving, with `knobs` over FAST leases."""
    server = EmbeddedRedis(tmp / "redis", aof=aof).start()
    env = {
        **stack_env(server.url, model_cache, tmp),
        **FAST,
        **knobs,
    }
    # The gateway offers the recovery sweep too: keep what its sweeps say beside the workers' logs.
    sweeps = logging.FileHandler(tmp / "gateway.log")
    sweeps.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s %(message)s"))
    recovery_log = logging.getLogger("core.recovery")
    recovery_log.addHandler(sweeps)
    recovery_log.setLevel(logging.INFO)
    gateway = Gateway(settings_from(env)).start()
    n = str(workers)
    scaler = Scaler(env, tmp / "scaler.log", "--min", n, "--max", n)
    client = redis.Redis.from_url(server.url, decode_responses=True)
    built = Stack(env, tmp, server, client, gateway, scaler)
    try:
        built.serving(workers)
        yield built
    finally:
        scaler.stop()
        for worker in built.extra:
            worker.stop()
        gateway.stop()
        recovery_log.removeHandler(sweeps)
        sweeps.close()
        client.close()
        server.stop()


def submit(
    client: httpx.Client, n: int, prompt: str = "job", steps: int = 20, size: int = 64
) -> list[str]:
    """Submit `n` small jobs (prompts numbered when several); their ids."""
    ids = []
    for i in range(n):
        body = {"prompt": f"{prompt} {i}" if n > 1 else prompt, "steps": steps}
        resp = client.post("/v1/jobs", json={**body, "width": size, "height": size})
        assert resp.status_code == 202, resp.text
        ids.append(resp.json()["id"])
    return ids


def stamped(text: str, pattern: str) -> list[float]:
    """Epoch times of the log lines that match `pattern`, earliest first (the text joins several
    logs, so its order is not the order in time)."""
    times = []
    for line in text.splitlines():
        match = STAMP.match(line)
        if match and re.search(pattern, line):
            times.append(datetime.strptime(match[1], "%Y-%m-%d %H:%M:%S,%f").timestamp())
    return sorted(times)


def pipeline_runs(*logs: Path) -> Counter[str]:
    """How many pipeline calls ran each job, from the workers' `ran batch of jobs <ids>` lines."""
    runs: Counter[str] = Counter()
    for log in logs:
        for match in RAN.finditer(log.read_text(errors="replace")):
            runs.update(match[1].split(","))
    return runs


def ended(client: httpx.Client, ids: Iterable[str], timeout: float) -> dict[str, dict[str, Any]]:
    """Each job as it stands once every one has ended, or as it stood when `timeout` ran out.

    Long polls wait for each end; a job still running at the deadline is returned as it is, and
    one the ledger no longer knows as status `gone`, so a test can count what was lost instead of
    stopping at the first.
    """
    deadline = time.monotonic() + timeout
    jobs: dict[str, dict[str, Any]] = {}
    for job_id in ids:
        while True:
            left = deadline - time.monotonic()
            try:
                resp = client.get(f"/v1/jobs/{job_id}", params={"wait": max(0.0, min(left, 20))})
            except httpx.TransportError:
                resp = None
            if resp is not None and resp.status_code == 200:
                jobs[job_id] = resp.json()
                if jobs[job_id]["status"] in TERMINAL or left <= 0:
                    break
            elif resp is not None and resp.status_code == 404:
                jobs[job_id] = {"id": job_id, "status": "gone"}  # the ledger lost its record
                break
            elif left <= 0:
                jobs.setdefault(job_id, {"id": job_id, "status": "unknown"})
                break
            else:
                time.sleep(0.2)  # the gateway cannot read Redis (503) right now: ask again
    return jobs


def finished_at(job: Mapping[str, Any]) -> float | None:
    """When a job ended, in epoch seconds (None while it has not)."""
    raw = job.get("finished_at")
    return None if raw is None else datetime.fromisoformat(raw).timestamp()


def ended_at(job: Mapping[str, Any]) -> float:
    """When a job that ended did, in epoch seconds."""
    at = finished_at(job)
    assert at is not None, job
    return at


def attempts(job: Mapping[str, Any]) -> int:
    """How many times the job was claimed (0 for one never read back)."""
    return int(job.get("metrics", {}).get("attempts", 0))


@dataclass(frozen=True)
class FaultRow:
    """One row of the README's fault table, computed from the jobs and the workers' logs."""

    fault: str
    in_flight: int  # jobs accepted and not ended when the fault struck
    lost: int  # of those, jobs that never reached a terminal state
    second_attempt: int  # jobs claimed more than once (metrics.attempts > 1)
    run_twice: int  # jobs whose pipeline call returned more than once
    outcome: str  # when the last one ended, or how the job ended

    @classmethod
    def of(
        cls, fault: str, jobs: Mapping[str, Mapping[str, Any]], runs: Counter[str], since: float
    ) -> FaultRow:
        """The row for `jobs` after a fault at epoch `since`."""
        ends = [t for j in jobs.values() if (t := finished_at(j)) is not None]
        return cls(
            fault=fault,
            in_flight=len(jobs),
            lost=sum(1 for j in jobs.values() if j["status"] not in TERMINAL),
            second_attempt=sum(1 for j in jobs.values() if attempts(j) > 1),
            run_twice=sum(1 for j in jobs if runs[j] > 1),
            outcome=f"{max(ends) - since:.1f} s" if ends else "n/a",
        )

    def print(self) -> None:
        """Print the row as the README's table has it."""
        cells = (self.fault, self.in_flight, self.lost, self.second_attempt, self.run_twice)
        print("\nFAULT | " + " | ".join(str(c) for c in (*cells, self.outcome)) + " |")
