"""What the API returns, as typed objects that tolerate fields this SDK does not know yet."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum
from typing import Any


class JobStatus(StrEnum):
    """Where a job is in its life; the last three never change."""

    QUEUED = "queued"  # accepted, waiting for a worker
    RUNNING = "running"  # a worker is denoising it
    SUCCEEDED = "succeeded"  # every image stored; `outputs` has their URLs
    FAILED = "failed"  # gave up; `error` says why
    CANCELED = "canceled"  # canceled by its owner


TERMINAL = frozenset({JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELED})


def _time(value: Any) -> datetime | None:
    """An ISO 8601 timestamp (the API writes them with an offset), or None."""
    if not value:
        return None
    return datetime.fromisoformat(str(value).replace("Z", "+00:00"))


def _float(value: Any) -> float | None:
    return None if value is None else float(value)


def _int(value: Any) -> int | None:
    return None if value is None else int(value)


def _extra(data: dict[str, Any], known: set[str]) -> dict[str, Any]:
    """The fields of `data` this SDK does not model (newer servers add some)."""
    return {k: v for k, v in data.items() if k not in known}


@dataclass(frozen=True)
class JobRequest:
    """What was asked for, as the server stored it (`seed` is always filled in)."""

    prompt: str
    negative_prompt: str | None = None
    width: int = 512
    height: int = 512
    steps: int = 25
    guidance_scale: float = 7.5
    seed: int | None = None
    num_images: int = 1
    output_format: str = "png"
    metadata: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)
    """Request fields this SDK does not model (`model`, `priority`, `loras`, …)."""

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> JobRequest:
        """Parse the `request` object of a job."""
        known = {f for f in cls.__dataclass_fields__ if f != "extra"}
        fields = {k: v for k, v in data.items() if k in known}
        return cls(**fields, extra=_extra(data, known))


@dataclass(frozen=True)
class Progress:
    """Denoising steps done by the running attempt."""

    step: int
    total_steps: int

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Progress:
        """Parse a job's `progress`."""
        return cls(step=int(data.get("step", 0)), total_steps=int(data["total_steps"]))


@dataclass(frozen=True)
class QueueInfo:
    """Where a queued job stands: images ahead of it (its own included) and the expected wait."""

    position: int
    eta_s: float | None

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> QueueInfo:
        """Parse a job's `queue`."""
        return cls(position=int(data.get("position", 0)), eta_s=_float(data.get("eta_s")))


@dataclass(frozen=True)
class Output:
    """One stored image; `url` is signed and expires (read the job again for a fresh one)."""

    url: str
    seed: int
    width: int
    height: int

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Output:
        """Parse one of a job's `outputs`."""
        return cls(
            url=str(data["url"]),
            seed=int(data["seed"]),
            width=int(data["width"]),
            height=int(data["height"]),
        )


@dataclass(frozen=True)
class JobError:
    """Why a job failed: a stable `code` and a message for people."""

    code: str
    message: str

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> JobError:
        """Parse a job's `error`."""
        return cls(code=str(data.get("code", "")), message=str(data.get("message", "")))


@dataclass(frozen=True)
class Metrics:
    """How the job went: seconds queued and running, the batch it ran in, attempts."""

    queue_s: float | None = None
    run_s: float | None = None
    batch_size: int | None = None
    attempts: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Metrics:
        """Parse a job's `metrics`."""
        return cls(
            queue_s=_float(data.get("queue_s")),
            run_s=_float(data.get("run_s")),
            batch_size=_int(data.get("batch_size")),
            attempts=int(data.get("attempts") or 0),
            extra=_extra(data, {"queue_s", "run_s", "batch_size", "attempts"}),
        )


_JOB_FIELDS = {
    "id",
    "status",
    "created_at",
    "started_at",
    "finished_at",
    "request",
    "progress",
    "queue",
    "outputs",
    "error",
    "metrics",
}


@dataclass(frozen=True)
class Job:
    """A job as the API returned it at one moment; `raw` is the whole JSON object."""

    id: str
    status: str
    """One of `JobStatus` (compare with `JobStatus.SUCCEEDED`); a newer server may add states."""
    created_at: datetime | None
    started_at: datetime | None
    finished_at: datetime | None
    request: JobRequest
    progress: Progress | None
    queue: QueueInfo | None
    outputs: list[Output]
    error: JobError | None
    metrics: Metrics
    extra: dict[str, Any]
    """Top-level fields this SDK does not model (`webhook`, and whatever comes next)."""
    raw: dict[str, Any] = field(repr=False, compare=False)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Job:
        """Parse a job object of the API."""
        progress, queue, error = data.get("progress"), data.get("queue"), data.get("error")
        return cls(
            id=str(data["id"]),
            status=str(data["status"]),
            created_at=_time(data.get("created_at")),
            started_at=_time(data.get("started_at")),
            finished_at=_time(data.get("finished_at")),
            request=JobRequest.from_dict(data.get("request") or {"prompt": ""}),
            progress=Progress.from_dict(progress) if progress else None,
            queue=QueueInfo.from_dict(queue) if queue else None,
            outputs=[Output.from_dict(o) for o in data.get("outputs") or []],
            error=JobError.from_dict(error) if error else None,
            metrics=Metrics.from_dict(data.get("metrics") or {}),
            extra=_extra(data, _JOB_FIELDS),
            raw=data,
        )

    @property
    def terminal(self) -> bool:
        """True once the job has ended (succeeded, failed or canceled): it never changes again."""
        return self.status in TERMINAL

    @property
    def succeeded(self) -> bool:
        """True if every image was made and stored."""
        return self.status == JobStatus.SUCCEEDED


@dataclass(frozen=True)
class ScalerDecision:
    """The autoscaler's last decision."""

    current: int
    desired: int
    reason: str

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ScalerDecision:
        """Parse the queue's `scaler`."""
        return cls(
            current=int(data.get("current", 0)),
            desired=int(data.get("desired", 0)),
            reason=str(data.get("reason", "")),
        )


@dataclass(frozen=True)
class QueueStatus:
    """The queue as a whole; `raw` also holds what newer servers add (depths per model, …)."""

    queued: int
    running: int
    workers: int
    images_per_s: float | None
    eta_s: float | None
    scaler: ScalerDecision | None
    raw: dict[str, Any] = field(repr=False, compare=False)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> QueueStatus:
        """Parse `GET /v1/queue`."""
        workers = data.get("workers", 0)
        scaler = data.get("scaler")
        return cls(
            queued=int(data.get("queued", 0)),
            running=int(data.get("running", 0)),
            workers=len(workers) if isinstance(workers, list) else int(workers or 0),
            images_per_s=_float(data.get("images_per_s")),
            eta_s=_float(data.get("eta_s")),
            scaler=ScalerDecision.from_dict(scaler) if isinstance(scaler, dict) else None,
            raw=data,
        )


@dataclass(frozen=True)
class Model:
    """A model the server can run, and its state (loaded, loading, …)."""

    name: str
    state: str | None
    raw: dict[str, Any] = field(repr=False, compare=False)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Model:
        """Parse one entry of `GET /v1/models`."""
        name = data.get("name") or data.get("id") or ""
        state = data.get("state")
        return cls(name=str(name), state=None if state is None else str(state), raw=data)


@dataclass(frozen=True)
class Page:
    """One page of `GET /v1/jobs`."""

    jobs: list[Job]
    next_cursor: str | None

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Page:
        """Parse a page of jobs."""
        jobs = [Job.from_dict(j) for j in data.get("jobs") or []]
        return cls(jobs=jobs, next_cursor=data.get("next_cursor") or None)
