"""The one pipeline call per batch: rows in, images out (the only torch user besides models.py)."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image as PILImage
from PIL.Image import Image

from core.catalog import Defaults, ModelSpec
from core.errors import ServiceError
from core.jobs import Bucket
from core.loras import LoraCatalog
from worker.inputs import fit
from worker.loras import AdapterError, Adapters
from worker.schedulers import make_scheduler

log = logging.getLogger(__name__)

# Called after each denoising step with the number of steps done; answers False to stop early.
StepHook = Callable[[int], bool]


class UnsupportedTask(ServiceError):
    """A batch asked this worker's model for a task it does not do."""

    code = "unsupported_task"


class WrongModel(ServiceError):
    """A batch for another model reached this worker (a routing fault, never the client's)."""

    code = "wrong_model"


@dataclass(frozen=True)
class Row:
    """One image to make: a job's prompt with its own seed (and its inputs, fitted to its size)."""

    job_id: str
    index: int
    prompt: str
    negative_prompt: str | None
    seed: int
    image: Image | None = field(default=None, compare=False)  # img2img and inpaint
    mask: Image | None = field(default=None, compare=False)  # inpaint: white where to paint


class Engine:
    """A loaded diffusers pipeline, its twins for the other tasks, and how to call them."""

    def __init__(
        self, pipe: Any, spec: ModelSpec | None = None, adapters: Adapters | None = None
    ) -> None:
        self.pipe = pipe
        self.spec = spec
        self.adapters = adapters
        self.pipes: dict[str, Any] = {"txt2img": pipe}
        self.scheduler = pipe.scheduler  # the model's own: each call's is made from its config

    def pipe_for(self, task: str) -> Any:
        """The pipeline for `task`, made once from the loaded one and sharing its weights."""
        if task not in self.pipes:
            if self.spec is not None and task not in self.spec.tasks:
                raise UnsupportedTask(f"model {self.spec.name} does not do {task}")
            self.pipes[task] = _twin(self.pipe, task)
        return self.pipes[task]

    def generate(self, rows: Sequence[Row], bucket: Bucket, on_step: StepHook) -> list[Image]:
        """One pipeline call; a generator per row keeps each image independent of its batch."""
        if self.spec is not None and bucket.model and bucket.model != self.spec.name:
            raise WrongModel(f"a batch for model {bucket.model} reached a {self.spec.name} worker")
        self._use_loras(bucket.loras)
        pipe = self.pipe_for(bucket.task)
        pipe.scheduler = make_scheduler(bucket.scheduler, self.scheduler)  # fresh for each call
        try:
            images = self._call(pipe, rows, bucket, on_step)
        finally:
            pipe.scheduler = self.scheduler
        if len(images) != len(rows):
            raise RuntimeError(f"pipeline returned {len(images)} images for {len(rows)} rows")
        if bucket.task == "inpaint":
            # Outside the mask, the input's own pixels: the VAE's round trip would blur them.
            images = [paste_back(made, row, bucket) for made, row in zip(images, rows, strict=True)]
        return images

    def _call(
        self, pipe: Any, rows: Sequence[Row], bucket: Bucket, on_step: StepHook
    ) -> list[Image]:
        """The pipeline's own call over `rows`."""
        negatives = [r.negative_prompt for r in rows]
        generators = [torch.Generator("cpu").manual_seed(r.seed) for r in rows]

        def callback(pipe: Any, step: int, _t: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
            # img2img and inpaint skip the first (1 - strength) of the steps: count them as done,
            # so progress still ends at the steps the job asked for.
            skipped = bucket.steps - (getattr(pipe, "num_timesteps", None) or bucket.steps)
            if not on_step(skipped + step + 1):
                pipe._interrupt = True  # diffusers skips the remaining steps
            return kwargs

        with torch.inference_mode():
            result = pipe(
                prompt=[r.prompt for r in rows],
                negative_prompt=None
                if all(n is None for n in negatives)
                else [n or "" for n in negatives],
                num_inference_steps=bucket.steps,
                guidance_scale=bucket.guidance_scale,
                generator=generators,
                callback_on_step_end=callback,
                output_type="pil",
                **self._task_arguments(rows, bucket),
            )
        images: list[Image] = result.images
        return images

    def _use_loras(self, loras: Sequence[tuple[str, float]]) -> None:
        """Switch the LoRAs to the batch's set (none: every adapter off)."""
        if self.adapters is not None:
            self.adapters.use(loras)
        elif loras:
            name = self.spec.name if self.spec else "this model"
            raise AdapterError(f"{name} takes no LoRAs")

    def _task_arguments(self, rows: Sequence[Row], bucket: Bucket) -> dict[str, Any]:
        """What the task's pipeline takes beyond the prompts, steps, guidance and seeds."""
        size = {"width": bucket.width, "height": bucket.height}
        if bucket.task == "txt2img":
            return size
        strength = bucket.strength if bucket.strength is not None else self._defaults().strength
        images = [_fitted(row.image, bucket, "image") for row in rows]
        if bucket.task == "img2img":
            # The img2img pipelines take their size from the image.
            return {"image": images, "strength": strength}
        masks = [_fitted(row.mask, bucket, "mask") for row in rows]
        return {**size, "image": images, "mask_image": masks, "strength": strength}

    def _defaults(self) -> Defaults:
        return self.spec.defaults if self.spec is not None else Defaults()


def _twin(pipe: Any, task: str) -> Any:
    """The img2img or inpaint pipeline over `pipe`'s components: no second copy of the weights."""
    # Imported here: the auto pipelines' module maps every pipeline class diffusers has.
    from diffusers.pipelines.auto_pipeline import (
        AutoPipelineForImage2Image,
        AutoPipelineForInpainting,
    )

    kinds: dict[str, Any] = {
        "img2img": AutoPipelineForImage2Image,
        "inpaint": AutoPipelineForInpainting,
    }
    if task not in kinds:
        raise UnsupportedTask(f"unknown task {task!r}: txt2img, img2img or inpaint")
    twin = kinds[task].from_pipe(pipe)
    twin.set_progress_bar_config(disable=True)
    return twin


def _fitted(image: Image | None, bucket: Bucket, name: str) -> Image:
    """A row's input at the bucket's size (the loader fitted it already; this is a backstop)."""
    if image is None:
        raise ValueError(f"a {bucket.task} row needs its {name}")
    return fit(image, bucket.width, bucket.height, "cover", name)


def paste_back(made: Image, row: Row, bucket: Bucket) -> Image:
    """The made image under the mask, the input elsewhere, blended along a soft mask's edge."""
    original = _fitted(row.image, bucket, "image").convert(made.mode)
    mask = _fitted(row.mask, bucket, "mask").convert("L")
    return PILImage.composite(made, original, mask)


def load_engine(
    spec: ModelSpec, cache_dir: Path, loras: LoraCatalog | None = None, lora_cache_bytes: int = 0
) -> Engine:
    """Load a catalog entry's model once per worker process, with its LoRAs if it takes them."""
    from worker.models import load_pipeline

    pipe = load_pipeline(spec.source, cache_dir, device=spec.device, dtype=spec.dtype)
    adapters = None
    if loras is not None and spec.takes_loras:
        adapters = Adapters(pipe, loras, lora_cache_bytes)
    return Engine(pipe, spec, adapters)
