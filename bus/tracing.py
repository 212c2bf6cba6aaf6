"""OpenTelemetry: one trace per job, its context riding in NATS headers.

Exporter by JETFLEET_OTEL_EXPORTER: `none` (default), `console`, `otlp`
(needs opentelemetry-exporter-otlp-proto-http; endpoint from the usual
OTEL_EXPORTER_OTLP_ENDPOINT), or `jsonl:<path>`: one JSON line per span,
appended by every process, which is how tests and `jetfleet` users can see a
job's spans across processes without a collector.
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import (
    BatchSpanProcessor,
    ConsoleSpanExporter,
    SimpleSpanProcessor,
    SpanExporter,
    SpanExportResult,
)
from opentelemetry.trace import SpanKind

_configured = False
_enabled = False


class JsonlSpanExporter(SpanExporter):
    def __init__(self, path: str) -> None:
        self.path = path
        self._lock = threading.Lock()

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        lines = []
        for span in spans:
            ctx = span.get_span_context()
            parent = span.parent
            lines.append(json.dumps({
                "name": span.name,
                "trace_id": format(ctx.trace_id, "032x") if ctx else None,
                "span_id": format(ctx.span_id, "016x") if ctx else None,
                "parent_span_id": format(parent.span_id, "016x") if parent else None,
                "kind": span.kind.name,
                "service": span.resource.attributes.get("service.name"),
                "start_ns": span.start_time,
                "end_ns": span.end_time,
                "attributes": {k: v for k, v in (span.attributes or {}).items()
                               if isinstance(v, str | int | float | bool)},
            }))
        with self._lock, open(self.path, "a", encoding="utf-8") as f:
            f.write("\n".join(lines) + "\n")
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        pass


def setup(service_name: str, exporter: str | None = None) -> None:
    """Install the tracer provider once per process."""
    global _configured, _enabled
    if _configured:
        return
    _configured = True
    choice = exporter if exporter is not None else os.environ.get("JETFLEET_OTEL_EXPORTER", "none")
    if choice in ("", "none"):
        # No provider at all: the API's no-op tracer costs next to nothing per
        # message, and nothing is injected into headers.
        return
    provider = TracerProvider(resource=Resource.create({"service.name": service_name}))
    if choice == "console":
        provider.add_span_processor(BatchSpanProcessor(ConsoleSpanExporter()))
    elif choice.startswith("jsonl:"):
        # Simple (synchronous) so a process killed later has already written its spans.
        provider.add_span_processor(SimpleSpanProcessor(JsonlSpanExporter(choice[6:])))
    elif choice == "otlp":
        try:
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        except ImportError as exc:
            raise RuntimeError(
                "JETFLEET_OTEL_EXPORTER=otlp needs opentelemetry-exporter-otlp-proto-http"
            ) from exc
        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    else:
        raise ValueError(f"JETFLEET_OTEL_EXPORTER={choice!r}: use none, console, otlp or jsonl:<path>")
    trace.set_tracer_provider(provider)
    _enabled = True


def enabled() -> bool:
    """Whether spans are recorded (an exporter is set); when not, nothing is
    created or injected per message."""
    return _enabled


def shutdown() -> None:
    provider = trace.get_tracer_provider()
    if isinstance(provider, TracerProvider):
        provider.shutdown()


def tracer() -> trace.Tracer:
    return trace.get_tracer("jetfleet")


def inject(headers: dict[str, str]) -> dict[str, str]:
    """Add traceparent/tracestate of the current span to `headers`."""
    propagate.inject(headers)
    return headers


def extract(headers: Mapping[str, str] | None) -> otel_context.Context:
    return propagate.extract(dict(headers or {}))


@contextmanager
def span(
    name: str,
    *,
    kind: SpanKind = SpanKind.INTERNAL,
    headers: Mapping[str, str] | None = None,
    attributes: dict[str, Any] | None = None,
) -> Iterator[trace.Span]:
    """A span, parented on the trace context in `headers` when given."""
    if not _enabled:
        yield trace.INVALID_SPAN
        return
    ctx = extract(headers) if headers is not None else None
    with tracer().start_as_current_span(name, context=ctx, kind=kind,
                                        attributes=attributes or {}) as s:
        yield s


def messaging_attrs(subject: str, operation: str, msg_id: str | None = None) -> dict[str, Any]:
    attrs: dict[str, Any] = {
        "messaging.system": "nats",
        "messaging.destination.name": subject,
        "messaging.operation.type": operation,
    }
    if msg_id:
        attrs["messaging.message.id"] = msg_id
    return attrs
