"""Ledger records turned into the job a client reads."""

from __future__ import annotations

from core.jobs import QueueInfo
from core.views import outputs_with_urls, public_job

__all__ = ["outputs_with_urls", "public_job", "queue_info"]


def queue_info(jobs_ahead: int, units_to_done: float, units_per_s: float | None) -> QueueInfo:
    """Position (1 = next) and an ETA: the work ahead and its own over the measured throughput."""
    eta = units_to_done / units_per_s if units_per_s else None
    return QueueInfo(position=jobs_ahead + 1, eta_s=None if eta is None else round(eta, 2))
