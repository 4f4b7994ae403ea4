"""The step loop against diffusers' own pipelines: a job's pixels equal its run alone.

Jobs join a running loop at its start, in its middle and near its end; rows with different step
counts, guidance scales, schedulers, image sizes and LoRA sets run side by side. Every image is
compared with the same request run alone through the pipeline's `__call__` with the same seed.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import torch
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import StableDiffusionPipeline

from core.errors import ValidationFailed
from tests.steps_parts import (
    LATENT_PARITY,
    PARITY,
    Run,
    distances,
    init_image,
    pixel_distance,
    reference,
    reference_run,
    right_half_mask,
    run_loop,
    sharing,
)
from worker.families import StepUnsupported, family_of
from worker.models import load_pipeline
from worker.reports import StepReport
from worker.tracks import LoraSet, Starter, StepJob

SCHEDULERS = ["ddim", "euler", "euler_a", "dpmpp_2m", "pndm"]


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    """One torch thread: on a small shared machine more threads only fight over the cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tiny(model_cache: Path) -> Any:
    """The tiny SD pipeline, shared by this module's tests."""
    return load_pipeline("tiny", model_cache, device="cpu")


@pytest.fixture(scope="module")
def tiny_xl(model_cache: Path) -> Any:
    """The tiny SDXL pipeline."""
    return load_pipeline("tiny-xl", model_cache, device="cpu")


def job(job_id: str, **fields: Any) -> StepJob:
    """A 64x64 job with a prompt of its own."""
    return StepJob(job_id, fields.pop("prompt", f"a lighthouse, {job_id}"), **{
        "width": 64, "height": 64, "steps": 4, **fields,
    })  # fmt: skip


def assert_parity(pipe: Any, jobs: list[StepJob], run: Run) -> list[float]:
    """Every job's images within PARITY of its reference, its latents within LATENT_PARITY."""
    found = []
    for j in jobs:
        wanted = reference_run(pipe, j)
        found += distances(run.images[j.job_id], wanted.images)
        gap = (run.latents[j.job_id] - wanted.latents).abs().max().item()
        assert gap <= LATENT_PARITY, (j.job_id, gap)
    assert max(found) <= PARITY, found
    return found


@pytest.mark.parametrize("scheduler", SCHEDULERS)
def test_jobs_joining_a_running_loop_match_their_runs_alone(tiny: Any, scheduler: str) -> None:
    first = job("first", steps=6, scheduler=scheduler, seed=11)
    total = Starter(family_of(tiny), "m").start(first, _cond(tiny, first)).total
    jobs = {
        0: [first],
        1: [job("ddim", steps=3, guidance_scale=5.0, seed=12)],  # another scheduler, same calls
        total // 2: [
            job("middle", steps=4, guidance_scale=3.0, negative_prompt="blurry", seed=13,
                scheduler=scheduler, num_images=2),
        ],
        total - 1: [job("late", steps=5, guidance_scale=1.0, seed=14, scheduler=scheduler)],
    }  # fmt: skip
    run = run_loop(tiny, jobs)
    assert_parity(tiny, [j for group in jobs.values() for j in group], run)
    assert sharing(run) >= 3  # different steps, scales and schedulers in one call


def _cond(pipe: Any, j: StepJob) -> Any:
    """A job's conditioning, as the intake makes it."""
    from worker.intake import Intake

    intake = Intake(family_of(pipe), "m")
    return intake._conditioning(j, intake._encode([j]))


def test_a_different_seed_is_far_off(tiny: Any) -> None:
    """The parity bound has teeth: another seed's image is tens of levels away."""
    made = run_loop(tiny, {0: [job("a", seed=1)]}).images["a"][0]
    assert pixel_distance(made, reference(tiny, job("a", seed=2))[0]) > 10 * PARITY


@pytest.mark.parametrize("scheduler", ["euler_a", "dpmpp_2m"])
def test_the_batch_engine_runs_the_requests_scheduler(tiny: Any, scheduler: str) -> None:
    """The batch engine (the step engine's fallback) honours a job's scheduler too."""
    from core.jobs import Bucket
    from worker.inference import Engine, Row

    j = job("b", seed=71, scheduler=scheduler)
    row = Row("b", 0, j.prompt, None, 71)
    made = Engine(tiny).generate([row], Bucket(64, 64, 4, 7.5, scheduler=scheduler), _go_on)
    assert max(distances(made, reference(tiny, j))) <= PARITY
    assert pixel_distance(made[0], reference(tiny, job("b", seed=71))[0]) > PARITY
    assert type(tiny.scheduler).__name__ == "DDIMScheduler"  # the model's own, back in place


def _go_on(_step: int) -> bool:
    return True


def test_img2img_and_inpainting_rows_enter_at_their_strength(tiny: Any) -> None:
    image, mask = init_image(), right_half_mask()
    jobs = {
        0: [job("text", steps=8, scheduler="euler_a", seed=21)],
        2: [
            job("img2img", steps=8, strength=0.6, image=image, seed=22, num_images=2),
            job("inpaint", steps=6, strength=0.75, image=image, mask=mask, seed=23,
                scheduler="euler_a"),
        ],
        4: [
            job("inpaint-full", steps=5, image=image, mask=mask, seed=24, scheduler="dpmpp_2m"),
            job("img2img-pndm", steps=6, image=image, seed=25, scheduler="pndm"),
        ],
    }  # fmt: skip
    run = run_loop(tiny, jobs)
    assert_parity(tiny, [j for group in jobs.values() for j in group], run)
    # img2img at strength 0.6 of 8 steps runs the last 4 of them: 4 calls from step 2 to 5.
    calls = [i for i, s in enumerate(run.steps) if any(t.job_id == "img2img" for t in s.advanced)]
    assert calls == [2, 3, 4, 5]


@pytest.mark.parametrize("scheduler", ["default", "euler_a", "dpmpp_2m"])
def test_sdxl_rows_match_the_sdxl_pipeline(tiny_xl: Any, scheduler: str) -> None:
    jobs = {
        0: [job("zeros", steps=5, scheduler=scheduler, seed=31)],  # no negative: zeros
        1: [job("negative", steps=4, negative_prompt="fog", guidance_scale=3.0, seed=32,
                scheduler=scheduler)],
        3: [job("unguided", steps=4, guidance_scale=1.0, num_images=2, seed=33,
                scheduler=scheduler)],
    }  # fmt: skip
    run = run_loop(tiny_xl, jobs)
    assert_parity(tiny_xl, [j for group in jobs.values() for j in group], run)
    assert sharing(run) == 3


def test_sizes_take_turns_and_never_share_a_call(tiny: Any) -> None:
    jobs = [job("square", steps=4, seed=41), job("wide", steps=3, width=80, seed=42)]
    run = run_loop(tiny, {0: jobs})
    assert_parity(tiny, jobs, run)
    for step in run.steps:
        assert step.key is not None
        assert {t.key for t in step.advanced} == {step.key}
    assert [s.key.width for s in run.steps[:4] if s.key] == [64, 80, 64, 80]


def test_guidance_rescale_as_the_pipeline_applies_it(tiny: Any) -> None:
    j = job("rescaled", steps=4, guidance_rescale=0.7, seed=51)
    made = run_loop(tiny, {0: [j]}).images["rescaled"]
    base = tiny.scheduler
    wanted = tiny(j.prompt, width=64, height=64, num_inference_steps=4, guidance_rescale=0.7,
                  generator=torch.Generator().manual_seed(51)).images  # fmt: skip
    tiny.scheduler = base
    assert max(distances(made, wanted)) <= PARITY
    plain = run_loop(tiny, {0: [job("plain", steps=4, seed=51, prompt=j.prompt)]}).images["plain"]
    assert pixel_distance(plain[0], made[0]) > PARITY  # the rescale did something


class PeftAdapters:
    """diffusers' adapter API on the UNet: the LoRA set of each call made active (one thread)."""

    def __init__(self, unet: Any) -> None:
        self.unet = unet
        self.calls: list[tuple[LoraSet, str]] = []

    @contextmanager
    def hold(self, loras: LoraSet, part: str) -> Iterator[None]:
        """The set active for the block."""
        self.activate(loras, part)
        yield

    def activate(self, loras: LoraSet, part: str) -> None:
        """Switch the UNet's adapters (the tiny model's text encoder has none)."""
        self.calls.append((loras, part))
        if part != "unet":
            return
        if not loras:
            self.unet.disable_adapters()
            return
        self.unet.enable_adapters()
        self.unet.set_adapters([n for n, _ in loras], weights=[w for _, w in loras])


@pytest.fixture(scope="module")
def lora_pipe(model_cache: Path) -> Any:
    """A tiny pipeline of its own, whose UNet carries two random LoRA adapters."""
    from peft import LoraConfig

    pipe = load_pipeline("tiny", model_cache, device="cpu")
    with torch.random.fork_rng():
        torch.manual_seed(0)
        for name in ("ink", "oil"):
            config = LoraConfig(r=4, lora_alpha=4, init_lora_weights=False,
                                target_modules=["to_q", "to_k", "to_v", "to_out.0"])  # fmt: skip
            pipe.unet.add_adapter(config, adapter_name=name)
    return pipe


def test_lora_sets_never_share_a_call(lora_pipe: Any) -> None:
    from worker.intake import Intake
    from worker.loop import Loop

    adapters = PeftAdapters(lora_pipe.unet)
    family = family_of(lora_pipe)
    intake, loop = Intake(family, "m", adapters), Loop(lora_pipe.unet, adapters)
    jobs = [
        job("none", steps=3, seed=61),
        job("ink", steps=3, seed=62, loras=(("ink", 1.0),)),
        job("ink-oil", steps=3, seed=63, loras=(("ink", 0.5), ("oil", 1.0))),
    ]
    for track in intake.start(jobs).values():
        assert not isinstance(track, Exception)
        loop.join(track)
    made: dict[str, list[Any]] = {}
    while loop.tracks:
        step = loop.step()
        assert step.key is not None
        assert {t.key.loras for t in step.advanced} == {step.key.loras}
        for track in step.finished:
            made[track.job_id] = family.decode(track.latents, track.generators)
    for j in jobs:
        adapters.activate(j.loras, "unet")
        assert max(distances(made[j.job_id], reference(lora_pipe, j))) <= PARITY
    adapters.activate((), "unet")
    plain = reference(lora_pipe, job("ink", steps=3, seed=62))
    assert pixel_distance(plain[0], made["ink"][0]) > PARITY  # the adapter did something


def test_progress_counts_the_requests_steps() -> None:
    # PNDM's 4 steps are 13 timesteps; img2img at strength 0.5 of 10 steps is 5 of them.
    assert [StepReport("j", d, 13, 4).step for d in (1, 3, 4, 7, 12, 13)] == [0, 0, 1, 2, 3, 4]
    assert [StepReport("j", d, 5, 10).step for d in (1, 5)] == [2, 10]


def test_jobs_the_family_cannot_run_are_refused(tiny: Any, tiny_xl: Any) -> None:
    with pytest.raises(StepUnsupported):
        Starter(family_of(tiny_xl), "m").check(job("x", image=init_image()))
    with pytest.raises(StepUnsupported):
        Starter(family_of(tiny), "m").check(job("x", mask=right_half_mask()))
    with pytest.raises(StepUnsupported):
        family_of(object())
    with pytest.raises(ValidationFailed):  # int(4 * 0.2) == 0 steps to run
        Starter(family_of(tiny), "m").check(job("x", image=init_image(), strength=0.2))
    assert isinstance(tiny, StableDiffusionPipeline)


def test_tiny_xl_is_sdxl_shaped_and_loads_like_tiny(tiny_xl: Any, model_cache: Path) -> None:
    from diffusers.pipelines.stable_diffusion_xl.pipeline_stable_diffusion_xl import (
        StableDiffusionXLPipeline,
    )
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    assert isinstance(tiny_xl, StableDiffusionXLPipeline)
    assert type(tiny_xl.text_encoder) is CLIPTextModel
    assert type(tiny_xl.text_encoder_2) is CLIPTextModelWithProjection
    assert tiny_xl.unet.config.addition_embed_type == "text_time"
    assert tiny_xl.config.force_zeros_for_empty_prompt
    index = (model_cache / "tiny-xl" / "model_index.json").read_text()
    assert '"StableDiffusionXLPipeline"' in index


def test_a_parked_job_resumes_exactly_where_it_stopped(tiny: Any) -> None:
    from worker.intake import Intake
    from worker.loop import Loop

    family = family_of(tiny)
    slow = job("slow", steps=6, scheduler="dpmpp_2m", seed=71)  # multistep: history must survive
    urgent = job("urgent", steps=3, scheduler="euler_a", seed=72)
    started = Intake(family, "m").start([slow, urgent])
    loop = Loop(tiny.unet)
    loop.join(started["slow"])  # type: ignore[arg-type]
    run = Run({}, {}, [])
    for index in range(12):
        if index == 2:
            loop.park("slow")
            loop.join(started["urgent"])  # type: ignore[arg-type]
        if index == 5:
            loop.join(loop.parked["slow"])
        step = loop.step()
        run.steps.append(step)
        for track in step.finished:
            run.images[track.job_id] = family.decode(track.latents, track.generators)
            run.latents[track.job_id] = track.latents
    assert [len(s.advanced) for s in run.steps[:6]] == [1, 1, 1, 1, 1, 1]  # parked: urgent alone
    assert set(run.images) == {"slow", "urgent"}
    assert_parity(tiny, [slow, urgent], run)
