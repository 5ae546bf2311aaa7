"""OpenTelemetry for the team, set up from the standard ``OTEL_*`` variables only (nothing from Arclight).

``OTEL_RESOURCE_ATTRIBUTES`` names the rollout (read by ``Resource.create()``), the OTLP exporter reads
its endpoint and headers, and ``TRACEPARENT`` (the runner's rollout span) becomes the parent of
AutoGen's spans. Every span is exported before the program ends.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from typing import Iterator

from opentelemetry import context, trace
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator


@contextmanager
def tracing() -> Iterator[None]:
    """Make an OTLP-exporting provider global (AutoGen's runtime traces to it) for the body; flush it after."""
    provider = TracerProvider(resource=Resource.create())
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    trace.set_tracer_provider(provider)
    token = context.attach(TraceContextTextMapPropagator().extract({"traceparent": os.environ.get("TRACEPARENT", "")}))
    try:
        yield
    finally:
        context.detach(token)
        if not provider.force_flush(30_000):
            raise SystemExit("the spans could not be exported to the collector")
        provider.shutdown()
