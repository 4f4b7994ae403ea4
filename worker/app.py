"""The Celery side of the worker: the app, the task whose Strategy feeds the runner, the bootstep.

The task never runs in Celery's pool. Its Strategy (Celery's per-task hook on the consumer) hands
each message to the Runner, which batches by bucket and runs a batch when the pipeline is free. A
worker bootstep starts the runner with the worker and drains it first on shutdown (`close` runs
before any step stops), so the running batch finishes and buffered messages go back to the queue.
"""

from __future__ import annotations

import importlib
import logging
import os
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

from celery import Celery, Task, bootsteps
from celery.exceptions import InvalidTaskError
from celery.utils.log import get_logger

from core import connections
from core.broker import GENERATE_TASK
from core.catalog import Catalog, ModelSpec, worker_model
from core.loras import LoraCatalog
from core.recovery import Recovery, RecoveryConfig
from core.settings import Settings
from core.storage import open_store
from core.store import JobStore, Ledger
from core.tracing import Tracing
from worker.batcher import Limits
from worker.celeryapp import at_least_once
from worker.claims import BatchContext, Generator
from worker.inputs import InputLimits, InputLoader
from worker.runner import Message, Runner, Supervision

log = logging.getLogger(__name__)
celery_log = get_logger(__name__)


def create_celery(settings: Settings) -> Celery:
    """A Celery app for one pipeline per process, with a bounded prefetch."""
    app = at_least_once(
        "diffusion-queue",
        settings,
        Ledger.of(settings).queue_of(served(settings)),
        # One pipeline per process; the runner buffers up to two batches so the next one is ready.
        worker_concurrency=1,
        worker_prefetch_multiplier=prefetch_of(settings),
        # Soft shutdown: on SIGTERM, time for the runner's drain before a cold stop.
        worker_soft_shutdown_timeout=settings.lease_s,
        worker_enable_soft_shutdown_on_idle=True,
    )
    app.register_task(GenerateTask())
    app.steps["worker"].add(BatchingStep)
    return app


def prefetch_of(settings: Settings) -> int:
    """Messages a worker may hold: one running batch and one forming."""
    return 2 * settings.max_batch_size


def job_id_of(message: Any) -> str:
    """The job id a message carries (its only argument)."""
    try:
        args, _kwargs, _embed = message.decode()
        (job_id,) = args
    except (ValueError, TypeError) as e:
        raise InvalidTaskError(f"expected one job id argument: {e}") from e
    if not isinstance(job_id, str) or not job_id.startswith("job_"):
        raise InvalidTaskError(f"not a job id: {job_id!r}")
    return job_id


def batching_strategy(task: Task, app: Celery, consumer: Any, **_: Any) -> Any:
    """Celery's Strategy hook: messages of this task go to the runner's buffer, not the pool."""
    runner: Runner = consumer.controller.dq_runner
    errors = consumer.connection_errors

    def on_message(message: Any, _body: Any, ack: Any, reject: Any, _cbs: Any, **__: Any) -> None:
        settling = Message(
            tag=str(message.delivery_tag),
            ack_soon=lambda: ack(celery_log, errors),
            requeue_soon=lambda: reject(celery_log, errors, True),
            ack_now=lambda: message.ack_log_error(celery_log, errors),
            requeue_now=lambda: message.reject_log_error(celery_log, errors, requeue=True),
        )
        runner.offer(job_id_of(message), settling)

    return on_message


class GenerateTask(Task):  # type: ignore[misc]
    """Make the images of one job; only ever run in batches by the runner."""

    name = GENERATE_TASK
    Strategy = staticmethod(batching_strategy)
    acks_late = True

    def run(self, job_id: str) -> None:
        """Never called: the Strategy routes messages to the runner."""
        raise RuntimeError(f"{job_id} must be run by the batching runner")


class BatchingStep(bootsteps.StartStopStep):  # type: ignore[misc]
    """Starts the runner with the worker and drains it before the consumer stops."""

    requires = ("celery.worker.components:Pool",)

    def create(self, worker: Any) -> None:
        """Build the runner (cheap); the model loads in its own thread at start."""
        settings: Settings = worker.app.dq_settings
        tracing = getattr(worker.app, "dq_tracing", None) or Tracing()
        worker.dq_runner = build_runner(settings, worker.hostname, tracing)
        self.runner = worker.dq_runner

    def start(self, worker: Any) -> None:
        """Start batching."""
        self.runner.start()

    def close(self, worker: Any) -> None:
        """Drain: finish the running batch, requeue the buffer."""
        self.runner.stop(timeout=worker.app.dq_settings.lease_s * 20)

    def stop(self, worker: Any) -> None:
        """Nothing left: close() drained."""

    def shutdown(self, worker: Any) -> None:
        """Nothing left: close() drained."""


def served(settings: Settings) -> str:
    """The model this worker serves (one per worker process)."""
    return worker_model(settings, Catalog.from_settings(settings))


def build_runner(settings: Settings, name: str, tracing: Tracing | None = None) -> Runner:
    """Connect the runner to Redis, the ledger and storage; it loads the model itself."""
    catalog = Catalog.from_settings(settings)
    model = worker_model(settings, catalog)
    redis = connections.sync_client(settings)
    ledger = Ledger.of(settings)
    store = JobStore(redis, ledger)
    storage = open_store(
        settings.storage,
        secret=b"",  # workers write; only the gateway signs URLs
        endpoint_url=settings.s3_endpoint_url,
        region=settings.s3_region,
    )
    recovery = Recovery(
        redis, store, RecoveryConfig.of(settings), storage, getattr(storage, "prefix", "")
    )
    limits = Limits(
        max_rows=settings.max_batch_size,
        max_pixels=settings.max_batch_pixels,
        timeout_s=settings.batch_timeout_s,
        early_flush=settings.early_flush,
    )

    def make_context() -> BatchContext:
        from worker.models import set_cpu_threads

        set_cpu_threads(settings.cpu_threads)
        lora_cache_bytes = settings.lora_cache_mb * 1024 * 1024
        engine = engine_loader(settings)(
            catalog.get(model), settings.model_cache, catalog.loras, lora_cache_bytes
        )
        prefix = getattr(storage, "prefix", "")
        return BatchContext(
            store=store,
            storage=storage,
            engine=engine,
            worker=name,
            lease_s=settings.lease_s,
            progress_interval_s=settings.progress_interval_s,
            prefix=prefix,
            ledger_patience_s=settings.visibility_timeout_s,
            inputs=InputLoader(InputLimits.of(settings), storage, prefix),
            resize=catalog.get(model).input_resize,
            max_run_s=catalog.get(model).max_run_s,
            tracing=tracing or Tracing(),
        )

    supervision = Supervision(
        max_failures=settings.max_loop_failures,
        cancel_grace_s=settings.cancel_grace_s,
        loop_stale_s=settings.loop_stale_s,
        sweep=recovery.offer,
    )
    args = (redis, store, limits, make_context)
    common: dict[str, Any] = {
        "name": name,
        "model": model,
        "queue": ledger.queue_of(model),
        "heartbeat_s": settings.heartbeat_s,
        "prefetch": prefetch_of(settings),
        "supervision": supervision,
        "fair": settings.dispatch == "fair",
    }
    if settings.engine == "step":
        from worker.stepper import StepRunner
        from worker.steps import LoopSettings

        # As much at once as a batch: a guided image is two denoiser rows.
        rows, pixels = 2 * settings.max_batch_size, 2 * settings.max_batch_pixels
        return StepRunner(*args, loop=LoopSettings(max_rows=rows, max_pixels=pixels), **common)
    return Runner(*args, **common)


EngineLoader = Callable[[ModelSpec, Path, LoraCatalog | None, int], Generator]


def engine_loader(settings: Settings) -> EngineLoader:
    """What loads the engine: `DQ_ENGINE_FACTORY`'s `module:function`, else the diffusers one.

    Called in the batch loop's thread, so a factory that cannot be imported or that raises is a
    model that failed to load (the worker exits with EXIT_MODEL_FAILED).
    """
    if settings.engine_factory is None:
        from worker.inference import load_engine

        return load_engine
    module, _, name = settings.engine_factory.partition(":")
    factory: EngineLoader = getattr(importlib.import_module(module), name)
    return factory


def default_name() -> str:
    """A worker name unique on this host."""
    return f"dq-worker-{os.getpid()}@{socket.gethostname()}"
