"""Embedded mode of the tracing SDK: an agent's spans written straight into the lake, with no collector, by the code
the collector uses (``tracing.init_tracing(lake=...)``)."""

from __future__ import annotations

import logging
import os
from typing import Sequence

from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult

from lightning_core.ingest.tables import request_to_tables
from lightning_core.store.spans import Lake

log = logging.getLogger("arclight.tracing")


class LakeSpanExporter(SpanExporter):
    """Embedded mode: writes finished spans straight into the lake's span tables, no collector needed.

    Spans are encoded exactly as the OTLP exporter encodes them and stored by the same code the
    collector uses, so both paths produce the same rows.
    """

    def __init__(self, lake_root: str | os.PathLike[str]):
        self.lake = Lake(lake_root)

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        """Write one batch of spans to the lake durably."""
        try:
            self.lake.write(request_to_tables(encode_spans(spans)))
        except Exception:
            log.exception("embedded exporter could not write %d spans to %s", len(spans), self.lake.root)
            return SpanExportResult.FAILURE
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        """Nothing to release: every export is already durable."""

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        """Nothing is buffered here; the batch processor flushes into ``export``."""
        return True
