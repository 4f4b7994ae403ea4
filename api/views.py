"""Ledger records turned into the job a client reads."""

from __future__ import annotations

from api.resources import Pool
from core.jobs import QueueInfo
from core.views import outputs_with_urls, public_job

__all__ = ["outputs_with_urls", "public_job", "queue_info"]


def queue_info(
    jobs_ahead: int,
    units_to_done: float,
    units_per_s: float | None,
    pool: Pool | None = None,
    model: str = "",
) -> QueueInfo:
    """Position (1 = next), an ETA (the work ahead and its own over the measured throughput),
    and, for a model with no worker serving, that the job waits for one to start."""
    eta = units_to_done / units_per_s if units_per_s else None
    waiting = None
    if pool is not None and not pool.serving:
        waiting = (
            f"no worker of model {model} is up yet; one is starting"
            if pool.starting
            else (f"waiting for a worker of model {model} to start")
        )
    return QueueInfo(
        position=jobs_ahead + 1, eta_s=None if eta is None else round(eta, 2), waiting_for=waiting
    )
