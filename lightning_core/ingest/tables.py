"""One OTLP export request into one Arrow table per lake partition: the spans as columns (``otlp_columns``), those
that path leaves to Python row by row (``span_rows``), every value checked before any write."""

from __future__ import annotations

import time

import pyarrow as pa
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

from lightning_core.ingest import otlp_columns
from lightning_core.ingest.span_rows import SpanDataError
from lightning_core.store.span_schema import Partition


def request_to_tables(
    request: ExportTraceServiceRequest, *, body: bytes | None = None, received_ns: int | None = None,
    max_partitions: int | None = None,
) -> dict[Partition, pa.Table]:
    """Flatten an export request into one Arrow table per lake partition.

    The spans are converted as columns (``otlp_columns``, from the protobuf ``body`` the request was
    parsed from, or its serialisation); the spans that path leaves to Python come from
    ``request_to_rows``. Every value is converted here, so a span the lake cannot store raises
    ``SpanDataError`` for its own request and never reaches a write shared with other requests.
    """
    received_ns = received_ns if received_ns is not None else time.time_ns()
    try:
        tables = otlp_columns.request_to_tables(request, request.SerializeToString() if body is None else body, received_ns)
    except SpanDataError:
        raise
    except (pa.ArrowException, OverflowError, UnicodeError, TypeError, ValueError) as exc:
        raise SpanDataError(f"a span value cannot be stored: {exc}") from None
    if max_partitions is not None and len(tables) > max_partitions:
        raise SpanDataError(
            f"the request's spans fall into {len(tables)} lake partitions (run and epoch, or date), over the limit of "
            f"{max_partitions}: export each run's spans separately"
        )
    return tables
