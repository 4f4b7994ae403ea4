"""`GET /v1/models`: the models served, what a request may ask of each, and their state."""

from __future__ import annotations

from fastapi import APIRouter
from pydantic import BaseModel

from api.deps import CallerDep
from api.openapi import errors
from core import keys
from core.catalog import ModelView, public_models

router = APIRouter()


class ModelState(BaseModel):
    """How a model's pool stands right now."""

    workers_serving: int  # model loaded, taking work
    workers_starting: int  # loading the model (a cold pool's first job waits for one)
    queued_images: int  # waiting in the tenants' lines or dispatched
    running_images: int
    images_per_s: float | None  # measured by its workers; None until one has run a batch


class ModelStatus(ModelView):
    """A model and its state."""

    state: ModelState


class Models(BaseModel):
    """The models, the default first."""

    models: list[ModelStatus]


@router.get(
    "/v1/models",
    response_model=Models,
    tags=["models"],
    summary="The models served",
    operation_id="list_models",
    responses=errors(401, 429, 503),
)
async def models(caller: CallerDep) -> Models:
    """Each model: sizes, steps, tasks, LoRAs and defaults a request may use, and its pool."""
    res = caller.res
    stats = await res.redis.hgetall(keys.STATS)  # type: ignore[misc]
    found = []
    for view in public_models(res.catalog):
        pool = await res.throughput.pool(view.name)
        queued = sum(int(stats.get(f"wimages:{view.name}:{c}", 0)) for c in keys.CLASSES)
        state = ModelState(
            workers_serving=pool.serving,
            workers_starting=pool.starting,
            queued_images=queued + int(stats.get(f"dimages:{view.name}", 0)),
            running_images=int(stats.get(f"rimages:{view.name}", 0)),
            images_per_s=pool.images_per_s,
        )
        found.append(ModelStatus(**view.model_dump(), state=state))
    return Models(models=found)
