"""Prometheus metrics for the gateway."""

from __future__ import annotations

from fastapi import FastAPI, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Gauge, generate_latest

from api.resources import Resources


def instrument(app: FastAPI) -> None:
    """Expose /metrics with queue gauges read at scrape time."""
    registry = CollectorRegistry()
    queued = Gauge("dq_jobs_queued", "Jobs waiting for a worker", registry=registry)
    running = Gauge("dq_jobs_running", "Jobs in a running batch", registry=registry)

    @app.get("/metrics", include_in_schema=False)
    async def metrics() -> Response:
        resources: Resources = app.state.resources
        q, r = await resources.jobs.counts()
        queued.set(q)
        running.set(r)
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)
