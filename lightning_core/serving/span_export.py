"""OTLP/HTTP export of the gateway's spans, with their attributes encoded as protobuf wire bytes.

Every gateway span carries the prompt's and the answer's token ids and the answer's logprobs: a few
hundred numbers. The OpenTelemetry SDK's encoder builds one protobuf ``AnyValue`` object per number in
Python: 0.8-1.1 ms of CPU per calc-sized span here, most of the gateway's CPU per call. This encoder
lets the SDK's public ``encode_spans`` encode each span without its attributes and merges the
attributes in as wire bytes (``MergeFromString``, parsed in C), the numbers from a per-value cache and
the keys from a per-name cache. Measured on 2,000 calc-sized spans: 0.35 ms per span against 1.02 ms,
same machine and load; with the key cache and one-byte varints from a table, 512 spans: 80-85 µs per
span against 187 µs (the SDK's encoder 328-336 µs). The result decodes to exactly the spans the SDK's
encoder gives (a test compares the two)."""

from __future__ import annotations

import logging
import struct
import threading
import time
from typing import Any, Sequence

import requests
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult
from opentelemetry.util.types import Attributes

log = logging.getLogger("arclight.gateway.export")

RETRY_STATUS = {429, 502, 503, 504}


_ONE_BYTE = [bytes((n,)) for n in range(128)]


def _varint(value: int) -> bytes:
    if 0 <= value < 128:
        return _ONE_BYTE[value]
    value &= 0xFFFFFFFFFFFFFFFF  # negative int64 as protobuf writes it: ten bytes of two's complement
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _field(number: int, payload: bytes) -> bytes:
    """A length-delimited field: tag, length, bytes."""
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


class _IntValues(dict):
    """``ArrayValue.values`` entries (``AnyValue{int_value}``) per int, built once per distinct value."""

    def __missing__(self, value: int) -> bytes:
        any_value = b"\x18" + _varint(value)  # AnyValue.int_value = 3, varint
        encoded = self[value] = b"\x0a" + _varint(len(any_value)) + any_value  # ArrayValue.values = 1
        return encoded


class _Keys(dict):
    """``KeyValue.key`` (= 1) field bytes per attribute name, built once per name (strict UTF-8: the names are
    the gateway's own constants)."""

    def __missing__(self, key: str) -> bytes:
        if len(self) > 10_000:  # the gateway's names are a fixed few; never grow without bound
            self.clear()
        encoded = self[key] = _field(1, key.encode())
        return encoded


_INTS = _IntValues()
_KEYS = _Keys()
_DOUBLE = struct.Struct("<d")
_ONLY_INTS, _ONLY_FLOATS = {int}, {float}


def _array(values: list | tuple) -> bytes:
    """``ArrayValue`` bytes; long lists of ints or floats through the per-value caches."""
    kinds = set(map(type, values))
    if kinds == _ONLY_INTS:
        if len(_INTS) > 1_000_000:
            _INTS.clear()
        return b"".join(map(_INTS.__getitem__, values))
    if kinds == _ONLY_FLOATS:
        pack = _DOUBLE.pack
        return b"".join([b"\x0a\x09\x21" + pack(v) for v in values])  # values = 1 { double_value = 4, fixed64 }
    return b"".join([_field(1, _any(v)) for v in values])


def _any(value: Any) -> bytes:
    """``AnyValue`` bytes of an attribute value (the types OpenTelemetry attributes may hold)."""
    if isinstance(value, str):
        return _field(1, value.encode("utf-8", "surrogatepass"))
    if isinstance(value, bool):
        return b"\x10\x01" if value else b"\x10\x00"
    if isinstance(value, int):
        return b"\x18" + _varint(value)
    if isinstance(value, float):
        return b"\x21" + _DOUBLE.pack(value)
    if isinstance(value, (list, tuple)):
        return _field(5, _array(value))
    if isinstance(value, bytes):
        return _field(7, value)
    raise TypeError(f"attribute value of type {type(value).__name__} cannot be exported")


def _attribute(key: str, value: Any) -> bytes:
    """One ``Span.attributes`` (= 9) entry: ``KeyValue{key = 1, value = 2}``."""
    key_value = _KEYS[key] + _field(2, _any(value))
    return _field(9, key_value)


class _Lean:
    """A span seen without its long numeric lists (what the SDK encodes); everything else is the span's."""

    def __init__(self, span: ReadableSpan, attributes: Attributes):
        self._span, self.attributes = span, attributes

    def __getattr__(self, name: str) -> Any:
        return getattr(self._span, name)


def encode_request(spans: Sequence[ReadableSpan]) -> bytes:
    """Serialize ``spans`` as one OTLP ``ExportTraceServiceRequest``: the SDK encodes each span without
    attributes, and the attributes (``Span.attributes`` = 9, ``KeyValue{key = 1, value = 2}``), in their order,
    are merged into it as wire bytes."""
    lean, attributes = [], {}
    for span in spans:
        attrs = span.attributes or {}
        lean.append(_Lean(span, {}))
        attributes[span.context.span_id] = b"".join([_attribute(key, value) for key, value in attrs.items()])
    request = encode_spans(lean)
    for resource_spans in request.resource_spans:
        for scope_spans in resource_spans.scope_spans:
            for pb_span in scope_spans.spans:
                more = attributes.get(int.from_bytes(pb_span.span_id, "big"))
                if more:
                    pb_span.MergeFromString(more)
    return request.SerializePartialToString()


class GatewaySpanExporter(SpanExporter):
    """POST spans as OTLP/HTTP protobuf to ``endpoint``; retries refused connections and 429/5xx with backoff."""

    def __init__(self, endpoint: str, *, headers: dict[str, str] | None = None, timeout_s: float = 10.0):
        self.endpoint, self.timeout_s = endpoint, timeout_s
        self.session = requests.Session()
        self.session.headers.update({"Content-Type": "application/x-protobuf", **(headers or {})})
        self._stopped = threading.Event()

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        if self._stopped.is_set():
            return SpanExportResult.FAILURE
        try:
            body = encode_request(spans)
        except Exception:  # one bad batch must not stop the exporter thread
            log.exception("could not encode %d spans; they are dropped", len(spans))
            return SpanExportResult.FAILURE
        deadline, delay = time.monotonic() + self.timeout_s, 0.1
        while True:
            problem = None
            try:
                response = self.session.post(self.endpoint, data=body, timeout=max(self.timeout_s, 1.0))
                if response.ok:
                    return SpanExportResult.SUCCESS
                problem = f"{response.status_code}: {response.text[:300]}"
                if response.status_code not in RETRY_STATUS:
                    break
            except requests.RequestException as exc:
                problem = repr(exc)
            if time.monotonic() + delay > deadline or self._stopped.wait(delay):
                break
            delay = min(delay * 2, 2.0)
        log.error("the collector at %s did not take %d spans: %s", self.endpoint, len(spans), problem)
        return SpanExportResult.FAILURE

    def shutdown(self) -> None:
        self._stopped.set()
        self.session.close()

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return True
