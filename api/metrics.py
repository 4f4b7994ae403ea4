"""Prometheus metrics for the gateway."""

from __future__ import annotations

from collections.abc import Iterator

from fastapi import FastAPI, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Gauge, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric

from api.resources import Resources
from core import heartbeats
from core.heartbeats import ScalerStatus


class ScalerGauges:
    """Each pool's last decision; no samples while no scaler decides (a stale count misleads)."""

    def __init__(self) -> None:
        self.pools: dict[str, ScalerStatus] = {}

    def collect(self) -> Iterator[Metric]:
        """The two gauges, a sample per model, when there are decisions to report."""
        if not self.pools:
            return
        current = GaugeMetricFamily(
            "dq_scaler_workers_current",
            "Workers running or starting, as the scaler last counted them",
            labels=["model"],
        )
        desired = GaugeMetricFamily(
            "dq_scaler_workers_desired", "Workers the scaler last decided on", labels=["model"]
        )
        for model, status in self.pools.items():
            current.add_metric([model], status.current)
            desired.add_metric([model], status.desired)
        yield current
        yield desired


def instrument(app: FastAPI) -> None:
    """Expose /metrics with queue and scaler gauges read at scrape time."""
    registry = CollectorRegistry()
    queued = Gauge("dq_jobs_queued", "Jobs waiting for a worker", registry=registry)
    running = Gauge("dq_jobs_running", "Jobs in a running batch", registry=registry)
    scaler = ScalerGauges()
    registry.register(scaler)

    @app.get("/metrics", include_in_schema=False)
    async def metrics() -> Response:
        resources: Resources = app.state.resources
        q, r = await resources.jobs.counts()
        queued.set(q)
        running.set(r)
        scaler.pools = await heartbeats.scaler_statuses_async(resources.redis)
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)
