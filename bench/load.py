"""The load generator: closed- and open-loop traffic from its own process, one sample per job.

It runs in a child process (its CPU is measured and counted against the system, as on a real
client machine it would not be) and talks to the parent through a pipe, in JSON models. Against
the gateway a job is submitted and then waited for (a long poll by default, or polled); against the
peer (LitServe) the request itself waits for the image.
"""

from __future__ import annotations

import asyncio
import itertools
import random
import time
from collections.abc import Iterator
from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict

from bench.client import Connection, HttpError, Pool

TERMINAL = ("succeeded", "failed", "canceled")


class LoadSpec(BaseModel):
    """One load point: closed loop (`users` > 0) or open loop (`rate` > 0) for `duration_s`."""

    model_config = ConfigDict(frozen=True)

    url: str
    protocol: Literal["dq", "peer"] = "dq"
    api_key: str | None = None
    users: int = 0
    rate: float = 0.0
    duration_s: float
    drain_s: float = 120.0  # the longest a job in flight at the end is waited for
    poll_s: float = 0.02
    # hold: long-poll (`GET /v1/jobs/{id}?wait=`): the gateway answers when the job ends.
    # fixed: poll every poll_s. eta: sleep through most of what the job says is left (its queue
    # ETA, or its progress so far), then poll every poll_s: few polls, little notification delay.
    wait: Literal["hold", "fixed", "eta"] = "hold"
    body: dict[str, Any]
    # Mixed traffic: each job's body takes one of these on top, drawn at random (seeded).
    mix: list[dict[str, Any]] = []
    seed: int = 0

    @property
    def mode(self) -> Literal["closed", "open"]:
        """Closed loop when users are given, else open loop."""
        return "closed" if self.users > 0 else "open"


class ServerTimes(BaseModel):
    """What the job record says about one job (epoch seconds)."""

    created: float
    started: float | None = None
    finished: float | None = None
    run_s: float | None = None
    batch_size: int | None = None
    batch_id: str | None = None
    model_done: float | None = None
    worker: str | None = None  # filled in from the ledger when the bench owns Redis


class Sample(BaseModel):
    """One job as the client saw it."""

    submit: float
    accepted: float | None = None
    done: float | None = None  # when the client first saw it finished
    status: str  # succeeded, failed, canceled, error (HTTP or transport), timeout
    job_id: str | None = None
    images: int = 1
    steps: int | None = None  # the steps the job asked for (mixed traffic: its kind)
    polls: int = 0  # status reads it took to see the job finish
    error: str | None = None
    server: ServerTimes | None = None


class LoadResult(BaseModel):
    """Every job of one load point."""

    spec: LoadSpec
    started: float
    ended: float  # when the last submission could start
    samples: list[Sample]
    cpu_s: float  # the generator's own CPU time


def _headers(api_key: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {api_key}"} if api_key else {}


def _epoch(value: str | None) -> float | None:
    return None if value is None else datetime.fromisoformat(value).timestamp()


# Sleep through this share of the time a job says it still needs: an ETA is an estimate.
ETA_SHARE = 0.6
MAX_SLEEP_S = 5.0
HOLD_S = 30.0  # the longest one long poll is held (the API allows 60)


def remaining_s(job: dict[str, Any], now: float) -> float | None:
    """How long a job should still take, from its queue ETA or its progress, if it says."""
    if job["status"] == "queued":
        eta = (job.get("queue") or {}).get("eta_s")
        return None if eta is None else float(eta)
    progress, started = job.get("progress") or {}, _epoch(job.get("started_at"))
    if job["status"] != "running" or not progress.get("step") or started is None:
        return None
    done = float(progress["step"]) / float(progress["total_steps"])
    return (now - started) * (1 - done) / done


def server_times(job: dict[str, Any]) -> ServerTimes:
    """The timestamps of a job as the API returns it."""
    metrics = job.get("metrics") or {}
    return ServerTimes(
        created=_epoch(job["created_at"]) or 0.0,
        started=_epoch(job.get("started_at")),
        finished=_epoch(job.get("finished_at")),
        run_s=metrics.get("run_s"),
        batch_size=metrics.get("batch_size"),
        batch_id=metrics.get("batch_id"),
        model_done=metrics.get("model_done_at"),
    )


class Driver:
    """Runs one spec's jobs inside the generator process."""

    def __init__(self, spec: LoadSpec) -> None:
        self.spec = spec
        self.seeds: Iterator[int] = itertools.count(spec.seed)
        self.mixer = random.Random(spec.seed + 1)
        self.samples: list[Sample] = []
        self.start = time.time()
        self.end = self.start + spec.duration_s
        self.hard_end = self.end + spec.drain_s

    def body(self) -> dict[str, Any]:
        """The request body with this job's own seed (and its share of the mix)."""
        mixed = self.mixer.choice(self.spec.mix) if self.spec.mix else {}
        return {**self.spec.body, **mixed, "seed": next(self.seeds) % 2**32}

    async def job(self, conn: Connection) -> Sample:
        """One job from submission to the moment the client sees it finished."""
        submit = time.time()
        try:
            if self.spec.protocol == "peer":
                return await self._predict(conn)
            return await self._submit_and_poll(conn)
        except (HttpError, ValueError, KeyError, TypeError) as e:
            # Recorded, not raised: a failing request is a result of the run.
            return Sample(submit=submit, status="error", error=f"{type(e).__name__}: {e}")

    async def _predict(self, conn: Connection) -> Sample:
        body = self.body()
        submit = time.time()
        reply = await conn.request("POST", "/predict", body)
        done = time.time()
        ok = reply.status == 200
        return Sample(
            submit=submit,
            accepted=submit,
            done=done,
            status="succeeded" if ok else "error",
            steps=body.get("steps"),
            error=None if ok else f"HTTP {reply.status}",
        )

    async def _submit_and_poll(self, conn: Connection) -> Sample:
        body = self.body()
        submit = time.time()
        reply = await conn.request("POST", "/v1/jobs", body)
        accepted = time.time()
        if reply.status != 202:
            return Sample(submit=submit, status="error", error=f"HTTP {reply.status}")
        job = reply.json_body()
        steps = body.get("steps")
        sample = Sample(
            submit=submit, accepted=accepted, status="queued", job_id=job["id"], steps=steps
        )
        return await self._poll(conn, sample, job, body.get("num_images", 1))

    def _sleep_s(self, job: dict[str, Any]) -> float:
        """How long to wait before reading the job again."""
        left = remaining_s(job, time.time()) if self.spec.wait == "eta" else None
        if left is None:
            return self.spec.poll_s
        return min(MAX_SLEEP_S, max(self.spec.poll_s, ETA_SHARE * left))

    async def _poll(
        self, conn: Connection, sample: Sample, job: dict[str, Any], images: int
    ) -> Sample:
        polls = 0
        while time.time() < self.hard_end:
            path = f"/v1/jobs/{sample.job_id}"
            if self.spec.wait == "hold":
                path += f"?wait={min(HOLD_S, max(0.1, self.hard_end - time.time())):.1f}"
            else:
                await asyncio.sleep(self._sleep_s(job))
            reply = await conn.request("GET", path)
            polls += 1
            if reply.status != 200:
                failed = {"status": "error", "error": f"HTTP {reply.status}", "polls": polls}
                return sample.model_copy(update=failed)
            job = reply.json_body()
            if job["status"] in TERMINAL:
                return sample.model_copy(
                    update={
                        "done": time.time(),
                        "status": job["status"],
                        "images": images,
                        "polls": polls,
                        "server": server_times(job),
                    }
                )
        return sample.model_copy(update={"status": "timeout", "polls": polls})

    async def closed(self) -> None:
        """Each user submits, waits until done, and repeats until the end."""
        headers = _headers(self.spec.api_key)

        async def user() -> None:
            conn = Connection(self.spec.url, headers)
            try:
                while time.time() < self.end:
                    sample = await self.job(conn)
                    self.samples.append(sample)
                    if sample.status == "error":
                        await asyncio.sleep(self.spec.poll_s)  # no hot loop on a dead server
            finally:
                await conn.close()

        await asyncio.gather(*(user() for _ in range(self.spec.users)))

    async def open(self) -> None:
        """Poisson arrivals at `rate` per second, each job on a connection of its own."""
        pool = Pool(self.spec.url, _headers(self.spec.api_key))
        rng = random.Random(self.spec.seed)
        tasks: list[asyncio.Task[None]] = []
        at = time.time()

        async def one() -> None:
            conn = pool.acquire()
            self.samples.append(await self.job(conn))
            pool.release(conn)

        while (at := at + rng.expovariate(self.spec.rate)) < self.end:
            await asyncio.sleep(max(0.0, at - time.time()))
            tasks.append(asyncio.create_task(one()))
        if tasks:
            await asyncio.wait(tasks)
        await pool.close()


async def run_load(spec: LoadSpec) -> LoadResult:
    """Drive one load point and collect its samples."""
    cpu = time.process_time()
    driver = Driver(spec)
    await (driver.closed() if spec.mode == "closed" else driver.open())
    return LoadResult(
        spec=spec,
        started=driver.start,
        ended=driver.end,
        samples=driver.samples,
        cpu_s=time.process_time() - cpu,
    )
