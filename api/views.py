"""Ledger records turned into the job a client reads."""

from __future__ import annotations

from core.jobs import QueueInfo
from core.views import outputs_with_urls, public_job

__all__ = ["outputs_with_urls", "public_job", "queue_info"]


def queue_info(rank: int | None, images_ahead: int, images_per_s: float | None) -> QueueInfo | None:
    """Position (1 = next) and an ETA from the workers' measured throughput."""
    if rank is None:
        return None
    eta = images_ahead / images_per_s if images_per_s else None
    return QueueInfo(position=rank + 1, eta_s=None if eta is None else round(eta, 2))
