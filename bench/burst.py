"""The gateway alone, no worker: how many submits and status reads it takes, and how fast.

Three phases over the same `clients` connections (the seed's burst of 300):
- capacity: every client submits back to back; the most submits/s the gateway manages. Latency
  here is bound by Little's law (300 clients / throughput), so it is reported, not targeted;
- paced: submits arrive at `rate`/s spread over the clients, each timed from when it was due, so
  a gateway that falls behind shows its backlog (the p99 the target is about);
- polls: every client reads jobs made above, back to back.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Awaitable, Callable

from pydantic import BaseModel, ConfigDict

from bench import BenchError
from bench.client import Connection, HttpError
from bench.stages import Spread, spread

# Submits made before the phases are measured: the gateway opens its Redis connections.
WARMUP_S = 1.0


class BurstSpec(BaseModel):
    """What the gateway-only run does."""

    model_config = ConfigDict(frozen=True)

    url: str
    api_key: str | None = None
    clients: int = 300
    duration_s: float = 3.0  # per phase
    rate: float = 1500.0  # paced submits/s
    body: dict[str, object]


class Phase(BaseModel):
    """Requests of one phase and their latency in milliseconds."""

    requests: int
    errors: int  # refused, broken, or (paced) still unanswered when the phase gave up
    seconds: float
    per_s: float  # requests answered successfully per second
    latency_ms: Spread


class BurstResult(BaseModel):
    """The gateway alone."""

    spec: BurstSpec
    capacity: Phase  # back-to-back submits
    paced: Phase  # submits at spec.rate
    poll: Phase  # back-to-back status reads
    cpu_s: float  # the generator's own CPU


Call = Callable[[Connection], Awaitable[bool]]


def _phase(latencies: list[float], errors: int, wall: float) -> Phase:
    n = len(latencies)
    return Phase(
        requests=n,
        errors=errors,
        seconds=wall,
        per_s=(n - errors) / wall,
        latency_ms=spread(latencies),
    )


async def back_to_back(clients: list[Connection], seconds: float, call: Call) -> Phase:
    """Every client calls again as soon as its last call returns, for `seconds`."""
    latencies: list[float] = []
    errors = 0
    end = time.perf_counter() + seconds

    async def client(conn: Connection) -> None:
        nonlocal errors
        while (t := time.perf_counter()) < end:
            errors += not await call(conn)
            latencies.append((time.perf_counter() - t) * 1000)

    start = time.perf_counter()
    await asyncio.gather(*(client(c) for c in clients))
    return _phase(latencies, errors, time.perf_counter() - start)


async def paced(clients: list[Connection], seconds: float, rate: float, call: Call) -> Phase:
    """Calls due every 1/rate s on whichever client is free, timed from when each was due."""
    idle: asyncio.Queue[Connection] = asyncio.Queue()
    for conn in clients:
        idle.put_nowait(conn)
    latencies: list[float] = []
    errors = 0

    async def one(due: float) -> None:
        nonlocal errors
        conn = await idle.get()
        errors += not await call(conn)
        latencies.append((time.perf_counter() - due) * 1000)
        idle.put_nowait(conn)

    start = time.perf_counter()
    tasks: dict[asyncio.Task[None], float] = {}
    for k in range(int(seconds * rate)):
        due = start + k / rate
        await asyncio.sleep(max(0.0, due - time.perf_counter()))
        tasks[asyncio.create_task(one(due))] = due
    # A gateway that cannot keep up would take long to drain: give it as long again, then count
    # what is left as failed, each with the wait so far (so the percentiles are lower bounds).
    _, late = await asyncio.wait(tasks, timeout=seconds)
    for task in late:
        task.cancel()
        latencies.append((time.perf_counter() - tasks[task]) * 1000)
    return _phase(latencies, errors + len(late), time.perf_counter() - start)


async def run_burst(spec: BurstSpec) -> BurstResult:
    """Capacity, paced submits, then polls."""
    cpu = time.process_time()
    clients = [Connection(spec.url, _headers(spec.api_key)) for _ in range(spec.clients)]
    made: list[str] = []

    async def submit(conn: Connection) -> bool:
        try:
            reply = await conn.request("POST", "/v1/jobs", spec.body)
        except HttpError:
            return False
        if reply.status == 202:
            made.append(reply.json_body()["id"])
        return reply.status == 202

    async def poll(conn: Connection) -> bool:
        try:
            reply = await conn.request("GET", f"/v1/jobs/{random.choice(made)}")
        except HttpError:
            return False
        return reply.status == 200

    await back_to_back(clients, min(WARMUP_S, spec.duration_s), submit)
    if not made:
        raise BenchError("the gateway accepted no job: is it up, and is the key valid?")
    capacity = await back_to_back(clients, spec.duration_s, submit)
    at_rate = await paced(clients, spec.duration_s, spec.rate, submit)
    for conn in clients:
        await conn.close()  # a request cancelled mid-flight leaves its connection unusable
    polled = await back_to_back(clients, spec.duration_s, poll)
    for conn in clients:
        await conn.close()
    return BurstResult(
        spec=spec, capacity=capacity, paced=at_rate, poll=polled, cpu_s=time.process_time() - cpu
    )


def _headers(api_key: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {api_key}"} if api_key else {}
