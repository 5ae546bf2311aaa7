"""Build OTLP ExportTraceServiceRequests by hand, with any attribute types and ids (no SDK checks)."""

from __future__ import annotations

import base64
import itertools
from typing import Any

from google.protobuf import json_format
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import AnyValue

_ids = itertools.count(1)


def any_value(value: Any) -> AnyValue:
    """Encode a Python value as an OTLP ``AnyValue`` (bool, int, float, str, bytes, list, dict)."""
    out = AnyValue()
    set_value(out, value)
    return out


def set_value(out: AnyValue, value: Any) -> None:
    """Fill ``out`` in place (no copies, so any nesting depth can be built)."""
    if isinstance(value, bool):
        out.bool_value = value
    elif isinstance(value, int):
        out.int_value = value
    elif isinstance(value, float):
        out.double_value = value
    elif isinstance(value, str):
        out.string_value = value
    elif isinstance(value, bytes):
        out.bytes_value = value
    elif isinstance(value, list):
        out.array_value.SetInParent()
        for v in value:
            set_value(out.array_value.values.add(), v)
    elif isinstance(value, dict):
        out.kvlist_value.SetInParent()
        for k, v in value.items():
            kv = out.kvlist_value.values.add()
            kv.key = k
            set_value(kv.value, v)


def fill_attributes(target, attributes: dict[str, Any]) -> None:
    """Append ``attributes`` to a repeated KeyValue field."""
    for key, value in attributes.items():
        kv = target.add()
        kv.key = key
        set_value(kv.value, value)


def export_request(resource: dict[str, Any], spans: list[dict[str, Any]] | int = 1) -> ExportTraceServiceRequest:
    """One resource with ``resource`` attributes and ``spans`` (dicts of Span fields, or a count of plain ones)."""
    request = ExportTraceServiceRequest()
    add_resource(request, resource, spans)
    return request


def add_resource(request: ExportTraceServiceRequest, resource: dict[str, Any], spans: list[dict[str, Any]] | int = 1) -> None:
    """Append one resource with its spans to ``request``."""
    rs = request.resource_spans.add()
    fill_attributes(rs.resource.attributes, resource)
    scope = rs.scope_spans.add()
    scope.scope.name = "factory"
    for fields in ([{} for _ in range(spans)] if isinstance(spans, int) else spans):
        n = next(_ids)
        span = scope.spans.add()
        span.trace_id = fields.get("trace_id", n.to_bytes(16, "big"))
        span.span_id = fields.get("span_id", n.to_bytes(8, "big"))
        span.name = fields.get("name", f"span-{n}")
        span.start_time_unix_nano = fields.get("start", 1_700_000_000_000_000_000 + n)
        span.end_time_unix_nano = fields.get("end", 1_700_000_000_000_001_000 + n)
        if "parent" in fields:
            span.parent_span_id = fields["parent"]
        fill_attributes(span.attributes, fields.get("attributes", {}))


def otlp_json(request: ExportTraceServiceRequest) -> dict[str, Any]:
    """Encode as OTLP/JSON: camelCase keys and hex ids, as the OTLP spec (not protobuf) says."""
    data = json_format.MessageToDict(request)
    for rs in data.get("resourceSpans", []):
        for ss in rs.get("scopeSpans", []):
            for span in ss.get("spans", []):
                for item in (span, *span.get("links", [])):
                    for key in ("traceId", "spanId", "parentSpanId"):
                        if key in item:
                            item[key] = base64.b64decode(item[key]).hex()
    return data
