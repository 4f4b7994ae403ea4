"""A request's choice of model, task, image inputs and LoRAs, checked against the catalog.

The gateway calls `check_request` before it accepts a job; every refusal is a 422 that names the
request field to fix. Pure: no I/O, no torch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from core.catalog import TASKS, Catalog, ModelSpec, Task, check_size, check_steps
from core.errors import ValidationFailed
from core.loras import LoraCatalog

MAX_LORAS = 4
MAX_LORA_SCALE = 4.0
MAX_NAMES_SHOWN = 10


class LoraAsk(Protocol):
    """One LoRA a request names, with the weight to apply it at."""

    @property
    def name(self) -> str: ...

    @property
    def scale(self) -> float: ...


class ModelAsk(Protocol):
    """The fields of a request the catalog decides on; None takes the model's default."""

    @property
    def model(self) -> str | None: ...

    @property
    def task(self) -> str: ...

    @property
    def loras(self) -> Sequence[LoraAsk]: ...

    @property
    def width(self) -> int | None: ...

    @property
    def height(self) -> int | None: ...

    @property
    def steps(self) -> int | None: ...

    @property
    def strength(self) -> float | None: ...

    @property
    def image(self) -> str | None: ...

    @property
    def mask(self) -> str | None: ...


@dataclass(frozen=True)
class LoraUse:
    """A LoRA and its scale, as a request names it."""

    name: str
    scale: float = 1.0


@dataclass(frozen=True)
class Ask:
    """A plain ModelAsk, for callers that hold these fields apart from a request."""

    model: str | None = None
    task: str = "txt2img"
    loras: Sequence[LoraUse] = ()
    width: int | None = None
    height: int | None = None
    steps: int | None = None
    strength: float | None = None
    image: str | None = None
    mask: str | None = None


@dataclass(frozen=True)
class Checked:
    """A request the catalog accepts, with the model's defaults filled in."""

    spec: ModelSpec
    task: Task
    loras: tuple[tuple[str, float], ...]  # sorted by name: one bucket for one set
    width: int
    height: int
    steps: int
    strength: float | None  # None for txt2img


def check_request(catalog: Catalog, ask: ModelAsk) -> Checked:
    """Accept a request's model, task, inputs and LoRAs, or raise a 422 naming the field."""
    spec = catalog.get(ask.model)
    task = _task(spec, ask)
    width = spec.defaults.width if ask.width is None else ask.width
    height = spec.defaults.height if ask.height is None else ask.height
    steps = spec.defaults.steps if ask.steps is None else ask.steps
    check_size(spec, width, height)
    check_steps(spec, steps)
    strength = _strength(spec, task, ask.strength, steps)
    loras = _loras(catalog.loras, spec, ask.loras)
    return Checked(spec, task, loras, width, height, steps, strength)


def _task(spec: ModelSpec, ask: ModelAsk) -> Task:
    """The task, if the model does it and the request brings the inputs it needs."""
    task = next((t for t in TASKS if t == ask.task), None)
    if task is None:
        raise ValidationFailed(
            f"task must be one of {', '.join(TASKS)}, not {ask.task!r}", field="task"
        )
    if task not in spec.tasks:
        raise ValidationFailed(
            f"model {spec.name} does not do {task}; it does {', '.join(spec.tasks)}",
            field="task",
            code="unsupported_task",
        )
    if task == "txt2img" and ask.image is not None:
        raise ValidationFailed(
            "txt2img takes no image: set task to img2img or inpaint", field="image"
        )
    if task != "txt2img" and ask.image is None:
        raise ValidationFailed(f"{task} needs an image", field="image")
    if task == "inpaint" and ask.mask is None:
        raise ValidationFailed("inpaint needs a mask (white where to paint)", field="mask")
    if task != "inpaint" and ask.mask is not None:
        raise ValidationFailed("only inpaint takes a mask: set task to inpaint", field="mask")
    return task


def _strength(spec: ModelSpec, task: Task, asked: float | None, steps: int) -> float | None:
    """The strength an img2img or inpaint call runs at; none for txt2img."""
    if task == "txt2img":
        if asked is not None:
            raise ValidationFailed("strength applies to img2img and inpaint only", field="strength")
        return None
    strength = spec.defaults.strength if asked is None else asked
    if not 0 < strength <= 1:
        raise ValidationFailed(
            f"strength must be above 0 and at most 1, not {strength}", field="strength"
        )
    # The pipeline runs int(steps x strength) steps, and refuses to run none.
    if int(steps * strength) < 1:
        raise ValidationFailed(
            f"strength {strength} of {steps} steps leaves no step to run: raise strength or steps",
            field="strength",
        )
    return strength


def _loras(
    loras: LoraCatalog, spec: ModelSpec, asked: Sequence[LoraAsk]
) -> tuple[tuple[str, float], ...]:
    """The LoRA set, if each exists, is made for the model's family, and appears once."""
    if not asked:
        return ()
    if not spec.takes_loras:
        raise ValidationFailed(
            f"model {spec.name} takes no LoRAs (its family is {spec.family})", field="loras"
        )
    if len(asked) > MAX_LORAS:
        raise ValidationFailed(f"at most {MAX_LORAS} LoRAs per request", field="loras")
    seen: dict[str, float] = {}
    for i, lora in enumerate(asked):
        _check_lora(loras, spec, lora, f"loras[{i}]")
        if lora.name in seen:
            raise ValidationFailed(f"LoRA {lora.name!r} is named twice", field=f"loras[{i}].name")
        seen[lora.name] = float(lora.scale)
    return tuple(sorted(seen.items()))


def _check_lora(loras: LoraCatalog, spec: ModelSpec, lora: LoraAsk, field: str) -> None:
    """One LoRA: known, of the model's family, at a sane scale."""
    found = loras.get(lora.name)
    if found is None:
        names = loras.for_family(spec.family)
        shown = ", ".join(names[:MAX_NAMES_SHOWN]) + (
            ", ..." if len(names) > MAX_NAMES_SHOWN else ""
        )
        offered = f"model {spec.name} takes {shown}" if names else "there are none"
        raise ValidationFailed(
            f"unknown LoRA {lora.name!r}: {offered}", field=f"{field}.name", code="unknown_lora"
        )
    if found.family != spec.family:
        raise ValidationFailed(
            f"LoRA {lora.name!r} is made for {found.family} models and model {spec.name} is"
            f" {spec.family}",
            field=f"{field}.name",
            code="lora_family_mismatch",
        )
    if not -MAX_LORA_SCALE <= lora.scale <= MAX_LORA_SCALE:
        raise ValidationFailed(
            f"a LoRA's scale must be from {-MAX_LORA_SCALE} to {MAX_LORA_SCALE}, not {lora.scale}",
            field=f"{field}.scale",
        )
