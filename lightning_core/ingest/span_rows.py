"""One row per OTLP span: the span tables' schema, and the Python path from an export request to its rows.

A row holds the span's ids as hex, its names, times and status, its attributes, events, links and
resource as JSON, the rollout context (from the resource, else from the span), and copies of the
attribute keys every query filters on (``PROMOTED_STRINGS``); the gateway's token ids and logprobs
leave the attributes JSON for list columns (``PROMOTED_ARRAYS``). Rows are grouped by ``Partition``:
a training run and epoch, or a production day (``lake`` stores each in its folder).

The collector converts requests as columns (``otlp_columns``, which gives these same rows) and
leaves to ``request_to_rows`` the spans that path does not take; ``request_to_tables`` is the entry
point for both, for the collector and for the embedded exporter (``tracing``) alike.
"""

from __future__ import annotations

import datetime as dt
import json
import time
from collections import defaultdict
from typing import Any, Iterable

import numpy as np
import pyarrow as pa
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue
from opentelemetry.proto.trace.v1.trace_pb2 import Span as PbSpan, Status as PbStatus

from lightning_core import names, semconv
from lightning_core.store.span_schema import PROMOTED_ARRAYS, PROMOTED_STRINGS, SPAN_SCHEMA, Partition




# Times are int64 nanoseconds in the lake, and DuckDB reads 2^63-1 as the infinite timestamp.
MAX_TIME_NS = 2**63 - 2
MAX_VALUE_DEPTH = 32
_ZERO_TRACE_ID, _ZERO_SPAN_ID = bytes(16), bytes(8)

KIND_NAMES = {v: k.removeprefix("SPAN_KIND_") for k, v in PbSpan.SpanKind.items()}
STATUS_NAMES = {v: k.removeprefix("STATUS_CODE_") for k, v in PbStatus.StatusCode.items()}


class SpanDataError(ValueError):
    """A span payload that cannot be stored; the message names the span and the field."""


def any_value(value: AnyValue, depth: int = 0) -> Any:
    """Convert an OTLP ``AnyValue`` to a JSON-able Python value (nested at most ``MAX_VALUE_DEPTH`` deep)."""
    which = value.WhichOneof("value")
    if which is None:
        return None
    if which in ("array_value", "kvlist_value") and depth >= MAX_VALUE_DEPTH:
        raise SpanDataError(f"an attribute value is nested more than {MAX_VALUE_DEPTH} levels deep: flatten it")
    if which == "array_value":
        return [any_value(v, depth + 1) for v in value.array_value.values]
    if which == "kvlist_value":
        return {kv.key: any_value(kv.value, depth + 1) for kv in value.kvlist_value.values}
    if which == "bytes_value":
        return value.bytes_value.hex()
    return getattr(value, which)


def key_values(items: Iterable[KeyValue]) -> dict[str, Any]:
    """Convert OTLP attributes to a dict, keeping the order they were sent in."""
    return {kv.key: any_value(kv.value) for kv in items}


dumps_json = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False, allow_nan=True).encode  # one encoder, not one per call


def _typed_list(value: Any, element: type, allowed: tuple[int, int] | None = None) -> list | None:
    """Return ``value`` (a list, or JSON text of one) as a list of ``element`` within ``allowed``; None if it is not one."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError:
            return None
    if not isinstance(value, list) or any(isinstance(v, (list, dict, str, bool)) for v in value):
        return None
    try:
        typed = [None if v is None else element(v) for v in value]
    except (TypeError, ValueError, OverflowError):
        return None
    if allowed is not None and any(v is not None and not allowed[0] <= v <= allowed[1] for v in typed):
        return None
    return typed


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or value is None:
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def promoted_columns(attributes: dict[str, Any]) -> dict[str, Any]:
    """Return a span's typed columns and its ``attributes`` JSON (without the promoted arrays).

    The Python path (``request_to_rows``) stores spans through this, and the columnar path
    (``otlp_columns``) gives the same rows. An array that is not a list of
    numbers (token ids: integers in ``TOKEN_ID_RANGE``) stays in the JSON and its column is NULL.
    """
    columns: dict[str, Any] = {column: _as_str(attributes.get(key)) for key, column in PROMOTED_STRINGS.items()}
    columns["reward_value"] = _number(attributes.get(semconv.REWARD_VALUE, attributes.get(semconv.AGENTLIGHTNING_REWARD_0_VALUE)))
    kept = attributes
    for key, (column, element, allowed) in PROMOTED_ARRAYS.items():
        columns[column] = None
        if key in attributes:
            typed = _typed_list(attributes[key], element, allowed)
            if typed is not None:
                if kept is attributes:
                    kept = dict(attributes)
                del kept[key]
                columns[column] = typed
    columns["attributes"] = dumps_json(kept)
    return columns


def request_to_rows(
    request: ExportTraceServiceRequest, *, received_ns: int | None = None, only: set[int] | None = None
) -> dict[Partition, list[dict[str, Any]]]:
    """Flatten an OTLP trace export request into span rows grouped by lake partition.

    ``only``: convert just the spans at these positions (counted over the whole request, resource by
    resource and scope by scope); each row then carries its position as ``_index``.
    """
    received_ns = received_ns if received_ns is not None else time.time_ns()
    grouped: dict[Partition, list[dict[str, Any]]] = defaultdict(list)
    position = -1
    for resource_spans in request.resource_spans:
        context = resource_context(resource_spans)
        partition_of, attempt = context["partition_of"], context["attempt"]
        for scope_spans in resource_spans.scope_spans:
            scope_name, scope_version = scope_spans.scope.name, scope_spans.scope.version
            for span in scope_spans.spans:
                position += 1
                if only is not None and position not in only:
                    continue
                _check_span(span)
                attributes = key_values(span.attributes)
                row = {
                    "trace_id": span.trace_id.hex(),
                    "span_id": span.span_id.hex(),
                    "parent_id": span.parent_span_id.hex() if span.parent_span_id.strip(b"\0") else None,
                    "name": span.name,
                    "kind": KIND_NAMES.get(span.kind, str(span.kind)),
                    "start_ns": span.start_time_unix_nano,
                    "end_ns": span.end_time_unix_nano,
                    "status_code": STATUS_NAMES.get(span.status.code, str(span.status.code)),
                    "status_message": span.status.message or None,
                    "events": events_json(span),
                    "links": links_json(span),
                    "resource": context["resource_json"],
                    "scope_name": scope_name or None,
                    "scope_version": scope_version or None,
                    "service_name": context["service_name"],
                    # a sender that serves many rollouts from one resource (a gateway) puts them on the span
                    "rollout_id": context["rollout_id"] or _as_str(attributes.get(semconv.ROLLOUT_ID)),
                    "task_id": context["task_id"] or _as_str(attributes.get(semconv.TASK_ID)),
                    "attempt": attempt if attempt is not None else _span_attempt(attributes),
                    "received_ns": received_ns,
                }
                if only is not None:
                    row["_index"] = position
                row.update(promoted_columns(attributes))
                grouped[partition_of(span.start_time_unix_nano)].append(row)
    return grouped


def resource_context(resource_spans) -> dict[str, Any]:
    """What a resource gives each of its spans' rows (a bad run id, epoch or attempt raises ``SpanDataError``):
    its attributes as JSON, ``partition_of(start_ns)``, the training partition (None for production
    spans), the service name and the rollout context."""
    resource = key_values(resource_spans.resource.attributes)
    partition_of = _partitioner(resource)
    fixed = partition_of(0)  # a training resource's one partition (a production span's depends on its day)
    return {
        "resource_json": dumps_json(resource),
        "partition_of": partition_of,
        "training": fixed if fixed.run_id is not None else None,
        "service_name": _as_str(resource.get(semconv.SERVICE_NAME)),
        # Agent Lightning's exporter names the rollout in its own resource attribute
        "rollout_id": _as_str(resource.get(semconv.ROLLOUT_ID, resource.get(semconv.AGENTLIGHTNING_ROLLOUT_ID))),
        "task_id": _as_str(resource.get(semconv.TASK_ID)),
        "attempt": _as_int(resource.get(semconv.ATTEMPT), semconv.ATTEMPT),
    }


def events_json(span: PbSpan) -> str:
    """The span's events as the ``events`` column stores them."""
    if not span.events:
        return "[]"
    return dumps_json([{"name": e.name, "time_ns": e.time_unix_nano, "attributes": key_values(e.attributes)} for e in span.events])


def links_json(span: PbSpan) -> str:
    """The span's links as the ``links`` column stores them."""
    if not span.links:
        return "[]"
    return dumps_json([{"trace_id": l.trace_id.hex(), "span_id": l.span_id.hex(), "attributes": key_values(l.attributes)}
                   for l in span.links])


def _check_span(span: PbSpan) -> None:
    """Refuse a span whose ids or times the lake cannot store (OTLP: all-zero ids are invalid)."""
    if len(span.trace_id) != 16 or len(span.span_id) != 8 or len(span.parent_span_id) not in (0, 8):
        raise SpanDataError(
            f"span {span.name!r}: trace_id must be 16 bytes, span_id 8 bytes and parent_span_id 0 or 8 bytes, "
            f"found {len(span.trace_id)}, {len(span.span_id)} and {len(span.parent_span_id)}"
        )
    if span.trace_id == _ZERO_TRACE_ID or span.span_id == _ZERO_SPAN_ID:
        raise SpanDataError(f"span {span.name!r}: trace_id and span_id must not be all zeros (OTLP marks such ids invalid)")
    if span.start_time_unix_nano > MAX_TIME_NS or span.end_time_unix_nano > MAX_TIME_NS:
        raise SpanDataError(
            f"span {span.name!r}: start and end times must be at most {MAX_TIME_NS} ns (year 2262), "
            f"found {span.start_time_unix_nano} and {span.end_time_unix_nano}"
        )


def _span_attempt(attributes: dict[str, Any]) -> int | None:
    """The span's own ``arclight.attempt`` (NULL, not an error, when it is not an integer)."""
    try:
        return _as_int(attributes.get(semconv.ATTEMPT), semconv.ATTEMPT)
    except SpanDataError:
        return None


def _partitioner(resource: dict[str, Any]):
    run_id = resource.get(semconv.RUN_ID)
    if run_id is None or run_id == "":
        return lambda start_ns: Partition(None, None, utc_date(start_ns))
    if isinstance(run_id, int) and not isinstance(run_id, bool):
        run_id = str(run_id)
    try:
        names.check_run_id(run_id, what=f"resource attribute {semconv.RUN_ID}")
    except names.InvalidName as exc:
        raise SpanDataError(str(exc)) from None
    epoch = _as_int(resource.get(semconv.EPOCH), semconv.EPOCH)
    partition = Partition(run_id, epoch if epoch is not None else 0)
    return lambda start_ns: partition


def utc_date(ns: int) -> str:
    """The UTC day (``YYYY-MM-DD``) of a time in ns since the epoch (today for 0): a production span's partition."""
    return dt.datetime.fromtimestamp((ns or time.time_ns()) / 1e9, tz=dt.timezone.utc).strftime("%Y-%m-%d")


def _as_str(value: Any) -> str | None:
    return None if value is None else str(value)


def _as_int(value: Any, key: str) -> int | None:
    """A resource attribute that must be a whole number 0 <= n < 2^63 (it becomes a folder or a BIGINT)."""
    if value is None or value == "":
        return None
    try:
        return names.check_count(value, what=f"resource attribute {key}")
    except names.InvalidName as exc:
        raise SpanDataError(str(exc)) from None


_ARRAY_COLUMNS = [field for field in SPAN_SCHEMA if pa.types.is_list(field.type)]
_SCALAR_SCHEMA = pa.schema([field for field in SPAN_SCHEMA if not pa.types.is_list(field.type)])


def rows_to_table(rows: list[dict[str, Any]]) -> pa.Table:
    """Build an Arrow table with ``SPAN_SCHEMA`` from span rows (array columns as lists or numpy arrays)."""
    columns = dict(zip(_SCALAR_SCHEMA.names, pa.Table.from_pylist(rows, schema=_SCALAR_SCHEMA).columns))
    for field in _ARRAY_COLUMNS:
        columns[field.name] = _list_column([row.get(field.name) for row in rows], field.type)
    return pa.Table.from_arrays([columns[name] for name in SPAN_SCHEMA.names], schema=SPAN_SCHEMA)


def _list_column(entries: list, list_type: pa.ListType) -> pa.Array:
    """One list column: numpy arrays are joined in one copy; Python lists go through ``pa.array``."""
    if not all(entry is None or isinstance(entry, np.ndarray) for entry in entries):
        return pa.array([entry.tolist() if isinstance(entry, np.ndarray) else entry for entry in entries], type=list_type)
    lengths = np.fromiter((0 if entry is None else entry.size for entry in entries), np.int64, len(entries))
    offsets = np.zeros(len(entries) + 1, np.int64)
    np.cumsum(lengths, out=offsets[1:])
    if offsets[-1] >= 2**31:
        raise SpanDataError(f"the request's spans hold {offsets[-1]} array values, over the 2^31 one table can hold: send fewer spans per request")
    present = [entry for entry in entries if entry is not None]
    values = np.concatenate(present) if present else np.empty(0, list_type.value_type.to_pandas_dtype())
    mask = pa.array([entry is None for entry in entries]) if len(present) < len(entries) else None
    return pa.ListArray.from_arrays(pa.array(offsets.astype(np.int32)), pa.array(values, type=list_type.value_type), type=list_type, mask=mask)
