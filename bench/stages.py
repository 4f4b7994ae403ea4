"""Where a job's time went, and how fast a run made images: pure functions of the samples.

Per job: gateway (submit to 202), queue (waiting for a free pipeline), batch wait (the pipeline was
free but the job's call had not begun: dispatch, filling, claiming), model (the pipeline call),
storage (encode and upload, after batch-mates' uploads), notify (finished to seen by the client).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Protocol

from pydantic import BaseModel

STAGES = ("gateway", "queue", "batch_wait", "model", "storage", "notify", "overhead", "e2e")
# Completions closer than this are one batch when the server says nothing about batches (peer).
SAME_BATCH_S = 0.015


class Spread(BaseModel):
    """A distribution in a few numbers; all None when it has no values."""

    n: int = 0
    mean: float | None = None
    p50: float | None = None
    p95: float | None = None
    p99: float | None = None
    min: float | None = None
    max: float | None = None


def percentile(ordered: Sequence[float], q: float) -> float:
    """The q-th percentile (0-100) of sorted values, interpolating between neighbours."""
    rank = (len(ordered) - 1) * q / 100
    low, high = math.floor(rank), math.ceil(rank)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def spread(values: Iterable[float], scale: float = 1.0) -> Spread:
    """Mean, percentiles and range of `values` times `scale`."""
    ordered = sorted(v * scale for v in values)
    if not ordered:
        return Spread()
    return Spread(
        n=len(ordered),
        mean=sum(ordered) / len(ordered),
        p50=percentile(ordered, 50),
        p95=percentile(ordered, 95),
        p99=percentile(ordered, 99),
        min=ordered[0],
        max=ordered[-1],
    )


class Times(Protocol):
    """The server's timestamps of a job (load.ServerTimes)."""

    created: float
    started: float | None
    finished: float | None
    run_s: float | None
    batch_size: int | None
    batch_id: str | None
    model_done: float | None
    worker: str | None


class Job(Protocol):
    """One job as the client saw it (load.Sample)."""

    @property
    def submit(self) -> float: ...
    @property
    def accepted(self) -> float | None: ...
    @property
    def done(self) -> float | None: ...
    @property
    def status(self) -> str: ...
    @property
    def images(self) -> int: ...
    @property
    def server(self) -> Times | None: ...


@dataclass(frozen=True)
class Call:
    """One pipeline call as its jobs recorded it."""

    key: str
    worker: str
    start: float  # the pipeline call began
    end: float  # its last job was finished in the ledger
    images: int
    rows: int  # rows of the call (the batch size), ours or not
    jobs: int  # our jobs in it


def model_span(t: Times) -> tuple[float, float]:
    """When the job's pipeline call began and ended (approximated from the claim if unrecorded)."""
    run = t.run_s or 0.0
    if t.model_done is not None:
        return t.model_done - run, t.model_done
    start = t.started if t.started is not None else t.created
    return start, start + run


def call_key(t: Times) -> str:
    """Which pipeline call a job was in: its batch id, or its worker and claim time."""
    return t.batch_id or f"{t.worker}@{t.started}"


def calls_of(jobs: Sequence[Job]) -> list[Call]:
    """The pipeline calls behind finished jobs, by batch id (or worker and start when absent)."""
    groups: dict[str, list[Times]] = {}
    for job in jobs:
        t = job.server
        if t is not None and t.finished is not None and job.status == "succeeded":
            groups.setdefault(call_key(t), []).append(t)
    return [_call(key, times) for key, times in groups.items()]


def _call(key: str, times: list[Times]) -> Call:
    first = times[0]
    start, _ = model_span(first)
    return Call(
        key=key,
        worker=first.worker or "",
        start=start,
        end=max(t.finished or 0.0 for t in times),
        images=first.batch_size or len(times),
        rows=first.batch_size or len(times),
        jobs=len(times),
    )


def free_since(calls: Sequence[Call]) -> dict[str, float]:
    """Per call, when its worker finished the call before it (-inf for a worker's first)."""
    by_worker: dict[str, list[Call]] = {}
    for call in calls:
        by_worker.setdefault(call.worker, []).append(call)
    free: dict[str, float] = {}
    for mine in by_worker.values():
        mine.sort(key=lambda c: c.start)
        free[mine[0].key] = -math.inf
        for before, call in itertools.pairwise(mine):
            free[call.key] = before.end
    return free


def job_stages(job: Job, free: float) -> dict[str, float]:
    """The stages of one finished job, in seconds; `free` is when its worker became free."""
    t = job.server
    assert t is not None
    assert t.finished is not None
    assert job.done is not None
    start, done = model_span(t)
    ready = max(t.created, free)
    stages = {
        "gateway": (job.accepted or job.submit) - job.submit,
        "queue": max(0.0, ready - t.created),
        "batch_wait": max(0.0, start - ready),
        "model": done - start,
        # The worker takes finished_at once the job's images are stored, before the ledger write.
        "storage": max(0.0, t.finished - done),
        "notify": max(0.0, job.done - t.finished),
        "e2e": job.done - job.submit,
    }
    stages["overhead"] = stages["e2e"] - stages["queue"] - stages["batch_wait"] - stages["model"]
    return stages


def stage_spreads(jobs: Sequence[Job], calls: Sequence[Call]) -> dict[str, Spread]:
    """Each stage's distribution in milliseconds over finished jobs (e2e alone for the peer)."""
    free = free_since(calls)
    by_key = {c.key: c for c in calls}
    values: dict[str, list[float]] = {name: [] for name in STAGES}
    for job in jobs:
        if job.status != "succeeded" or job.done is None:
            continue
        t = job.server
        key = None if t is None else call_key(t)
        if t is None or key not in by_key:
            values["e2e"].append(job.done - job.submit)
            continue
        for name, value in job_stages(job, free[by_key[key].key]).items():
            values[name].append(value)
    return {name: spread(v, 1000) for name, v in values.items() if v}


def peer_calls(jobs: Sequence[Job]) -> list[Call]:
    """Batches guessed from completion times, for a server that reports none."""
    done = sorted((j.done, j.images) for j in jobs if j.status == "succeeded" and j.done)
    calls: list[Call] = []
    for at, images in done:
        if calls and at - calls[-1].end <= SAME_BATCH_S:
            last = calls[-1]
            calls[-1] = Call(
                last.key, "", last.start, at, last.images + images, last.rows + 1, last.jobs + 1
            )
        else:
            calls.append(Call(str(len(calls)), "", at, at, images, 1, 1))
    return calls


def images_per_s(calls: Sequence[Call], window: tuple[float, float]) -> float | None:
    """Images/s from the calls that ended inside `window`, between the first and last end."""
    # Counting from the first call's end to the last's measures whole calls only, where a plain
    # count over the window would be off by up to a batch at each edge.
    inside = sorted((c for c in calls if window[0] <= c.end <= window[1]), key=lambda c: c.end)
    if len(inside) >= 2 and inside[-1].end > inside[0].end:
        return sum(c.images for c in inside[1:]) / (inside[-1].end - inside[0].end)
    if inside:
        return sum(c.images for c in inside) / (window[1] - window[0])
    return None


def fill_ratio(calls: Sequence[Call], window: tuple[float, float], max_rows: int) -> float | None:
    """Mean rows per call over the batch cap, for calls that ended inside `window`."""
    inside = [c.rows for c in calls if window[0] <= c.end <= window[1]]
    return sum(inside) / len(inside) / max_rows if inside else None
