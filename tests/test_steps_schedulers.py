"""worker.schedulers: a request's scheduler name, made fresh on the model's noise schedule."""

from __future__ import annotations

import pytest
import torch
from diffusers.schedulers.scheduling_ddim import DDIMScheduler
from diffusers.schedulers.scheduling_dpmsolver_multistep import DPMSolverMultistepScheduler
from diffusers.schedulers.scheduling_euler_ancestral_discrete import (
    EulerAncestralDiscreteScheduler,
)
from diffusers.schedulers.scheduling_euler_discrete import EulerDiscreteScheduler
from diffusers.schedulers.scheduling_pndm import PNDMScheduler

from core.errors import ValidationFailed
from worker.schedulers import SCHEDULER_NAMES, make_scheduler, step_kwargs

SD_SCHEDULE = {
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "steps_offset": 1,
}


@pytest.fixture
def base() -> DDIMScheduler:
    """A model's own scheduler: DDIM on Stable Diffusion's noise schedule."""
    return DDIMScheduler(**SD_SCHEDULE, clip_sample=False, set_alpha_to_one=False)


@pytest.mark.parametrize(
    ("name", "cls"),
    [
        ("default", DDIMScheduler),
        ("ddim", DDIMScheduler),
        ("euler", EulerDiscreteScheduler),
        ("euler_a", EulerAncestralDiscreteScheduler),
        ("dpmpp_2m", DPMSolverMultistepScheduler),
        ("pndm", PNDMScheduler),
    ],
)
def test_names_make_fresh_schedulers_on_the_models_schedule(
    base: DDIMScheduler, name: str, cls: type
) -> None:
    made = make_scheduler(name, base)
    assert type(made) is cls
    assert made is not base
    config = dict(made.config)
    assert {k: config[k] for k in SD_SCHEDULE} == SD_SCHEDULE


def test_every_name_is_listed(base: DDIMScheduler) -> None:
    assert SCHEDULER_NAMES == ("default", "ddim", "euler", "euler_a", "dpmpp_2m", "pndm")
    assert len({type(make_scheduler(n, base)) for n in SCHEDULER_NAMES[1:]}) == 5


def test_dpmpp_2m_is_said_outright_whatever_the_model_uses() -> None:
    model_own = DPMSolverMultistepScheduler(algorithm_type="sde-dpmsolver++", solver_order=3)
    made = make_scheduler("dpmpp_2m", model_own)
    assert (made.config.algorithm_type, made.config.solver_order) == ("dpmsolver++", 2)
    assert make_scheduler("default", model_own).config.algorithm_type == "sde-dpmsolver++"


def test_default_is_the_models_own_class() -> None:
    euler = EulerDiscreteScheduler(**SD_SCHEDULE, timestep_spacing="leading")
    made = make_scheduler("default", euler)
    assert type(made) is EulerDiscreteScheduler
    assert made.config.timestep_spacing == "leading"


def test_an_unknown_name_names_the_field(base: DDIMScheduler) -> None:
    with pytest.raises(ValidationFailed) as raised:
        make_scheduler("lms", base)
    assert raised.value.field == "scheduler"
    assert "dpmpp_2m" in raised.value.message


def test_step_kwargs_as_the_pipelines_pass_them(base: DDIMScheduler) -> None:
    generators = [torch.Generator()]
    ddim = step_kwargs(make_scheduler("ddim", base), generators)
    assert ddim == {"eta": 0.0, "generator": generators}
    assert step_kwargs(make_scheduler("euler_a", base), generators) == {"generator": generators}
    assert step_kwargs(make_scheduler("pndm", base), generators) == {}
