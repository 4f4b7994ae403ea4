"""A job in flight through the step engine: its own scheduler, generators, latents and rows.

`Starter` prepares a track as the pipeline's `__call__` prepares its loop (timesteps, first latents,
img2img and inpainting inputs, in the same order of random draws); `Track` then does, one step at a
time, what one iteration of that loop does for this job's rows, so that its pixels come out equal.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import (
    rescale_noise_cfg,
    retrieve_timesteps,
)
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion_img2img import (
    StableDiffusionImg2ImgPipeline,
)
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion_inpaint import (
    StableDiffusionInpaintPipeline,
)
from diffusers.utils.torch_utils import randn_tensor
from PIL.Image import Image

from core.errors import ValidationFailed
from worker.admission import Priority
from worker.families import Conditioning, Family, StableDiffusionXL, StepUnsupported
from worker.schedulers import Scheduler, make_scheduler, step_kwargs

# LoRA adapters by name with their weights, sorted: a job's set, and part of its loop key.
LoraSet = tuple[tuple[str, float], ...]


@dataclass(frozen=True)
class LoopKey:
    """What must be equal for jobs to share one denoiser call."""

    model: str
    width: int
    height: int
    loras: LoraSet = ()

    @property
    def pixels(self) -> int:
        """Pixels of one image."""
        return self.width * self.height


@dataclass(frozen=True)
class StepJob:
    """One job as the step engine takes it: every field that changes its pixels."""

    job_id: str
    prompt: str
    negative_prompt: str | None = None
    width: int = 512
    height: int = 512
    steps: int = 25
    guidance_scale: float = 7.5
    guidance_rescale: float = 0.0
    seed: int = 0
    num_images: int = 1  # seeds seed, seed+1, ...
    scheduler: str = "default"
    priority: Priority = Priority.NORMAL
    loras: LoraSet = ()
    image: Image | None = None  # img2img and inpainting: the starting image
    mask: Image | None = None  # inpainting: white where to paint
    strength: float | None = None  # None: the pipeline's default (0.8 img2img, 1.0 inpainting)

    def key(self, model: str) -> LoopKey:
        """The loop key of this job on `model`."""
        return LoopKey(model, self.width, self.height, self.loras)

    def generators(self) -> list[torch.Generator]:
        """One CPU generator per image, as the batch engine seeds them."""
        return [torch.Generator("cpu").manual_seed(self.seed + i) for i in range(self.num_images)]


@dataclass(frozen=True)
class Inpainting:
    """An inpainting job's extra inputs, as the inpainting pipeline keeps them through its loop."""

    mask: torch.Tensor  # latent-sized, doubled under guidance
    masked_latents: torch.Tensor  # the image outside the mask, encoded; doubled under guidance
    image_latents: torch.Tensor | None  # 4-channel UNets: what the unmasked part is reset to
    noise: torch.Tensor  # the first noise, re-applied at each step's noise level
    channels: bool  # 9-channel UNets read mask and masked image as input channels


class Track:
    """One job in flight: its own scheduler, generators and latents, and its denoiser rows."""

    def __init__(
        self,
        job: StepJob,
        key: LoopKey,
        scheduler: Scheduler,
        timesteps: torch.Tensor,
        latents: torch.Tensor,
        cond: Conditioning,
        generators: list[torch.Generator],
        guided: bool,
        inpainting: Inpainting | None = None,
    ) -> None:
        self.job, self.key, self.scheduler = job, key, scheduler
        self.timesteps, self.latents, self.cond = timesteps, latents, cond
        self.generators, self.guided, self.inpainting = generators, guided, inpainting
        self.extra = step_kwargs(scheduler, generators)
        self.index = 0  # timesteps done
        # A host copy, so that a call's timestep rows are one small copy, not kernels per job.
        self.host_timesteps: list[float] = timesteps.to("cpu", torch.float32).tolist()

    @property
    def job_id(self) -> str:
        """The job's id."""
        return self.job.job_id

    @property
    def rows(self) -> int:
        """Denoiser rows: two per image under guidance, one without."""
        return int(self.latents.shape[0]) * (2 if self.guided else 1)

    @property
    def total(self) -> int:
        """Timesteps in this job's schedule (PNDM's warm-up makes more than its steps)."""
        return len(self.timesteps)

    @property
    def done(self) -> bool:
        """Whether every timestep is done."""
        return self.index >= self.total

    def model_input(self) -> torch.Tensor:
        """This step's denoiser input rows: latents (twice under guidance), scaled for `t`."""
        rows = torch.cat([self.latents] * 2) if self.guided else self.latents
        rows = self.scheduler.scale_model_input(rows, self.timesteps[self.index])
        paint = self.inpainting
        if paint is not None and paint.channels:
            rows = torch.cat([rows, paint.mask, paint.masked_latents], dim=1)
        return rows

    def timestep_rows(self) -> list[float]:
        """This step's timestep, once per row (as floats: integer and float schedules mix)."""
        return [self.host_timesteps[self.index]] * self.rows

    def advance(self, noise: torch.Tensor) -> None:
        """Guidance with this job's scale, then its scheduler's step: one timestep done."""
        t = self.timesteps[self.index]
        if self.guided:
            uncond, text = noise.chunk(2)
            noise = uncond + self.job.guidance_scale * (text - uncond)
            if self.job.guidance_rescale > 0.0:
                rescale: Any = rescale_noise_cfg  # untyped in diffusers
                noise = rescale(noise, text, guidance_rescale=self.job.guidance_rescale)
        latents = self.scheduler.step(noise, t, self.latents, **self.extra, return_dict=False)[0]
        if self.inpainting is not None and not self.inpainting.channels:
            latents = self._keep_unmasked(latents)
        self.latents = latents
        self.index += 1

    def _keep_unmasked(self, latents: torch.Tensor) -> torch.Tensor:
        """4-channel inpainting: reset the unmasked part to the image at the next noise level."""
        paint = self.inpainting
        assert paint is not None
        assert paint.image_latents is not None
        proper = paint.image_latents
        if self.index < self.total - 1:
            upcoming = self.timesteps[self.index + 1]
            proper = self.scheduler.add_noise(proper, paint.noise, torch.tensor([upcoming]))
        mask = paint.mask.chunk(2)[0] if self.guided else paint.mask
        return (1 - mask) * proper + mask * latents


class Starter:
    """Prepares tracks as the pipelines' `__call__` prepare their loops (one thread uses it)."""

    def __init__(self, family: Family, model: str) -> None:
        self.family, self.model = family, model
        pipe = family.pipe
        self.base: Scheduler = pipe.scheduler  # schedulers are made from its config
        self.device: torch.device = pipe._execution_device
        # Pipelines of the model's very modules, each with a scheduler of its own that is set to
        # the job's before use: their `prepare_latents` read it. Only this thread touches them.
        self.img2img: Any = _view(StableDiffusionImg2ImgPipeline, pipe) if family.images else None
        self.inpaint: Any = _view(StableDiffusionInpaintPipeline, pipe) if family.images else None

    def check(self, job: StepJob) -> None:
        """StepUnsupported for a job this family cannot run here."""
        if job.image is not None and not self.family.images:
            raise StepUnsupported(f"{type(self.family.pipe).__name__} takes no image in steps")
        if job.mask is not None and job.image is None:
            raise StepUnsupported("an inpainting job needs an image as well as a mask")
        if job.image is not None and int(job.steps * self._strength(job)) < 1:
            raise ValidationFailed(
                f"strength {self._strength(job)} of {job.steps} steps leaves no step to run: "
                "raise the strength or the steps",
                field="strength",
            )

    @staticmethod
    def _strength(job: StepJob) -> float:
        """The job's strength, or its pipeline's default: 0.8 for img2img, 1.0 for inpainting."""
        if job.strength is not None:
            return job.strength
        return 0.8 if job.mask is None else 1.0

    @torch.inference_mode()
    def start(self, job: StepJob, cond: Conditioning) -> Track:
        """A track at its first timestep (an image job's first is set by its strength)."""
        self.check(job)
        scheduler = make_scheduler(job.scheduler, self.base)
        generators = job.generators()
        if job.image is None:
            timesteps, latents = self._text(job, scheduler, generators, cond.hidden.dtype)
            paint = None
        elif job.mask is None:
            timesteps, latents = self._image(job, scheduler, generators, cond.hidden.dtype)
            paint = None
        else:
            timesteps, latents, paint = self._inpaint(job, scheduler, generators, cond.hidden.dtype)
        guided = self.family.guided(job.guidance_scale)
        key = job.key(self.model)
        return Track(job, key, scheduler, timesteps, latents, cond, generators, guided, paint)

    def _text(
        self, job: StepJob, scheduler: Any, generators: list[torch.Generator], dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Text to image: the full schedule from pure noise (`prepare_latents`)."""
        timesteps, _ = retrieve_timesteps(scheduler, job.steps, self.device)
        pipe = self.family.pipe
        shape = (
            job.num_images,
            pipe.unet.config.in_channels,
            job.height // pipe.vae_scale_factor,
            job.width // pipe.vae_scale_factor,
        )
        latents = randn_tensor(shape, generator=generators, device=self.device, dtype=dtype)
        if isinstance(self.family, StableDiffusionXL) and hasattr(scheduler, "set_begin_index"):
            scheduler.set_begin_index(0)  # SDXL's `__call__` pins it just before its loop
        return timesteps, latents * scheduler.init_noise_sigma

    def _image(
        self, job: StepJob, scheduler: Any, generators: list[torch.Generator], dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """img2img: the schedule's tail from the strength's step, the image noised to its level."""
        view = self.img2img
        view.scheduler = scheduler
        strength = self._strength(job)
        retrieve_timesteps(scheduler, job.steps, self.device)
        timesteps, _ = view.get_timesteps(job.steps, strength, self.device)
        first = timesteps[:1].repeat(job.num_images)
        image = view.image_processor.preprocess(job.image, height=job.height, width=job.width)
        latents = view.prepare_latents(
            image, first, 1, job.num_images, dtype, self.device, generators
        )
        return timesteps, latents

    def _inpaint(
        self, job: StepJob, scheduler: Any, generators: list[torch.Generator], dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor, Inpainting]:
        """Inpainting: as img2img, plus the mask and the masked image the loop keeps using."""
        view, n, size = self.inpaint, job.num_images, (job.height, job.width)
        view.scheduler = scheduler
        strength = self._strength(job)
        retrieve_timesteps(scheduler, job.steps, self.device)
        timesteps, _ = view.get_timesteps(job.steps, strength, self.device)
        image = view.image_processor.preprocess(job.image, *size, resize_mode="default")
        image = image.to(dtype=torch.float32)
        four = view.unet.config.in_channels == 4
        latents, noise, *rest = view.prepare_latents(
            n, view.vae.config.latent_channels, *size, dtype, self.device, generators, None,
            image=image, timestep=timesteps[:1].repeat(n), is_strength_max=strength == 1.0,
            return_noise=True, return_image_latents=four,
        )  # fmt: skip
        condition = view.mask_processor.preprocess(job.mask, *size, resize_mode="default")
        guided = self.family.guided(job.guidance_scale)
        mask, masked = view.prepare_mask_latents(
            condition, image * (condition < 0.5), n, *size, dtype, self.device, generators, guided
        )
        paint = Inpainting(mask, masked, rest[0] if four else None, noise, channels=not four)
        return timesteps, latents, paint


def _view(cls: Any, pipe: Any) -> Any:
    """A `cls` pipeline over `pipe`'s modules, with a fresh scheduler of its own."""
    expected, _ = cls._get_signature_keys(cls)
    parts = {name: pipe.components.get(name) for name in expected if name != "scheduler"}
    parts.pop("requires_safety_checker", None)
    return cls(
        **parts, scheduler=make_scheduler("default", pipe.scheduler), requires_safety_checker=False
    )
