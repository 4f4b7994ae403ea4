"""Schedulers by name: what a request's `scheduler` picks, made fresh for every job.

Every scheduler is built from the model's own scheduler config, so that it keeps the model's noise
schedule (betas, timestep spacing, offset) and changes only the solver. The batch engine and the
step engine both make their schedulers here, so a name means the same solver in either.
"""

from __future__ import annotations

import inspect
from typing import Any, Protocol, cast

import torch
from diffusers.schedulers.scheduling_ddim import DDIMScheduler
from diffusers.schedulers.scheduling_dpmsolver_multistep import DPMSolverMultistepScheduler
from diffusers.schedulers.scheduling_euler_ancestral_discrete import (
    EulerAncestralDiscreteScheduler,
)
from diffusers.schedulers.scheduling_euler_discrete import EulerDiscreteScheduler
from diffusers.schedulers.scheduling_pndm import PNDMScheduler
from diffusers.schedulers.scheduling_utils import SchedulerMixin

from core.errors import ValidationFailed

DEFAULT = "default"


class Scheduler(Protocol):
    """What the engines use of a diffusers scheduler (diffusers leaves their types open)."""

    config: Any
    timesteps: torch.Tensor
    init_noise_sigma: Any

    def set_timesteps(self, *args: Any, **kwargs: Any) -> None:
        """Fix the inference schedule."""

    def scale_model_input(self, sample: torch.Tensor, *args: Any) -> torch.Tensor:
        """Scale the denoiser's input for the current timestep."""

    def step(self, *args: Any, **kwargs: Any) -> Any:
        """One solver step."""

    def add_noise(self, *args: Any) -> torch.Tensor:
        """Noise clean latents to a timestep's level."""


_CLASSES: dict[str, type[SchedulerMixin]] = {
    "ddim": DDIMScheduler,
    "euler": EulerDiscreteScheduler,
    "euler_a": EulerAncestralDiscreteScheduler,
    "dpmpp_2m": DPMSolverMultistepScheduler,
    "pndm": PNDMScheduler,
}
# DPM++ 2M is one setting of the DPM-Solver family: said outright, whatever the model's config says.
_SETTINGS: dict[str, dict[str, Any]] = {
    "dpmpp_2m": {"algorithm_type": "dpmsolver++", "solver_order": 2},
}

# Every name a request may give: the model's own scheduler, then the named solvers.
SCHEDULER_NAMES: tuple[str, ...] = (DEFAULT, *_CLASSES)


def make_scheduler(name: str, base: Scheduler | SchedulerMixin) -> Scheduler:
    """A fresh scheduler `name` on the noise schedule of `base` (the pipeline's own scheduler)."""
    cls = type(base) if name == DEFAULT else _CLASSES.get(name)
    if cls is None:
        raise ValidationFailed(
            f"unknown scheduler {name!r}: use one of {', '.join(SCHEDULER_NAMES)}",
            field="scheduler",
        )
    # `from_config` comes from a mixin diffusers leaves untyped; it returns an instance of `cls`.
    make: Any = cls
    return cast(Scheduler, make.from_config(cast(Any, base).config, **_SETTINGS.get(name, {})))


def step_kwargs(scheduler: Scheduler, generators: list[torch.Generator]) -> dict[str, Any]:
    """The extra arguments the pipelines give `step`: DDIM's eta (0), and the rows' generators
    to the schedulers that draw noise at each step (Euler ancestral, DDPM, the SDE solvers)."""
    accepted = inspect.signature(scheduler.step).parameters
    kwargs: dict[str, Any] = {}
    if "eta" in accepted:
        kwargs["eta"] = 0.0
    if "generator" in accepted:
        kwargs["generator"] = generators
    return kwargs
