"""The one pipeline call per batch: rows in, images out (the only torch user besides models.py)."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from PIL.Image import Image

from core.jobs import Bucket

log = logging.getLogger(__name__)

# Called after each denoising step with the number of steps done; answers False to stop early.
StepHook = Callable[[int], bool]


@dataclass(frozen=True)
class Row:
    """One image to make: a job's prompt with its own seed."""

    job_id: str
    index: int
    prompt: str
    negative_prompt: str | None
    seed: int


class Engine:
    """A loaded diffusers pipeline and how to call it for a batch."""

    def __init__(self, pipe: Any) -> None:
        self.pipe = pipe

    def generate(self, rows: Sequence[Row], bucket: Bucket, on_step: StepHook) -> list[Image]:
        """One pipeline call; a generator per row keeps each image independent of its batch."""
        negatives = [r.negative_prompt for r in rows]
        generators = [torch.Generator("cpu").manual_seed(r.seed) for r in rows]

        def callback(pipe: Any, step: int, _t: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
            if not on_step(step + 1):
                pipe._interrupt = True  # diffusers skips the remaining steps
            return kwargs

        with torch.inference_mode():
            result = self.pipe(
                prompt=[r.prompt for r in rows],
                negative_prompt=None
                if all(n is None for n in negatives)
                else [n or "" for n in negatives],
                width=bucket.width,
                height=bucket.height,
                num_inference_steps=bucket.steps,
                guidance_scale=bucket.guidance_scale,
                generator=generators,
                callback_on_step_end=callback,
                output_type="pil",
            )
        images: list[Image] = result.images
        if len(images) != len(rows):
            raise RuntimeError(f"pipeline returned {len(images)} images for {len(rows)} rows")
        return images


def load_engine(model: str, cache_dir: Any, device: str | None, dtype: str | None) -> Engine:
    """Load the configured model once per worker process."""
    from worker.models import load_pipeline

    return Engine(load_pipeline(model, cache_dir, device=device, dtype=dtype))
