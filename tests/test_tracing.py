"""Tracing across real processes: a gateway, a worker and a webhook sender export to an OTLP/HTTP
receiver in the test (the protobuf decoded with opentelemetry-proto); one job's trace holds the
submit request, its admission, queue wait, batch, model call, storage and every webhook attempt.
Off (no OTEL_* variables), nothing of the SDK is imported and no job carries a trace."""

from __future__ import annotations

import gzip
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis

from core import keys
from core.embedded import free_port
from core.signing import new_secret
from core.tracing import Tracing, TracingSettings
from tests.conftest import ALICE_KEY, ROOT, WorkerProcess, client_for, wait_for, wait_until
from tests.webhook_parts import Answer, Receiver, SenderProcess, wait_deliveries

SMALL = {"prompt": "a lighthouse", "width": 64, "height": 64, "steps": 2}
CLIENT_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"  # the trace a client started
CLIENT_SPAN = "00f067aa0ba902b7"
TRACING_MODULES = ("opentelemetry.sdk.trace", "opentelemetry.exporter")


@dataclass(frozen=True)
class Span:
    """One span as the collector received it."""

    service: str
    name: str
    trace_id: str
    span_id: str
    parent_id: str
    kind: int
    attributes: dict[str, Any]
    start_ns: int
    end_ns: int
    error: bool


@dataclass
class Collector:
    """An OTLP/HTTP trace receiver on 127.0.0.1 (POST /v1/traces, protobuf as
    ExportTraceServiceRequest)."""

    spans: list[Span] = field(default_factory=list)
    server: ThreadingHTTPServer | None = None

    @property
    def endpoint(self) -> str:
        """OTEL_EXPORTER_OTLP_ENDPOINT for the exporters."""
        assert self.server is not None
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def start(self) -> Collector:
        """Serve in a thread."""
        from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
            ExportTraceServiceRequest,
            ExportTraceServiceResponse,
        )

        collector = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                if self.headers.get("Content-Encoding") == "gzip":
                    body = gzip.decompress(body)
                request = ExportTraceServiceRequest()
                request.ParseFromString(body)
                collector.spans.extend(decoded(request))
                reply = ExportTraceServiceResponse().SerializeToString()
                self.send_response(200 if self.path == "/v1/traces" else 404)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", str(len(reply)))
                self.end_headers()
                self.wfile.write(reply)

            def log_message(self, format: str, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True).start()
        return self

    def stop(self) -> None:
        """Shut down."""
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()

    def trace(self, trace_id: str) -> list[Span]:
        """The spans of one trace received so far."""
        return [s for s in self.spans if s.trace_id == trace_id]


def decoded(request: Any) -> Iterator[Span]:
    """The spans of one export request."""
    for resource in request.resource_spans:
        service = attributes_of(resource.resource.attributes).get("service.name", "")
        for scope in resource.scope_spans:
            for s in scope.spans:
                yield Span(
                    service=service,
                    name=s.name,
                    trace_id=s.trace_id.hex(),
                    span_id=s.span_id.hex(),
                    parent_id=s.parent_span_id.hex(),
                    kind=s.kind,
                    attributes=attributes_of(s.attributes),
                    start_ns=s.start_time_unix_nano,
                    end_ns=s.end_time_unix_nano,
                    error=s.status.code == 2,  # STATUS_CODE_ERROR
                )


def attributes_of(pairs: Any) -> dict[str, Any]:
    """OTLP key-values as a dict."""
    out: dict[str, Any] = {}
    for pair in pairs:
        value = pair.value
        out[pair.key] = getattr(value, value.WhichOneof("value") or "string_value")
    return out


@pytest.fixture
def collector() -> Iterator[Collector]:
    """The test's OTLP receiver (the exporters come with the `otel` extra)."""
    pytest.importorskip("opentelemetry.exporter.otlp.proto.http", reason="the `otel` extra")
    c = Collector().start()
    yield c
    c.stop()


@pytest.fixture
def traced_env(env: dict[str, str], collector: Collector) -> dict[str, str]:
    """Every process exports to the collector, quickly; webhooks on, retries compressed."""
    env.update(
        {
            "OTEL_EXPORTER_OTLP_ENDPOINT": collector.endpoint,
            "OTEL_BSP_SCHEDULE_DELAY": "100",
            "DQ_WEBHOOK_SECRET": new_secret(),
            "DQ_WEBHOOK_ALLOW_PRIVATE": "1",
            "DQ_WEBHOOK_RETRY_SCHEDULE": "0.2,0.2",
        }
    )
    return env


@pytest.fixture
def gateway_url(traced_env: dict[str, str], tmp_path: Path) -> Iterator[str]:
    """`python -m api`: a gateway process of its own."""
    port = free_port()
    log = (tmp_path / "gateway.log").open("wb")
    process = subprocess.Popen(
        [sys.executable, "-m", "api", "--port", str(port)],
        cwd=ROOT,
        env={**os.environ, **traced_env},
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"

    def ready() -> bool:
        try:
            return httpx.get(f"{url}/readyz", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    try:
        wait_until(ready, 60, "the gateway")
        yield url
    finally:
        process.terminate()
        process.wait(30)
        log.close()


def test_one_trace_follows_a_job_across_gateway_worker_and_sender(
    gateway_url: str,
    traced_env: dict[str, str],
    collector: Collector,
    rclient: redis.Redis,
    tmp_path: Path,
) -> None:
    receiver = Receiver([Answer(500), Answer(200)]).start()
    sender = SenderProcess(traced_env, tmp_path / "sender.log")
    worker = WorkerProcess(traced_env, tmp_path / "worker.log", "w-traced@test")
    try:
        worker.wait_ready(rclient)
        headers = {"Authorization": f"Bearer {ALICE_KEY}"}
        with httpx.Client(base_url=gateway_url, headers=headers, timeout=30) as client:
            hook = {"url": receiver.url, "events": ["job.succeeded"]}
            resp = client.post(
                "/v1/jobs",
                json={**SMALL, "num_images": 2, "webhook": hook},
                headers={"traceparent": f"00-{CLIENT_TRACE}-{CLIENT_SPAN}-01"},
            )
            assert resp.status_code == 202, resp.text
            job = wait_for(client, resp.json()["id"])
            assert job["status"] == "succeeded"
            wait_deliveries(client, job["id"], lambda log: len(log) == 2)
        spans = wait_until(
            lambda: complete(collector.trace(CLIENT_TRACE)), 30, "every span of the job"
        )
    finally:
        receiver.stop()
        sender.stop()
        worker.stop()
    check_trace(spans, job, receiver)


EXPECTED = {
    ("dq-gateway", "POST /v1/jobs"): 1,
    ("dq-gateway", "dq.admission"): 1,
    ("dq-worker", "dq.queue"): 1,
    ("dq-worker", "dq.batch"): 1,
    ("dq-worker", "dq.model"): 1,
    ("dq-worker", "dq.storage"): 1,
    ("dq-webhooks", "dq.webhook"): 2,
}


def complete(spans: list[Span]) -> list[Span] | None:
    """The spans, once every expected one arrived."""
    counts: dict[tuple[str, str], int] = {}
    for s in spans:
        counts[(s.service, s.name)] = counts.get((s.service, s.name), 0) + 1
    return spans if counts == EXPECTED else None


def check_trace(spans: list[Span], job: dict[str, Any], receiver: Receiver) -> None:
    """Parents, attributes and times of the job's spans."""
    by_name = {s.name: s for s in spans}
    server = by_name["POST /v1/jobs"]
    assert server.parent_id == CLIENT_SPAN  # the client's traceparent was continued
    assert server.kind == 2  # SPAN_KIND_SERVER
    for child in ("dq.admission", "dq.queue", "dq.batch"):
        assert by_name[child].parent_id == server.span_id, child
    assert by_name["dq.admission"].attributes == {"dq.job_id": job["id"]}
    batch = by_name["dq.batch"]
    assert batch.attributes["dq.batch.id"] == job["metrics"]["batch_id"]
    assert batch.attributes["dq.batch.size"] == 2
    assert batch.attributes["dq.job_id"] == job["id"]
    assert by_name["dq.model"].parent_id == batch.span_id
    assert by_name["dq.storage"].parent_id == batch.span_id
    queue, model, storage = by_name["dq.queue"], by_name["dq.model"], by_name["dq.storage"]
    assert queue.end_ns <= batch.start_ns <= model.start_ns <= model.end_ns
    assert model.end_ns <= storage.start_ns <= storage.end_ns <= batch.end_ns
    hooks = sorted((s for s in spans if s.name == "dq.webhook"), key=lambda s: s.start_ns)
    assert [h.parent_id for h in hooks] == [server.span_id] * 2
    assert [h.kind for h in hooks] == [3, 3]  # SPAN_KIND_CLIENT
    assert [(h.attributes["dq.attempt"], h.attributes["dq.outcome"]) for h in hooks] == [
        (1, "retrying"),
        (2, "delivered"),
    ]
    assert [h.error for h in hooks] == [True, False]
    # The receiver is handed the attempt's context, to continue the trace if it wants.
    sent = [hit.headers["traceparent"] for hit in receiver.hits]
    assert sent == [f"00-{CLIENT_TRACE}-{h.span_id}-01" for h in hooks]


def test_tracing_is_off_and_imports_nothing_without_otel_variables(
    env: dict[str, str], rclient: redis.Redis, gateway_factory: Any
) -> None:
    assert not Tracing.start("dq-test", TracingSettings()).on
    # redis-py imports opentelemetry.sdk.metrics for its own (opt-in) observability when the SDK
    # is installed: what must stay out is the tracing SDK and the exporters.
    script = (
        f"TRACING_MODULES = {TRACING_MODULES!r};"
        " import sys; from api.app import create_app; from tests.conftest import settings_from;"
        " import worker.batch, worker.webhooks;"
        f" create_app(settings_from({env!r}));"
        " print(sorted(m for m in sys.modules if m.startswith(TRACING_MODULES)))"
    )
    clean = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    out = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, env=clean, capture_output=True, text=True
    )
    assert out.stdout.strip() == "[]", out.stderr
    gw = gateway_factory(env)
    with client_for(gw) as client:
        job_id = client.post("/v1/jobs", json=SMALL).json()["id"]
    assert rclient.hget(keys.job(job_id), "trace") is None


@pytest.mark.parametrize(
    ("variables", "exporter"),
    [
        ({}, None),
        ({"otel_exporter_otlp_endpoint": ""}, None),  # compose passes it through, empty
        ({"otel_exporter_otlp_endpoint": "http://collector:4318"}, "otlp"),
        ({"otel_exporter_otlp_traces_endpoint": "http://collector:4318/v1/traces"}, "otlp"),
        ({"otel_traces_exporter": "console"}, "console"),
        ({"otel_exporter_otlp_endpoint": "http://c:4318", "otel_traces_exporter": "none"}, None),
        ({"otel_exporter_otlp_endpoint": "http://c:4318", "otel_sdk_disabled": True}, None),
    ],
)
def test_which_otel_variables_turn_tracing_on(
    variables: dict[str, Any], exporter: str | None
) -> None:
    assert TracingSettings(**variables).exporter == exporter
