"""The model families the step engine knows: how each encodes prompts, conditions and decodes.

Each mirrors its diffusers pipeline's `__call__` (SD 1.x/2.x: `pipeline_stable_diffusion.py`,
SDXL: `pipeline_stable_diffusion_xl.py`, diffusers 0.42) step for step, calling the pipeline's own
`encode_prompt` and image processor, so that a job's pixels equal the pipeline's for the same seed.
Anything else (Flux, SD3, ...) is not a family here and stays with the batch engine.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import StableDiffusionPipeline
from diffusers.pipelines.stable_diffusion_xl.pipeline_stable_diffusion_xl import (
    StableDiffusionXLPipeline,
)
from PIL.Image import Image

from core.errors import ServiceError

# An image's (height, width) in pixels, in the order the pipelines take it.
Size = tuple[int, int]


class StepUnsupported(ServiceError):
    """The step engine cannot run this pipeline or job; the batch engine can."""

    code = "step_unsupported"


@dataclass(frozen=True)
class Encoded:
    """One text through the model's text encoder(s)."""

    hidden: torch.Tensor  # (1, tokens, features): what cross-attention reads
    pooled: torch.Tensor | None = None  # (1, features): SDXL's pooled projection

    def zeros(self) -> Encoded:
        """The encoding SDXL uses for "no negative prompt": zeros of the same shape."""
        pooled = None if self.pooled is None else torch.zeros_like(self.pooled)
        return Encoded(torch.zeros_like(self.hidden), pooled)


@dataclass(frozen=True)
class Conditioning:
    """What the denoiser reads besides latents and timesteps, one entry per denoiser row."""

    hidden: torch.Tensor
    text_embeds: torch.Tensor | None = None  # SDXL
    time_ids: torch.Tensor | None = None  # SDXL
    timestep_cond: torch.Tensor | None = None  # guidance-distilled (LCM-style) UNets

    @classmethod
    def cat(cls, parts: Sequence[Conditioning]) -> Conditioning:
        """The rows of several jobs, in order, as one call's conditioning."""
        return cls(
            hidden=torch.cat([p.hidden for p in parts]),
            text_embeds=_cat([p.text_embeds for p in parts]),
            time_ids=_cat([p.time_ids for p in parts]),
            timestep_cond=_cat([p.timestep_cond for p in parts]),
        )

    def unet_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for `UNet2DConditionModel.forward`."""
        added = None
        if self.text_embeds is not None:
            added = {"text_embeds": self.text_embeds, "time_ids": self.time_ids}
        return {
            "encoder_hidden_states": self.hidden,
            "timestep_cond": self.timestep_cond,
            "added_cond_kwargs": added,
        }


def _cat(parts: Sequence[torch.Tensor | None]) -> torch.Tensor | None:
    """Concatenated rows, or None when the family has no such input."""
    present = [p for p in parts if p is not None]
    return torch.cat(present) if present else None


class Family(Protocol):
    """One model family's halves of the pipeline around the denoising loop."""

    pipe: Any
    images: bool  # whether img2img and inpainting rows are supported

    def encode(self, texts: Sequence[str]) -> list[Encoded]:
        """Each text through the text encoder(s), in one batch."""

    def guided(self, guidance: float) -> bool:
        """Whether a job at this guidance scale runs classifier-free guidance (2 rows an image)."""

    def negative(self, negative_prompt: str | None) -> str | None:
        """The text of the unconditional half; None: zeros (`Encoded.zeros`), not an encoding."""

    def conditioning(
        self, positive: Encoded, negative: Encoded | None, images: int, guidance: float, size: Size
    ) -> Conditioning:
        """One job's denoiser rows: [negatives, positives] under guidance (`negative` given),
        positives alone without."""

    def decode(self, latents: torch.Tensor, generators: list[torch.Generator]) -> list[Image]:
        """Finished latents to images."""


class _Base:
    """What the SD and SDXL pipelines do alike."""

    images = False

    def __init__(self, pipe: Any) -> None:
        self.pipe = pipe

    @property
    def device(self) -> torch.device:
        """Where the pipeline runs its models."""
        device: torch.device = self.pipe._execution_device
        return device

    def guided(self, guidance: float) -> bool:
        """Classifier-free guidance is on: scale above 1 and no guidance-distilled UNet."""
        return guidance > 1 and self.pipe.unet.config.time_cond_proj_dim is None

    def timestep_cond(self, guidance: float, rows: int, dtype: torch.dtype) -> torch.Tensor | None:
        """The guidance embedding that guidance-distilled UNets read (None for all others)."""
        dim = self.pipe.unet.config.time_cond_proj_dim
        if dim is None:
            return None
        scale = torch.tensor(guidance - 1).repeat(rows)
        embedding: torch.Tensor = self.pipe.get_guidance_scale_embedding(scale, embedding_dim=dim)
        return embedding.to(device=self.device, dtype=dtype)

    def rows(
        self, positive: torch.Tensor, negative: torch.Tensor | None, images: int
    ) -> torch.Tensor:
        """A job's rows of one input: negatives then positives under guidance, each per image."""
        repeat = (images,) + (1,) * (positive.dim() - 1)
        if negative is None:
            return positive.repeat(repeat)
        return torch.cat([negative.repeat(repeat), positive.repeat(repeat)])


class StableDiffusion(_Base):
    """SD 1.x and 2.x (`StableDiffusionPipeline` and the img2img/inpaint pipelines beside it)."""

    images = True

    @torch.inference_mode()
    def encode(self, texts: Sequence[str]) -> list[Encoded]:
        """Each text through CLIP, as `encode_prompt` does for a prompt (and, alike, a negative)."""
        hidden, _ = self.pipe.encode_prompt(list(texts), self.device, 1, False)
        return [Encoded(hidden[i : i + 1]) for i in range(len(texts))]

    def negative(self, negative_prompt: str | None) -> str | None:
        """The pipeline encodes "" when no negative prompt is given."""
        return negative_prompt or ""

    def conditioning(
        self, positive: Encoded, negative: Encoded | None, images: int, guidance: float, size: Size
    ) -> Conditioning:
        """Hidden states per row, and the guidance embedding when the UNet takes one."""
        hidden = self.rows(positive.hidden, negative.hidden if negative else None, images)
        return Conditioning(
            hidden, timestep_cond=self.timestep_cond(guidance, images, hidden.dtype)
        )

    @torch.inference_mode()
    def decode(self, latents: torch.Tensor, generators: list[torch.Generator]) -> list[Image]:
        """The VAE's decode, the safety checker when the model has one, then PIL images."""
        pipe = self.pipe
        scaled = latents / pipe.vae.config.scaling_factor
        image = pipe.vae.decode(scaled, return_dict=False, generator=generators)[0]
        image, nsfw = pipe.run_safety_checker(image, self.device, latents.dtype)
        denormalize = [True] * image.shape[0] if nsfw is None else [not flag for flag in nsfw]
        decoded: list[Image] = pipe.image_processor.postprocess(
            image, output_type="pil", do_denormalize=denormalize
        )
        return decoded


class StableDiffusionXL(_Base):
    """SDXL base (`StableDiffusionXLPipeline`): two text encoders, pooled and size conditioning."""

    @torch.inference_mode()
    def encode(self, texts: Sequence[str]) -> list[Encoded]:
        """Each text through both encoders, as `encode_prompt` does for a prompt."""
        hidden, _, pooled, _ = self.pipe.encode_prompt(
            list(texts),
            device=self.device,
            num_images_per_prompt=1,
            do_classifier_free_guidance=False,
        )
        return [Encoded(hidden[i : i + 1], pooled[i : i + 1]) for i in range(len(texts))]

    def negative(self, negative_prompt: str | None) -> str | None:
        """No negative prompt: zeros when the model says so (`force_zeros_for_empty_prompt`)."""
        if negative_prompt is None and self.pipe.config.force_zeros_for_empty_prompt:
            return None
        return negative_prompt or ""

    def conditioning(
        self, positive: Encoded, negative: Encoded | None, images: int, guidance: float, size: Size
    ) -> Conditioning:
        """Hidden states, pooled text embeddings and size ids per row."""
        assert positive.pooled is not None
        hidden = self.rows(positive.hidden, negative.hidden if negative else None, images)
        pooled = self.rows(positive.pooled, negative.pooled if negative else None, images)
        time_ids = self.time_ids(size, hidden.dtype, int(positive.pooled.shape[-1]))
        return Conditioning(
            hidden,
            text_embeds=pooled.to(self.device),
            time_ids=time_ids.to(self.device).repeat(hidden.shape[0], 1),
            timestep_cond=self.timestep_cond(guidance, images, hidden.dtype),
        )

    def time_ids(self, size: Size, dtype: torch.dtype, pooled: int) -> torch.Tensor:
        """Original size, crop corner and target size, as the pipeline's defaults make them."""
        pipe = self.pipe
        projection = pipe.text_encoder_2.config.projection_dim if pipe.text_encoder_2 else pooled
        ids: torch.Tensor = pipe._get_add_time_ids(
            size, (0, 0), size, dtype=dtype, text_encoder_projection_dim=projection
        )
        return ids

    @torch.inference_mode()
    def decode(self, latents: torch.Tensor, generators: list[torch.Generator]) -> list[Image]:
        """The VAE's decode (upcast when fp16 overflows), the watermark if any, then PIL images."""
        pipe, vae = self.pipe, self.pipe.vae
        upcast = vae.dtype == torch.float16 and vae.config.force_upcast
        if upcast:
            vae.to(dtype=torch.float32)
            latents = latents.to(next(iter(vae.post_quant_conv.parameters())).dtype)
        try:
            image = vae.decode(self.unscaled(latents), return_dict=False)[0]
        finally:
            if upcast:
                vae.to(dtype=torch.float16)
        if pipe.watermark is not None:
            image = pipe.watermark.apply_watermark(image)
        decoded: list[Image] = pipe.image_processor.postprocess(image, output_type="pil")
        return decoded

    def unscaled(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents as the VAE reads them: denormalized by its mean and std when it has them."""
        config = self.pipe.vae.config
        mean, std = getattr(config, "latents_mean", None), getattr(config, "latents_std", None)
        if mean is None or std is None:
            unscaled: torch.Tensor = latents / config.scaling_factor
            return unscaled
        shape = (1, 4, 1, 1)
        mean_t = torch.tensor(mean).view(shape).to(latents.device, latents.dtype)
        std_t = torch.tensor(std).view(shape).to(latents.device, latents.dtype)
        denormalized: torch.Tensor = latents * std_t / config.scaling_factor + mean_t
        return denormalized


def family_of(pipe: Any) -> Family:
    """The family of a loaded pipeline; StepUnsupported for any other kind."""
    if isinstance(pipe, StableDiffusionXLPipeline):
        return StableDiffusionXL(pipe)
    if isinstance(pipe, StableDiffusionPipeline):
        return StableDiffusion(pipe)
    raise StepUnsupported(
        f"the step engine does not run {type(pipe).__name__}; use DQ_ENGINE=batch"
    )
