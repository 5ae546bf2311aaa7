"""Span trees made with the OpenTelemetry SDK at chosen times, encoded as the OTLP exporter encodes
them, and stored through the collector's own conversion (``tables.request_to_tables``): what a sender
in any framework produces, down to how array and JSON attributes arrive in the lake."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from opentelemetry import trace
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from lightning_core.store.spans import Lake
from lightning_core.ingest.tables import request_to_tables


class Tree:
    """One sender's spans (one resource); times in microseconds from ``base_us``."""

    def __init__(self, resource: dict[str, Any], *, base_us: int = 1_700_000_000_000_000):
        self.exporter = InMemorySpanExporter()
        self.provider = TracerProvider(resource=Resource.create(resource))
        self.provider.add_span_processor(SimpleSpanProcessor(self.exporter))
        self.tracer = self.provider.get_tracer("otlp-trees")
        self.base_us = base_us

    def span(self, name: str, start: int, end: int, *, parent: trace.Span | None = None,
             attrs: dict[str, Any] | None = None) -> trace.Span:
        """Record one finished span (a root when ``parent`` is None); return it for children."""
        context = trace.set_span_in_context(parent) if parent is not None else None
        s = self.tracer.start_span(name, context=context, attributes=attrs or {},
                                   start_time=(self.base_us + start) * 1000)
        s.end(end_time=(self.base_us + end) * 1000)
        return s

    def write(self, lake_root: Path) -> None:
        """Encode the spans as one OTLP export request and store them as the collector does."""
        request = encode_spans(self.exporter.get_finished_spans())
        Lake(lake_root).write(request_to_tables(request))


def span_id(span: trace.Span) -> str:
    """The span's id as the lake stores it (hex)."""
    return format(span.get_span_context().span_id, "016x")
