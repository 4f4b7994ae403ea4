"""Parts for the step engine's tests: references through the pipelines' own `__call__`, a loop
driven step by step, and a listener that records what the engine tells it."""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion_img2img import (
    StableDiffusionImg2ImgPipeline,
)
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion_inpaint import (
    StableDiffusionInpaintPipeline,
)
from PIL import Image as PILImage
from PIL.Image import Image

from worker.families import family_of
from worker.intake import Intake
from worker.loop import HostStopwatch, Loop, Step
from worker.reports import StepReport
from worker.schedulers import make_scheduler
from worker.tracks import StepJob

# The spec: a job's image within one level (of 255) of mean absolute difference from its reference.
PARITY = 1.0
# Tighter, on the final latents: the tiny model's random VAE hides some errors (a row denoised at
# another row's timestep moves its latents by ~0.1 but its pixels by under half a level).
LATENT_PARITY = 1e-3


def pixel_distance(a: Image, b: Image) -> float:
    """Mean absolute difference between two images, on the 0..255 scale."""
    return float(np.abs(np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)).mean())


def distances(made: Sequence[Image], wanted: Sequence[Image]) -> list[float]:
    """Pixel distance image by image."""
    assert len(made) == len(wanted)
    return [pixel_distance(a, b) for a, b in zip(made, wanted, strict=True)]


def init_image(seed: int = 0, size: tuple[int, int] = (64, 64)) -> Image:
    """A noise picture to start img2img and inpainting from."""
    pixels = np.random.default_rng(seed).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    return PILImage.fromarray(pixels)


def right_half_mask(size: tuple[int, int] = (64, 64)) -> Image:
    """White (paint) on the right half."""
    mask = np.zeros((size[1], size[0]), dtype=np.uint8)
    mask[:, size[0] // 2 :] = 255
    return PILImage.fromarray(mask)


@dataclass
class Reference:
    """What the pipeline's own `__call__` made for a job: its images and final latents."""

    images: list[Image]
    latents: torch.Tensor


def reference(pipe: Any, job: StepJob) -> list[Image]:
    """`job`'s images alone through the pipeline's own `__call__` (same seeds, same scheduler)."""
    return reference_run(pipe, job).images


def reference_run(pipe: Any, job: StepJob) -> Reference:
    """`job` alone through the pipeline's own `__call__`, keeping the latents it decoded."""
    generator: Any = job.generators() if job.num_images > 1 else job.generators()[0]
    common: dict[str, Any] = {
        "prompt": job.prompt,
        "negative_prompt": job.negative_prompt,
        "num_inference_steps": job.steps,
        "guidance_scale": job.guidance_scale,
        "num_images_per_prompt": job.num_images,
        "generator": generator,
    }
    if job.image is None:
        runner, extra = pipe, {"width": job.width, "height": job.height}
    elif job.mask is None:
        runner = StableDiffusionImg2ImgPipeline(**pipe.components, requires_safety_checker=False)
        extra = {"image": job.image} | _strength(job)
    else:
        runner = StableDiffusionInpaintPipeline(**pipe.components, requires_safety_checker=False)
        extra = {"image": job.image, "mask_image": job.mask, "width": job.width}
        extra |= {"height": job.height} | _strength(job)
    latents: list[torch.Tensor] = []

    def keep(_pipe: Any, _i: int, _t: Any, tensors: dict[str, Any]) -> dict[str, Any]:
        latents.append(tensors["latents"])
        return tensors

    base = pipe.scheduler
    runner.scheduler = make_scheduler(job.scheduler, base)
    runner.set_progress_bar_config(disable=True)
    try:
        images: list[Image] = runner(**common, **extra, callback_on_step_end=keep).images
    finally:
        pipe.scheduler = base
    return Reference(images, latents[-1])


def _strength(job: StepJob) -> dict[str, float]:
    return {} if job.strength is None else {"strength": job.strength}


@dataclass
class Run:
    """What a loop driven step by step made."""

    images: dict[str, list[Image]]
    latents: dict[str, torch.Tensor]
    steps: list[Step]


def run_loop(pipe: Any, joins: Mapping[int, Sequence[StepJob]], model: str = "m") -> Run:
    """Drive a Loop by hand: `joins[i]` join just before step i; run until every job is done."""
    family = family_of(pipe)
    intake = Intake(family, model)
    loop = Loop(pipe.unet, stopwatch=HostStopwatch())
    pending = dict(joins)
    run = Run({}, {}, [])
    index = 0
    while pending or loop.tracks:
        started = intake.start(pending.pop(index, []))
        for outcome in started.values():
            assert not isinstance(outcome, Exception), outcome
            loop.join(outcome)
        step = loop.step()
        assert not step.failed, step.failed
        run.steps.append(step)
        for track in step.finished:
            run.images[track.job_id] = family.decode(track.latents, track.generators)
            run.latents[track.job_id] = track.latents
        index += 1
    return run


def sharing(run: Run) -> int:
    """The most jobs any one denoiser call held."""
    return max(len(s.advanced) for s in run.steps)


@dataclass
class Recorder:
    """A listener that records every call, and lets a test wait for one."""

    reports: list[StepReport] = field(default_factory=list)
    done: dict[str, list[Image]] = field(default_factory=dict)
    failed: dict[str, Exception] = field(default_factory=dict)
    canceled: list[str] = field(default_factory=list)
    order: list[tuple[str, str]] = field(default_factory=list)  # (event, job id)
    on_report: Callable[[StepReport], None] | None = None
    cond: threading.Condition = field(default_factory=threading.Condition)

    def on_progress(self, reports: Sequence[StepReport]) -> None:
        """Record progress."""
        with self.cond:
            self.reports.extend(reports)
            self.order.extend(("progress", r.job_id) for r in reports)
            self.cond.notify_all()
        for report in reports:
            if self.on_report is not None:
                self.on_report(report)

    def on_done(self, job_id: str, images: list[Image]) -> None:
        """Record images."""
        self._end("done", job_id, lambda: self.done.__setitem__(job_id, images))

    def on_failed(self, job_id: str, error: Exception) -> None:
        """Record a failure."""
        self._end("failed", job_id, lambda: self.failed.__setitem__(job_id, error))

    def on_canceled(self, job_id: str) -> None:
        """Record a cancel."""
        self._end("canceled", job_id, lambda: self.canceled.append(job_id))

    def _end(self, kind: str, job_id: str, record: Callable[[], None]) -> None:
        with self.cond:
            record()
            self.order.append((kind, job_id))
            self.cond.notify_all()

    def ended(self) -> set[str]:
        """Jobs reported as ended."""
        with self.cond:
            return {job_id for kind, job_id in self.order if kind != "progress"}

    def wait_for(self, predicate: Callable[[], bool], timeout: float = 120) -> None:
        """Wait until `predicate` (called under the lock) holds."""
        with self.cond:
            assert self.cond.wait_for(predicate, timeout), "timed out waiting for the engine"

    def done_steps(self, job_id: str) -> list[int]:
        """The timesteps done in each report of `job_id`."""
        with self.cond:
            return [r.done for r in self.reports if r.job_id == job_id]


class HookedStopwatch(HostStopwatch):
    """Host timing that also calls `hook(n)` on the loop thread just before the n-th call."""

    def __init__(self, hook: Callable[[int], None]) -> None:
        super().__init__()
        self.hook, self.calls = hook, 0

    def begin(self) -> None:
        """Run the hook, then time."""
        self.calls += 1
        self.hook(self.calls)
        super().begin()


class CheckedUNet:
    """The real UNet behind a guard that raises on non-finite input, as a numerics check would."""

    def __init__(self, unet: Any) -> None:
        self.unet = unet
        self.device = unet.device
        self.calls: list[tuple[int, bool]] = []  # rows of each call, and whether it raised

    def __call__(self, sample: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        """Refuse NaN rows, else denoise."""
        finite = bool(torch.isfinite(sample).all())
        self.calls.append((len(sample), not finite))
        if not finite:
            raise FloatingPointError("non-finite latents reached the denoiser")
        return self.unet(sample, *args, **kwargs)
