"""The job model: its status machine, the request a client submits, and the job a client reads."""

from __future__ import annotations

import json
import secrets
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, field_validator

from core.events import WebhookSpec, WebhookView

MAX_SEED = 2**32 - 1
MAX_METADATA_BYTES = 4096
# One unit of work: a guided 512 x 512, 25-step image (guidance doubles the denoiser's work).
UNIT_WORK = 2 * 512 * 512 * 25
# Every reader of a stored record must be able to parse it: pydantic-core's JSON parser stops at
# 200 levels, and the record wraps a free-form field in a few levels of its own.
MAX_FREE_FORM_DEPTH = 32


class JobStatus(StrEnum):
    """Where a job is in its life; terminal states never change."""

    QUEUED = "queued"  # accepted, waiting for a worker (again, after a reaped attempt)
    RUNNING = "running"  # claimed by a worker attempt that holds a lease
    SUCCEEDED = "succeeded"  # every image stored
    FAILED = "failed"  # gave up; `error` says why
    CANCELED = "canceled"  # the client asked; nothing of it is uploaded

    @property
    def terminal(self) -> bool:
        """True for states a job never leaves."""
        return self in TERMINAL


TERMINAL = frozenset({JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELED})

# The one table of legal moves. RUNNING -> RUNNING is a progress report or lease renewal by the
# attempt that holds the job; RUNNING -> QUEUED is the reaper handing back a dead attempt's job.
TRANSITIONS: dict[JobStatus, frozenset[JobStatus]] = {
    JobStatus.QUEUED: frozenset({JobStatus.RUNNING, JobStatus.CANCELED, JobStatus.FAILED}),
    JobStatus.RUNNING: frozenset(
        {
            JobStatus.RUNNING,
            JobStatus.QUEUED,
            JobStatus.SUCCEEDED,
            JobStatus.FAILED,
            JobStatus.CANCELED,
        }
    ),
    JobStatus.SUCCEEDED: frozenset(),
    JobStatus.FAILED: frozenset(),
    JobStatus.CANCELED: frozenset(),
}


def sources_of(target: JobStatus) -> frozenset[JobStatus]:
    """Every status from which `target` may be entered."""
    return frozenset(s for s, targets in TRANSITIONS.items() if target in targets)


def new_job_id() -> str:
    """A job id with 128 random bits, URL-safe and never sequential."""
    return "job_" + secrets.token_hex(16)


OutputFormat = Literal["png", "jpeg", "webp"]
Priority = Literal["high", "normal", "low"]
Task = Literal["txt2img", "img2img", "inpaint"]
Scheduler = Literal["default", "ddim", "euler", "euler_a", "dpmpp_2m", "pndm"]
MAX_INPUT_REF = 1_048_576  # an image or mask reference: a URL, upload id, or data: URI
MODEL_NAME = r"^[a-z0-9][a-z0-9._-]{0,62}$"
FreeForm = TypeVar("FreeForm")


def json_depth(value: object) -> int:
    """How deeply lists and dicts nest in `value` (a scalar is 0), walked without recursion."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            item = item.values()
        elif not isinstance(item, list | tuple):
            continue
        deepest = max(deepest, depth)
        stack.extend((child, depth + 1) for child in item)
    return deepest


def bounded(name: str, value: FreeForm, *, max_depth: int, max_bytes: int) -> FreeForm:
    """`value`, a free-form JSON field, if it nests and weighs little enough; else ValueError."""
    # Depth first: serializing a deeply nested value is what must not happen.
    if json_depth(value) > max_depth:
        raise ValueError(f"{name} must nest at most {max_depth} levels deep")
    if len(json.dumps(value, separators=(",", ":")).encode()) > max_bytes:
        raise ValueError(f"{name} must serialize to at most {max_bytes} bytes")
    return value


class LoraRef(BaseModel):
    """A LoRA from GET /v1/models, applied at `scale`."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(min_length=1, max_length=128)
    scale: float = Field(1.0, ge=-4.0, le=4.0)


class RequestFields(BaseModel):
    """What every request names, whether the model's defaults are filled in yet or not."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    prompt: str = Field(min_length=1, max_length=2000)
    negative_prompt: str | None = Field(None, max_length=2000)
    seed: int | None = Field(None, ge=0, le=MAX_SEED)
    num_images: int = Field(1, ge=1, le=4)
    output_format: OutputFormat = "png"
    metadata: dict[str, Any] = Field(default_factory=dict)
    priority: Priority = Field(
        "normal", description="dispatch class; a key may be capped below `high`"
    )
    model: str | None = Field(
        None, pattern=MODEL_NAME, description="a model of GET /v1/models; default: the first"
    )
    task: Task = Field("txt2img", description="img2img and inpaint take `image` (and `mask`)")
    loras: list[LoraRef] = Field(default_factory=list, max_length=4)
    image: str | None = Field(
        None,
        max_length=MAX_INPUT_REF,
        description="an https URL, a data: URI, or upload:<id> from POST /v1/uploads",
    )
    mask: str | None = Field(
        None, max_length=MAX_INPUT_REF, description="inpaint: white where to paint"
    )
    strength: float | None = Field(
        None, gt=0.0, le=1.0, description="img2img/inpaint: how much of the input to redo"
    )
    scheduler: Scheduler = Field("default", description="the model's own, or one by name")
    deadline_s: float | None = Field(
        None,
        gt=0,
        le=7 * 86_400,
        description="fail the job (deadline_exceeded) unless it finished this long after submit",
    )

    @field_validator("prompt")
    @classmethod
    def _not_blank(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("prompt must contain some text")
        return value

    @field_validator("metadata")
    @classmethod
    def _small_metadata(cls, value: dict[str, Any]) -> dict[str, Any]:
        depth, size = MAX_FREE_FORM_DEPTH, MAX_METADATA_BYTES
        return bounded("metadata", value, max_depth=depth, max_bytes=size)


class JobRequest(RequestFields):
    """A request as stored and returned: every value it runs with (the model's defaults in)."""

    width: int = Field(512, ge=64, le=4096, multiple_of=8)
    height: int = Field(512, ge=64, le=4096, multiple_of=8)
    steps: int = Field(25, ge=1, le=150)
    guidance_scale: float = Field(7.5, ge=0.0, le=30.0)

    def seeded(self, seed: int) -> JobRequest:
        """This request with its seed fixed, as stored and returned."""
        return self.model_copy(update={"seed": seed})

    @property
    def units(self) -> float:
        """The job's work units: pixels x steps x images (x 2 with guidance), 512², 25 steps = 1."""
        guided = 2 if self.guidance_scale > 1 else 1
        work = self.width * self.height * self.steps * self.num_images * guided
        return work / UNIT_WORK


class JobCreate(RequestFields):
    """The body of a submission: the request (sizes, steps and guidance default to the model's),
    plus an optional webhook kept out of `request`."""

    width: int | None = Field(None, ge=64, le=4096, multiple_of=8, description="model's default")
    height: int | None = Field(None, ge=64, le=4096, multiple_of=8, description="model's default")
    steps: int | None = Field(None, ge=1, le=150, description="model's default")
    guidance_scale: float | None = Field(None, ge=0.0, le=30.0, description="model's default")
    webhook: WebhookSpec | None = None

    def job_request(self, **resolved: Any) -> JobRequest:
        """The request as stored and returned: without the webhook, the model's values filled in."""
        # Already validated as a JobCreate: construct without validating every field again.
        fields = {name: getattr(self, name) for name in RequestFields.model_fields}
        for name in ("width", "height", "steps", "guidance_scale"):
            value = resolved.get(name, getattr(self, name))
            if value is not None:
                fields[name] = value
        return JobRequest.model_construct(**{**fields, **resolved})


class Progress(BaseModel):
    """Denoising steps done in the running attempt."""

    step: int = 0
    total_steps: int


class QueueInfo(BaseModel):
    """Where a queued job stands."""

    position: int
    eta_s: float | None
    waiting_for: str | None = None  # set while the job's model has no worker serving


class StoredImage(BaseModel):
    """One image as the ledger records it: where it lives and how it was made."""

    key: str
    seed: int
    width: int
    height: int


class Output(BaseModel):
    """One image as a client reads it; `url` is minted fresh on each read."""

    url: str
    seed: int
    width: int
    height: int


class ErrorInfo(BaseModel):
    """Why a job failed, in words a client can act on."""

    code: str
    message: str


class Metrics(BaseModel):
    """How the job went."""

    queue_s: float | None = None
    run_s: float | None = None
    batch_size: int | None = None
    batch_id: str | None = None  # jobs that shared one pipeline call share this
    # Epoch seconds when the pipeline call returned: with run_s, the call's span; with
    # finished_at (taken once the images are stored), the job's storage time.
    model_done_at: float | None = None
    attempts: int = 0
    worker: str | None = None  # the worker that ran (or runs) the latest attempt
    model: str | None = None  # the catalog model the job is for; only its pool's workers run it


class Job(BaseModel):
    """A job as the API returns it; fields may grow, never change meaning."""

    id: str
    status: JobStatus
    created_at: datetime
    started_at: datetime | None = None
    finished_at: datetime | None = None
    request: JobRequest
    progress: Progress | None = None
    queue: QueueInfo | None = None
    outputs: list[Output] = Field(default_factory=list)
    error: ErrorInfo | None = None
    metrics: Metrics
    webhook: WebhookView | None = None
    deadline_at: datetime | None = None  # unless it has finished by then, it fails
    expires_at: datetime | None = None  # when a finished job and its images are deleted


@dataclass(frozen=True)
class Bucket:
    """What must be equal for jobs to share one pipeline call."""

    width: int
    height: int
    steps: int
    guidance_scale: float
    model: str = ""  # the catalog name; a worker serves one model
    task: str = "txt2img"  # txt2img, img2img or inpaint: each is its own pipeline call
    loras: tuple[tuple[str, float], ...] = ()  # (name, scale), sorted by name
    strength: float | None = None  # img2img and inpaint only
    scheduler: str = "default"  # the batch engine runs one scheduler per call

    @classmethod
    def of(cls, request: JobRequest, model: str = "") -> Bucket:
        """The bucket a request belongs to."""
        width, height = request.width, request.height
        loras = tuple(sorted((lora.name, lora.scale) for lora in request.loras))
        return cls(
            width,
            height,
            request.steps,
            request.guidance_scale,
            model,
            request.task,
            loras,
            request.strength,
            request.scheduler,
        )

    @property
    def pixels(self) -> int:
        """Pixels of one image in this bucket."""
        return self.width * self.height


def to_datetime(epoch: float | None) -> datetime | None:
    """An epoch timestamp as an aware UTC datetime."""
    return None if epoch is None else datetime.fromtimestamp(epoch, UTC)
