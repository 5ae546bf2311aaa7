"""Turn an OTLP/HTTP request body into an ``ExportTraceServiceRequest``, or a 4xx with the reason.

Bodies are read with a size limit as they stream in, gunzipped with the same limit, and parsed
as protobuf or OTLP/JSON (hex ids). A protobuf body whose known fields arrive with the wrong wire
type is refused: protobuf would keep them as unknown fields and the spans would silently vanish.
The collector parses only a protobuf body's outline (``parse_outline``) and reads the spans' attributes
from the same bytes with compiled code (``otlp_wire``, for ``otlp_columns``).
"""

from __future__ import annotations

import base64
import functools
import json
import zlib
from typing import Any, Callable

from google.protobuf import descriptor_pb2, descriptor_pool, json_format, message_factory
from google.protobuf.descriptor import FileDescriptor
from google.protobuf.message import DecodeError, Message
from google.protobuf.unknown_fields import UnknownFieldSet
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from starlette.requests import Request

PROTOBUF = "application/x-protobuf"
JSON = "application/json"


class RequestRejected(Exception):
    """A request the collector answers with an error status and a reason (``retry_after`` for 503s)."""

    def __init__(self, status: int, reason: str, label: str, *, retry_after: int | None = None):
        super().__init__(reason)
        self.status, self.reason, self.label, self.retry_after = status, reason, label, retry_after


async def read_body(request: Request, limit: int, *, hold: Callable[[int], None]) -> bytes:
    """Read the body, stopping with a 413 past ``limit`` bytes; ``hold(n)`` is told the bytes held so far."""
    declared = request.headers.get("content-length")
    if declared and declared.isdigit():
        if int(declared) > limit:
            raise RequestRejected(413, f"body of {declared} bytes is over the limit of {limit} bytes: export smaller batches", "too_large")
        hold(int(declared))
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise RequestRejected(413, f"body is over the limit of {limit} bytes: export smaller batches", "too_large")
        hold(size)
        chunks.append(chunk)
    return b"".join(chunks)


def decode_body(body: bytes, encoding: str, limit: int) -> bytes:
    """Return the body gunzipped (``encoding`` gzip) or as is; 413 when it inflates past ``limit``."""
    if encoding in ("", "identity"):
        return body
    if encoding != "gzip":
        raise RequestRejected(415, f"content-encoding {encoding!r} is not supported: use gzip or none", "encoding")
    inflater = zlib.decompressobj(wbits=16 + zlib.MAX_WBITS)
    try:
        out = inflater.decompress(body, limit + 1)
    except zlib.error as exc:
        raise RequestRejected(400, f"gzip body could not be decompressed: {exc}", "bad_gzip") from None
    if len(out) > limit or inflater.unconsumed_tail:
        raise RequestRejected(413, f"body decompresses to more than the limit of {limit} bytes: export smaller batches", "too_large")
    if not inflater.eof:
        raise RequestRejected(400, "gzip body is truncated", "bad_gzip")
    return out


def parse(body: bytes, content_type: str) -> ExportTraceServiceRequest:
    """Parse a protobuf or OTLP/JSON export request; 400 for anything that is not one, 415 for other types."""
    _refuse_empty(body)
    export = ExportTraceServiceRequest()
    if content_type == PROTOBUF:
        return _parse_protobuf(export, body)
    if content_type == JSON:
        try:
            data = json.loads(body)
            _hex_ids_to_base64(data)
            json_format.ParseDict(data, export, ignore_unknown_fields=True)
        except RecursionError:
            raise RequestRejected(400, "body is not a valid OTLP/JSON ExportTraceServiceRequest: it is nested too deeply", "malformed") from None
        except (ValueError, json_format.ParseError, TypeError, AttributeError) as exc:
            raise RequestRejected(400, f"body is not a valid OTLP/JSON ExportTraceServiceRequest: {exc}", "malformed") from None
        return export
    raise RequestRejected(
        415, f"content-type {content_type or '(none)'!r} is not supported: use {PROTOBUF} or {JSON}", "content_type"
    )


def parse_outline(body: bytes) -> Message:
    """Parse a protobuf export request down to its spans, keeping each span's attributes, events and links
    as their encoded bytes; refused for the same reasons as ``parse`` down to that level.

    The whole ~1 MB request of the ingest benchmark takes 2.4-4 ms to parse, its outline 0.4-0.6 ms: the
    attribute values (a token id is a message of its own) are most of a request. ``otlp_wire`` reads
    the attributes from the same bytes and leaves what protobuf might refuse in them to the Python path,
    which parses the request whole (``whole_request``), with ``parse``'s errors.
    """
    _refuse_empty(body)
    return _parse_protobuf(_outline_class()(), body)


def outline_unchecked(body: bytes) -> Message:
    """The outline of ``body`` with no wire-type check: for bodies joined from ones ``parse_outline`` accepted."""
    return _outline_class().FromString(body)


def whole_request(request: Message, body: bytes) -> ExportTraceServiceRequest:
    """``request`` itself, or for an outline the whole request parsed from ``body``."""
    if isinstance(request, ExportTraceServiceRequest):
        return request
    return parse(body, PROTOBUF)


def _refuse_empty(body: bytes) -> None:
    if not body:
        raise RequestRejected(400, "empty body: expected an OTLP ExportTraceServiceRequest", "empty")


def _parse_protobuf(export: Message, body: bytes) -> Message:
    try:
        export.ParseFromString(body)
    except (DecodeError, RecursionError) as exc:
        raise RequestRejected(400, f"body is not a valid OTLP protobuf ExportTraceServiceRequest: {exc}", "malformed") from None
    check_wire_types(export)
    return export


def bytes_variant(as_bytes: dict[str, set[str]]) -> FileDescriptor:
    """The OTLP trace service's file, in a pool of its own, with the message fields of ``as_bytes`` (message
    full name -> field names) declared ``bytes``. A message field and a bytes field share their wire
    format, so a parser of the variant keeps those fields' encoded payloads instead of decoding them."""
    files: dict[str, descriptor_pb2.FileDescriptorProto] = {}

    def add(file: FileDescriptor) -> None:
        if file.name not in files:
            for dependency in file.dependencies:
                add(dependency)
            files[file.name] = descriptor_pb2.FileDescriptorProto()
            file.CopyToProto(files[file.name])

    add(ExportTraceServiceRequest.DESCRIPTOR.file)
    pool, changed = descriptor_pool.DescriptorPool(), set()
    for proto in files.values():
        for message in proto.message_type:
            for field in message.field:
                if field.name in as_bytes.get(f"{proto.package}.{message.name}", ()):
                    field.type = descriptor_pb2.FieldDescriptorProto.TYPE_BYTES
                    field.ClearField("type_name")
                    changed.add((f"{proto.package}.{message.name}", field.name))
        pool.Add(proto)
    wanted = {(message, field) for message, fields in as_bytes.items() for field in fields}
    if changed != wanted:  # a field renamed in a newer OTLP: fail loudly rather than parse it whole
        raise RuntimeError(f"OTLP fields not found to declare as bytes: {sorted(wanted - changed)}")
    return pool.FindFileByName(ExportTraceServiceRequest.DESCRIPTOR.file.name)


@functools.cache
def _outline_class() -> type[Message]:
    file = bytes_variant({"opentelemetry.proto.trace.v1.Span": {"attributes", "events", "links"}})
    return message_factory.GetMessageClass(file.message_types_by_name["ExportTraceServiceRequest"])


def check_wire_types(export: ExportTraceServiceRequest) -> None:
    """Refuse a known field that arrived with a wire type that does not fit it (down to the spans)."""
    _check_known(export)
    for resource_spans in export.resource_spans:
        _check_known(resource_spans)
        _check_known(resource_spans.resource)
        for scope_spans in resource_spans.scope_spans:
            _check_known(scope_spans)
            _check_known(scope_spans.scope)
            for span in scope_spans.spans:
                _check_known(span)


def _check_known(message: Message) -> None:
    for unknown in UnknownFieldSet(message):
        field = message.DESCRIPTOR.fields_by_number.get(unknown.field_number)
        if field is not None:  # an unknown number is a newer OTLP field: kept out, but not an error
            raise RequestRejected(
                400, f"body is not a valid OTLP protobuf ExportTraceServiceRequest: field {field.full_name} "
                     f"(number {unknown.field_number}) arrived with wire type {unknown.wire_type}, which does not fit its type",
                "malformed")


_ID_FIELDS = ("traceId", "spanId", "parentSpanId", "trace_id", "span_id", "parent_span_id")


def _hex_ids_to_base64(data: Any) -> None:
    """OTLP/JSON encodes ids as hex; protobuf's JSON parser expects base64 for bytes fields."""
    if not isinstance(data, dict):
        raise TypeError(f"expected a JSON object, found {type(data).__name__}")
    for resource_spans in data.get("resourceSpans", data.get("resource_spans", [])) or []:
        for scope_spans in resource_spans.get("scopeSpans", resource_spans.get("scope_spans", [])) or []:
            for span in scope_spans.get("spans", []) or []:
                _convert_ids(span)
                for link in span.get("links", []) or []:
                    _convert_ids(link)


def _convert_ids(obj: dict[str, Any]) -> None:
    for key in _ID_FIELDS:
        value = obj.get(key)
        if isinstance(value, str) and value:
            try:
                obj[key] = base64.b64encode(bytes.fromhex(value)).decode()
            except ValueError:
                raise ValueError(f"{key} {value!r} is not hex") from None
