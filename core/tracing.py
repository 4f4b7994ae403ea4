"""Opt-in tracing with OpenTelemetry: one trace per job, from its submit request to its stored
images and each webhook attempt.

Off unless the standard `OTEL_*` variables ask for it (an OTLP endpoint, or `OTEL_TRACES_EXPORTER`),
and then nothing of the SDK is imported and every method returns at once. On, each process
exports to the OTLP/HTTP endpoint through its own provider (the global one is left alone); the
SDK reads the rest of `OTEL_*` itself (headers, sampler, batch delays, resource attributes).

The context crosses processes in the job record: the gateway stores the W3C `traceparent` of the
submit request's span in the job (`JobRecord.trace`); the worker and the webhook sender continue
it. Callers pass and receive traceparent strings, never SDK objects.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import Any, Literal

from pydantic_settings import BaseSettings, SettingsConfigDict

log = logging.getLogger(__name__)

Kind = Literal["internal", "server", "client"]
Attributes = Mapping[str, str | int | float | bool]
OFF: AbstractContextManager[None] = nullcontext()


class TracingSettings(BaseSettings):
    """The standard OpenTelemetry variables that decide whether tracing is on."""

    model_config = SettingsConfigDict(extra="ignore", frozen=True)

    otel_sdk_disabled: bool = False
    otel_traces_exporter: str | None = None  # otlp (the default once on), console or none
    otel_exporter_otlp_endpoint: str | None = None
    otel_exporter_otlp_traces_endpoint: str | None = None
    otel_service_name: str | None = None

    @property
    def exporter(self) -> str | None:
        """The exporter to use, or None when tracing is off."""
        if self.otel_sdk_disabled:
            return None
        chosen = (self.otel_traces_exporter or "").strip().lower()
        if chosen in ("otlp", "console"):
            return chosen
        if chosen == "" and (
            self.otel_exporter_otlp_endpoint or self.otel_exporter_otlp_traces_endpoint
        ):
            return "otlp"
        return None


def _seconds_to_ns(at: float) -> int:
    return int(at * 1e9)


class Tracing:
    """A process's tracer; `Tracing()` is off and does nothing."""

    def __init__(self, provider: Any = None, service: str = "") -> None:
        self._provider = provider
        self._tracer = None if provider is None else provider.get_tracer("diffusion-queue")
        self.service = service

    @property
    def on(self) -> bool:
        """Whether spans are made and exported."""
        return self._tracer is not None

    @classmethod
    def start(cls, service: str, settings: TracingSettings | None = None) -> Tracing:
        """Tracing for this process as `OTEL_*` asks (off when it asks for nothing)."""
        settings = settings or TracingSettings()
        exporter = settings.exporter
        if exporter is None:
            return cls()
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import (
            BatchSpanProcessor,
            ConsoleSpanExporter,
            SpanExporter,
        )

        name = settings.otel_service_name or service
        provider = TracerProvider(resource=Resource.create({"service.name": name}))
        if exporter == "console":
            chosen: SpanExporter = ConsoleSpanExporter()
        else:
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

            chosen = OTLPSpanExporter()
        provider.add_span_processor(BatchSpanProcessor(chosen))
        log.info("tracing on: %s spans of %s", exporter, name)
        return cls(provider, name)

    def shutdown(self) -> None:
        """Export what is left (a process that stops calls this)."""
        if self._provider is not None:
            self._provider.shutdown()

    def span(
        self,
        name: str,
        *,
        parent: str | None = None,
        headers: Mapping[str, str] | None = None,
        kind: Kind = "internal",
        attributes: Attributes | None = None,
    ) -> AbstractContextManager[None]:
        """A span around the block, current within it: a child of `parent` (a traceparent), of
        the context in `headers` (an incoming request's), or of the current span."""
        if self._tracer is None:
            return OFF  # on the submit path: not even a generator is made
        return self._span(name, parent, headers, kind, attributes)

    @contextmanager
    def _span(
        self,
        name: str,
        parent: str | None,
        headers: Mapping[str, str] | None,
        kind: Kind,
        attributes: Attributes | None,
    ) -> Iterator[None]:
        assert self._tracer is not None
        with self._tracer.start_as_current_span(
            name, context=_context(parent, headers), kind=_kind(kind), attributes=attributes
        ):
            yield

    def record(
        self,
        name: str,
        *,
        parent: str | None,
        start: float,
        end: float,
        attributes: Attributes | None = None,
        error: str | None = None,
    ) -> str | None:
        """A span that already happened (epoch seconds), under `parent`; its traceparent, for
        spans under it. Nothing without a parent: a job submitted untraced stays untraced."""
        if self._tracer is None or not parent:
            return None
        from opentelemetry import trace

        span = self._tracer.start_span(
            name,
            context=_context(parent, None),
            attributes=attributes,
            start_time=_seconds_to_ns(start),
        )
        if error is not None:
            span.set_status(trace.Status(trace.StatusCode.ERROR, error))
        span.end(end_time=_seconds_to_ns(max(start, end)))
        return _traceparent(span)

    def note(self, **attributes: str | int | float | bool | None) -> None:
        """Set attributes on the current span (None values are left out)."""
        if self._tracer is None:
            return
        from opentelemetry import trace

        span = trace.get_current_span()
        for key, value in attributes.items():
            if value is not None:
                span.set_attribute(f"dq.{key}", value)

    def fail(self, message: str) -> None:
        """Mark the current span as failed."""
        if self._tracer is None:
            return
        from opentelemetry import trace

        trace.get_current_span().set_status(trace.Status(trace.StatusCode.ERROR, message))

    def rename(self, name: str) -> None:
        """Rename the current span (a server span learns its route after routing)."""
        if self._tracer is None:
            return
        from opentelemetry import trace

        trace.get_current_span().update_name(name)

    def traceparent(self) -> str | None:
        """The current span's W3C traceparent, to store in a job; None when off or outside."""
        if self._tracer is None:
            return None
        from opentelemetry import trace

        return _traceparent(trace.get_current_span())

    def headers(self) -> dict[str, str]:
        """The current span's context as HTTP headers for an outgoing request."""
        if self._tracer is None:
            return {}
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

        carrier: dict[str, str] = {}
        TraceContextTextMapPropagator().inject(carrier)
        return carrier


def _context(parent: str | None, headers: Mapping[str, str] | None) -> Any:
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    if parent:
        return TraceContextTextMapPropagator().extract({"traceparent": parent})
    if headers is not None:
        return TraceContextTextMapPropagator().extract(dict(headers))
    return None


def _kind(kind: Kind) -> Any:
    from opentelemetry.trace import SpanKind

    return {"internal": SpanKind.INTERNAL, "server": SpanKind.SERVER, "client": SpanKind.CLIENT}[
        kind
    ]


def _traceparent(span: Any) -> str | None:
    ctx = span.get_span_context()
    if not ctx.is_valid:
        return None
    return f"00-{ctx.trace_id:032x}-{ctx.span_id:016x}-{int(ctx.trace_flags):02x}"
