"""A pool per model: the scaler sizes each model's workers on their own, within their own bounds.

Every catalog model gets a pool (or those DQ_SCALER_MODELS names), with its own policy state, its
own bounds (the catalog entry's min_workers/max_workers; `--min`/`--max` for the default model),
its own backend handle and its own reading of the ledger. A docker or kubernetes backend finds a
model's workers by a name pattern (`worker-{model}`, `dq-worker-{model}`); a name without
`{model}` is one service or Deployment, so it serves one model: the catalog's default.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace

from core.catalog import Catalog, ModelSpec
from core.errors import ConfigError
from scaler.backends import ScaleBackend
from scaler.policy import PolicyConfig, PolicyState
from scaler.signals import Reading

MODEL = "{model}"


@dataclass
class Pool:
    """One model's workers: how to reach them, their bounds, what to read, what was decided."""

    model: str
    backend: ScaleBackend
    config: PolicyConfig
    reading: Reading
    state: PolicyState = field(default_factory=PolicyState)


def named(pattern: str, model: str) -> str:
    """The service or Deployment of one model's workers: `pattern` with `{model}` filled in."""
    return pattern.replace(MODEL, model)


def pooled(catalog: Catalog, only: str = "", pattern: str | None = None) -> list[str]:
    """The models that get a pool, in catalog order.

    `only` is DQ_SCALER_MODELS (empty: every model); `pattern` the backend's name pattern (None:
    the process backend, which starts any model's workers).
    """
    chosen = [m.strip() for m in only.split(",") if m.strip()]
    unknown = [m for m in chosen if m not in catalog.models]
    if unknown:
        raise ConfigError(
            f"DQ_SCALER_MODELS names {', '.join(unknown)}, not in the catalog:"
            f" use some of {', '.join(catalog.models)}"
        )
    models = [m for m in catalog.models if m in chosen] if chosen else list(catalog.models)
    if pattern is None or MODEL in pattern:
        return models
    if not chosen:
        return [catalog.default]
    if len(models) > 1:
        raise ConfigError(
            f"{pattern!r} names one set of workers, not one per model: put {MODEL} in it"
            f" (e.g. {pattern}-{MODEL}), or list one model in DQ_SCALER_MODELS"
        )
    return models


def bounds(
    spec: ModelSpec, min_flag: int | None = None, max_flag: int | None = None
) -> tuple[int, int]:
    """A pool's (min, max) workers: the catalog entry's, or the command line's where given.

    A min above the max raises the max with it (`dq up --min-workers 2` runs two).
    """
    low = spec.min_workers if min_flag is None else min_flag
    high = spec.max_workers if max_flag is None else max_flag
    return low, max(low, high)


def pools_of(
    catalog: Catalog,
    models: list[str],
    base: PolicyConfig,
    reading: Reading,
    backend_for: Callable[[str], ScaleBackend],
    flags: tuple[int | None, int | None] = (None, None),
) -> list[Pool]:
    """A pool for each model, its backend from `backend_for`; the flags bound the default's only."""
    pools = []
    for model in models:
        spec = catalog.models[model]
        low, high = bounds(spec, *flags) if model == catalog.default else bounds(spec)
        try:
            config = replace(base, min_workers=low, max_workers=high)
        except ConfigError as e:
            raise ConfigError(f"model {model}: {e.message} (min {low}, max {high})") from e
        pools.append(Pool(model, backend_for(model), config, replace(reading, model=model)))
    return pools
