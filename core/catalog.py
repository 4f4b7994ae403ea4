"""The model catalog: which models a deployment serves, with what limits (read without torch).

`DQ_MODELS` names a TOML file (see deploy/models.example.toml); without it, `DQ_MODEL` alone is a
catalog of one. Settings such as `DQ_MAX_BATCH_SIZE` are the defaults of every entry.
"""

from __future__ import annotations

import difflib
import json
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from core.errors import ConfigError, ValidationFailed
from core.loras import ADAPTER_FAMILIES, LoraCatalog
from core.settings import Settings

Family = Literal["sd1", "sd2", "sdxl", "other"]
Task = Literal["txt2img", "img2img", "inpaint"]
Resize = Literal["cover", "contain", "stretch", "refuse"]
TASKS: tuple[Task, ...] = ("txt2img", "img2img", "inpaint")
FAMILIES: tuple[Family, ...] = ("sd1", "sd2", "sdxl", "other")

# The random-weight models worker/models.py builds, and the family each is shaped like.
BUILT_IN_FAMILIES: dict[str, Family] = {
    "tiny": "sd1",
    "tiny-sd2": "sd2",
    "sd15-random": "sd1",
    "tiny-xl": "sdxl",
}
# What the tiny test models make when a request names no size: they run on any CPU, and make
# noise at any size, so a first request (`dq up`, the page) should take a second, not a minute.
TINY_DEFAULTS = {"width": 64, "height": 64, "steps": 10}
TINY_MODELS = ("tiny", "tiny-sd2", "tiny-xl")
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
SIZE = re.compile(r"(\d+)x(\d+)")
MIN_SIDE = 64

# What to write, for each key an entry may hold: shown with every error about that key.
EXAMPLES = {
    "source": 'source = "stabilityai/sdxl-turbo" (a diffusers id, a local folder, or tiny)',
    "family": 'family = "sd1" (sd1, sd2, sdxl or other)',
    "device": 'device = "cuda" (auto, cpu, cuda, cuda:N or mps)',
    "dtype": 'dtype = "fp16" (auto, fp32, fp16 or bf16)',
    "tasks": 'tasks = ["txt2img", "img2img", "inpaint"]',
    "max_batch_size": "max_batch_size = 4",
    "max_batch_pixels": "max_batch_pixels = 4194304 (2048 x 2048, or 16 x 512 x 512)",
    "sizes": 'sizes = ["512x512", "768x512"]',
    "min_side": "min_side = 256",
    "max_side": "max_side = 1024",
    "min_steps": "min_steps = 1",
    "max_steps": "max_steps = 50",
    "input_resize": 'input_resize = "cover" (cover, contain, stretch or refuse)',
    "min_workers": "min_workers = 0",
    "max_workers": "max_workers = 2",
    "defaults": "[models.NAME.defaults] width = 512, height = 512, steps = 25",
    "default": 'default = "NAME" (a name under [models])',
    "lora_folder": 'lora_folder = "loras" (a folder of *.safetensors files)',
    "lora_families": '[lora_families] "my-lora" = "sd1"',
    "models": '[models.NAME] source = "tiny"',
}


@dataclass(frozen=True)
class Defaults:
    """What a request that leaves a field out gets from its model."""

    width: int = 512
    height: int = 512
    steps: int = 25
    guidance_scale: float = 7.5
    strength: float = 0.8  # img2img and inpaint


@dataclass(frozen=True)
class ModelSpec:
    """One catalog entry: where a model comes from and what a request may ask of it."""

    name: str
    source: str  # tiny, sd15-random, a diffusers id or a local folder
    family: Family
    tasks: tuple[Task, ...]
    device: str | None = None
    dtype: str | None = None
    max_batch_size: int = 4
    max_batch_pixels: int = 2048 * 2048
    sizes: tuple[tuple[int, int], ...] = ()  # empty: any multiple of 8 within the sides
    min_side: int = MIN_SIDE
    max_side: int = 2048
    min_steps: int = 1
    max_steps: int = 150
    defaults: Defaults = Defaults()
    input_resize: Resize = "cover"
    min_workers: int = 1
    max_workers: int = 1
    max_run_s: float | None = None  # a job running longer fails (run_timeout); None: no limit

    @property
    def takes_loras(self) -> bool:
        """Whether this model's pipeline takes LoRAs."""
        return self.family in ADAPTER_FAMILIES


class _DefaultsEntry(BaseModel):
    model_config = ConfigDict(extra="forbid")

    width: int | None = Field(default=None, ge=MIN_SIDE, multiple_of=8)
    height: int | None = Field(default=None, ge=MIN_SIDE, multiple_of=8)
    steps: int | None = Field(default=None, ge=1, le=150)
    guidance_scale: float | None = Field(default=None, ge=0, le=30)
    strength: float | None = Field(default=None, gt=0, le=1)


class _Entry(BaseModel):
    """A `[models.NAME]` table as written; unset keys take the deployment's settings."""

    model_config = ConfigDict(extra="forbid")

    source: str = Field(min_length=1)
    family: Family | None = None
    device: str | None = None
    dtype: str | None = None
    tasks: tuple[Task, ...] | None = Field(default=None, min_length=1)
    max_batch_size: int | None = Field(default=None, ge=1, le=64)
    max_batch_pixels: int | None = Field(default=None, ge=MIN_SIDE * MIN_SIDE)
    sizes: tuple[str, ...] = ()
    min_side: int | None = Field(default=None, ge=MIN_SIDE, multiple_of=8)
    max_side: int | None = Field(default=None, ge=MIN_SIDE, le=4096, multiple_of=8)
    min_steps: int | None = Field(default=None, ge=1, le=150)
    max_steps: int | None = Field(default=None, ge=1, le=150)
    defaults: _DefaultsEntry = _DefaultsEntry()
    input_resize: Resize = "cover"
    min_workers: int | None = Field(default=None, ge=0)
    max_workers: int | None = Field(default=None, ge=1)
    max_run_s: float | None = Field(default=None, gt=0)

    @field_validator("sizes")
    @classmethod
    def _sizes(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for size in value:
            match = SIZE.fullmatch(size)
            if not match or any(int(side) % 8 or int(side) < MIN_SIDE for side in match.groups()):
                raise ValueError(f"{size!r} is not WIDTHxHEIGHT in multiples of 8 from 64")
        return value


class _File(BaseModel):
    model_config = ConfigDict(extra="forbid")

    default: str | None = None
    lora_folder: str | None = None
    lora_families: dict[str, Literal["sd1", "sd2", "sdxl"]] = {}
    models: dict[str, _Entry] = Field(min_length=1)


class Catalog:
    """The models of a deployment, its default model and its LoRAs."""

    def __init__(self, models: Mapping[str, ModelSpec], default: str, loras: LoraCatalog) -> None:
        self.models = dict(models)
        self.default = default
        self.loras = loras

    @classmethod
    def from_settings(cls, settings: Settings) -> Catalog:
        """The catalog `DQ_MODELS` names, else `DQ_MODEL` alone; LoRAs from `DQ_LORAS`."""
        if settings.models is not None:
            return load_catalog(settings.models, settings)
        spec = single_model(settings)
        return cls({spec.name: spec}, spec.name, LoraCatalog.scan(settings.loras))

    def get(self, name: str | None) -> ModelSpec:
        """The model a request names (the default when it names none), or a 422 on `model`."""
        spec = self.models.get(name or self.default)
        if spec is None:
            raise ValidationFailed(
                f"unknown model {name!r}: this deployment serves {', '.join(self.models)}",
                field="model",
                code="unknown_model",
            )
        return spec


def _slug(name: str) -> str:
    """A model's name as jobs, queues and keys know it (a Hub id's '/' becomes '-')."""
    slug = re.sub(r"[^a-z0-9._-]+", "-", name.lower()).strip("-._")[:63]
    return slug or "default"


def worker_model(settings: Settings, catalog: Catalog) -> str:
    """The model this worker serves: DQ_WORKER_MODEL, else the catalog's default."""
    name = settings.worker_model or catalog.default
    if name not in catalog.models:
        raise ConfigError(
            f"DQ_WORKER_MODEL={name!r} is not in the catalog:"
            f" use one of {', '.join(catalog.models)}"
        )
    return name


def single_model(settings: Settings) -> ModelSpec:
    """`DQ_MODEL` as a catalog of one, with the deployment's settings as its limits."""
    source = settings.model
    folder = _local_folder(source, Path.cwd())
    family = _family_of(source, folder) or "other"
    # A local folder is named after itself, so a server path never shows in the public listing.
    name = _slug(folder.name if folder is not None else source)
    return ModelSpec(
        name=name,
        source=str(folder) if folder is not None else source,
        family=family,
        tasks=_default_tasks(family),
        device=settings.device,
        dtype=settings.dtype,
        max_batch_size=settings.max_batch_size,
        max_batch_pixels=settings.max_batch_pixels,
        max_side=settings.max_side,
        min_workers=settings.scaler_min,
        max_workers=settings.scaler_max,
        max_run_s=settings.max_run_s,
        defaults=Defaults(**TINY_DEFAULTS) if source in TINY_MODELS else Defaults(),
    )


def load_catalog(path: Path, settings: Settings) -> Catalog:
    """Read a catalog file, or raise a ConfigError naming each bad entry and what to write."""
    where = f"DQ_MODELS={path}"
    try:
        raw = tomllib.loads(path.read_text())
    except OSError as e:
        raise ConfigError(f"{where}: cannot read it ({e.strerror}): fix the path") from e
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{where} is not valid TOML: {e}") from e
    try:
        parsed = _File.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(f"{where} has errors:\n  " + "\n  ".join(_explain(e))) from e
    base = path.resolve().parent
    problems: list[str] = []
    models = {}
    for name, entry in parsed.models.items():
        try:
            models[name] = _spec(name, entry, base, settings)
        except ValueError as e:
            problems.append(f"[models.{name}] {e}")
    default = parsed.default or next(iter(parsed.models))
    if default not in parsed.models:
        problems.append(f"default: no model is called {default!r}; write {EXAMPLES['default']}")
    if problems:
        raise ConfigError(f"{where} has errors:\n  " + "\n  ".join(problems))
    folder = settings.loras or (base / parsed.lora_folder if parsed.lora_folder else None)
    return Catalog(models, default, LoraCatalog.scan(folder, parsed.lora_families))


def _explain(error: ValidationError) -> list[str]:
    """One line per schema error: which entry, which key, what is wrong, what to write."""
    lines = []
    for err in error.errors():
        loc = [str(part) for part in err["loc"]]
        if loc[:1] == ["models"] and len(loc) >= 2:
            entry, key = f"[models.{loc[1]}] ", ".".join(loc[2:])
        else:
            entry, key = "", ".".join(loc)
        if err["type"] == "extra_forbidden":
            message = "is not a key an entry may have" + _did_you_mean(loc[-1])
            if not entry:
                message = "is not a top-level key (default, lora_folder, lora_families, models)"
        elif err["type"] == "missing":
            message = "is missing"
        else:
            message = err["msg"].removeprefix("Value error, ")
        hint = EXAMPLES.get(key.partition(".")[0] if entry else key)
        lines.append(f"{entry}{key}: {message}" + (f"; write {hint}" if hint else ""))
    return lines


def _did_you_mean(key: str) -> str:
    """A hint naming the entry key closest to a misspelt one, if one is close."""
    close = difflib.get_close_matches(key, [*_Entry.model_fields, *_DefaultsEntry.model_fields])
    return f" (did you mean {close[0]}?)" if close else ""


def _spec(name: str, entry: _Entry, base: Path, settings: Settings) -> ModelSpec:
    """One entry, with the deployment's settings for what it leaves out; ValueError if wrong."""
    if not NAME.fullmatch(name):
        raise ValueError(
            "is not a usable model name: use letters, digits, '.', '_' and '-', e.g. [models.sd15]"
        )
    folder = _local_folder(entry.source, base)
    source = str(folder) if folder is not None else entry.source
    family = entry.family or _family_of(entry.source, folder)
    if family is None:
        raise ValueError(
            f"family: cannot tell it from {entry.source!r}; write {EXAMPLES['family']}"
        )
    sizes = tuple(_size(s) for s in entry.sizes)
    spec = ModelSpec(
        name=name,
        source=source,
        family=family,
        tasks=entry.tasks or _default_tasks(family),
        device=entry.device or settings.device,
        dtype=entry.dtype or settings.dtype,
        max_batch_size=entry.max_batch_size or settings.max_batch_size,
        max_batch_pixels=entry.max_batch_pixels or settings.max_batch_pixels,
        sizes=sizes,
        min_side=entry.min_side or MIN_SIDE,
        max_side=entry.max_side or settings.max_side,
        min_steps=entry.min_steps or 1,
        max_steps=entry.max_steps or 150,
        input_resize=entry.input_resize,
        min_workers=settings.scaler_min if entry.min_workers is None else entry.min_workers,
        max_workers=entry.max_workers or settings.scaler_max,
        max_run_s=entry.max_run_s or settings.max_run_s,
    )
    spec = _with_defaults(spec, entry.defaults)
    _check_spec(spec)
    return spec


def _with_defaults(spec: ModelSpec, given: _DefaultsEntry) -> ModelSpec:
    """The entry's defaults; an unset size is its first allowed size, else 512 within the sides."""
    first = spec.sizes[0] if spec.sizes else None
    side = min(max(512, spec.min_side), spec.max_side)
    defaults = Defaults(
        width=given.width or (first[0] if first else side),
        height=given.height or (first[1] if first else side),
        steps=given.steps or min(max(25, spec.min_steps), spec.max_steps),
        guidance_scale=Defaults.guidance_scale
        if given.guidance_scale is None
        else given.guidance_scale,
        strength=given.strength or Defaults.strength,
    )
    return ModelSpec(**{**spec.__dict__, "defaults": defaults})


def _check_spec(spec: ModelSpec) -> None:
    """Limits that contradict each other; ValueError saying which and what to write."""
    if spec.min_side > spec.max_side:
        raise ValueError(f"min_side {spec.min_side} is above max_side {spec.max_side}")
    if spec.min_steps > spec.max_steps:
        raise ValueError(f"min_steps {spec.min_steps} is above max_steps {spec.max_steps}")
    if spec.min_workers > spec.max_workers:
        raise ValueError(f"min_workers {spec.min_workers} is above max_workers {spec.max_workers}")
    if spec.family == "other" and set(spec.tasks) - {"txt2img"}:
        # AutoPipeline may or may not have an img2img twin for an unknown family; say so early.
        raise ValueError(
            'tasks: img2img and inpaint need a known family; write family = "sd1", "sd2" or'
            ' "sdxl", or tasks = ["txt2img"]'
        )
    d = spec.defaults
    try:
        check_size(spec, d.width, d.height)
        check_steps(spec, d.steps)
    except ValidationFailed as e:
        raise ValueError(f"defaults: {e.message}") from None


def _size(text: str) -> tuple[int, int]:
    """'512x768' as (512, 768)."""
    width, _, height = text.partition("x")
    return int(width), int(height)


def _default_tasks(family: str) -> tuple[Task, ...]:
    """Every task for the Stable Diffusion families, text-to-image alone for the others."""
    return TASKS if family in ADAPTER_FAMILIES else ("txt2img",)


def _local_folder(source: str, base: Path) -> Path | None:
    """The folder `source` names, when it is written as a path rather than an id or a name."""
    if source.startswith(("/", "./", "../", "~")):
        return (base / Path(source).expanduser()).resolve()
    return None


def _family_of(source: str, folder: Path | None) -> Family | None:
    """The family of a built-in model, or of a local diffusers folder that can be read here."""
    if source in BUILT_IN_FAMILIES:
        return BUILT_IN_FAMILIES[source]
    if folder is None:
        return None
    index = _json(folder / "model_index.json")
    unet = _json(folder / "unet" / "config.json")
    scheduler = _json(folder / "scheduler" / "scheduler_config.json")
    kind = str(index.get("_class_name", ""))
    if "StableDiffusionXL" in kind:
        return "sdxl"
    if not kind.startswith("StableDiffusion"):
        return "other" if kind else None
    sd2 = (
        unet.get("cross_attention_dim") == 1024
        or unet.get("use_linear_projection") is True
        or scheduler.get("prediction_type") == "v_prediction"
    )
    return "sd2" if sd2 else "sd1"


def _json(path: Path) -> dict[str, Any]:
    """A JSON object from a file, or {} when it cannot be read."""
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


def check_size(spec: ModelSpec, width: int, height: int) -> None:
    """Refuse a size the model does not offer, with a 422 on `width` or `height`."""
    if spec.sizes:
        if (width, height) not in spec.sizes:
            offered = ", ".join(f"{w}x{h}" for w, h in spec.sizes)
            raise ValidationFailed(
                f"model {spec.name} makes {offered}, not {width}x{height}", field="width"
            )
        return
    for field, side in (("width", width), ("height", height)):
        if side % 8 or not spec.min_side <= side <= spec.max_side:
            raise ValidationFailed(
                f"{field} must be a multiple of 8 from {spec.min_side} to {spec.max_side}"
                f" for model {spec.name}, not {side}",
                field=field,
            )
    if width * height > spec.max_batch_pixels:
        raise ValidationFailed(
            f"{width}x{height} is more than model {spec.name}'s {spec.max_batch_pixels} pixels"
            " per call: ask for a smaller size",
            field="width",
        )


def check_steps(spec: ModelSpec, steps: int) -> None:
    """Refuse a step count outside the model's range, with a 422 on `steps`."""
    if not spec.min_steps <= steps <= spec.max_steps:
        raise ValidationFailed(
            f"steps must be from {spec.min_steps} to {spec.max_steps} for model {spec.name},"
            f" not {steps}",
            field="steps",
        )


# --- the public listing (GET /v1/models) ---------------------------------------------------------


class DefaultsView(BaseModel):
    """A model's defaults, as a client reads them."""

    width: int
    height: int
    steps: int
    guidance_scale: float
    strength: float


class ModelView(BaseModel):
    """One model as a client reads it: never its source, device or workers."""

    name: str
    default: bool
    family: Family
    tasks: list[Task]
    sizes: list[str] | None  # None: any multiple of 8 from min_side to max_side
    min_side: int
    max_side: int
    max_pixels: int
    min_steps: int
    max_steps: int
    defaults: DefaultsView
    loras: list[str]


def public_models(catalog: Catalog) -> list[ModelView]:
    """The catalog as `GET /v1/models` shows it, the default model first."""
    names = sorted(catalog.models, key=lambda n: n != catalog.default)
    return [_view(catalog, catalog.models[name]) for name in names]


def _view(catalog: Catalog, spec: ModelSpec) -> ModelView:
    return ModelView(
        name=spec.name,
        default=spec.name == catalog.default,
        family=spec.family,
        tasks=list(spec.tasks),
        sizes=[f"{w}x{h}" for w, h in spec.sizes] or None,
        min_side=spec.min_side,
        max_side=spec.max_side,
        max_pixels=spec.max_batch_pixels,
        min_steps=spec.min_steps,
        max_steps=spec.max_steps,
        defaults=DefaultsView(**spec.defaults.__dict__),
        loras=catalog.loras.for_family(spec.family) if spec.takes_loras else [],
    )
