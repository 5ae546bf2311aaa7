"""The columnar conversion (``otlp_columns``) gives the rows the per-span Python path gives, byte for byte.

The oracle is ``span_rows.request_to_rows`` + ``rows_to_table``, the conversion the lake had before
(and keeps for the spans the columnar path hands it). Random requests mix several resources
(training runs, production spans on different days), scopes with and without names, every
attribute type (strings that need JSON escapes, unicode, ints, doubles with NaN and infinities,
bools, bytes, nulls, lists, maps), repeated keys, the promoted keys with clean and odd values,
reward values of every type, rollout context on the resource or the span, events, links, status
codes and kinds out of range, parents that are empty, zero or set. The tables must be equal.
"""

from __future__ import annotations

import pyarrow as pa
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

from lightning_core.ingest import otlp_columns, otlp_decode, otlp_wire, span_rows
from lightning_core.ingest.tables import request_to_tables
from lightning_core.store import span_schema
from lightning_core import semconv
from lightning_core.ingest.span_rows import SpanDataError
from tests.otlp_factory import fill_attributes, set_value

PROMOTED = list(span_schema.PROMOTED_ARRAYS)
KEYS = PROMOTED + [
    semconv.SPAN_KIND, semconv.AGENT_NAME, semconv.GEN_AI_RESPONSE_ID, semconv.REWARD_VALUE,
    semconv.AGENTLIGHTNING_REWARD_0_VALUE, semconv.ROLLOUT_ID, semconv.TASK_ID, semconv.ATTEMPT,
    "tool.output", "gen_ai.prompt", "k\"ey\n", "ключ",
]
text = st.text(alphabet=st.sampled_from(list('ab "\\\n\t\x00\x1fé€😀/')), max_size=8)
scalars = st.one_of(text, st.integers(-(2**63), 2**63 - 1), st.integers(-3, 3), st.booleans(), st.binary(max_size=4),
                    st.floats(allow_nan=True, allow_infinity=True), st.none())
STRINDEX = object()
values = st.one_of(
    scalars, scalars, scalars, st.just(STRINDEX),
    st.lists(st.integers(0, 2**31 - 1), max_size=30),  # token ids
    st.lists(st.floats(allow_nan=True, allow_infinity=True), max_size=20),  # logprobs
    st.lists(st.integers(0, 2**31 - 1), max_size=5).map(lambda xs: xs + [2**31]),  # out of the id range
    st.lists(st.one_of(st.integers(0, 9), st.floats(0, 1)), max_size=4),
    st.lists(scalars, max_size=3), st.dictionaries(text, scalars, max_size=3), st.just([]), st.just("[1, 2]"),
)


clean = {  # what the columnar path takes, per key
    **{key: st.lists(st.integers(0, 2**31 - 1), max_size=30) for key in PROMOTED[:2]},
    PROMOTED[2]: st.lists(st.floats(allow_nan=True, allow_infinity=True), max_size=20),
    semconv.REWARD_VALUE: st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.integers(-5, 5), st.none()),
    semconv.AGENTLIGHTNING_REWARD_0_VALUE: st.one_of(st.floats(allow_nan=True), st.integers(-5, 5)),
    semconv.ATTEMPT: st.integers(0, 3),
    **{key: st.one_of(text, st.none()) for key in (semconv.SPAN_KIND, semconv.AGENT_NAME, semconv.GEN_AI_RESPONSE_ID,
                                                   semconv.ROLLOUT_ID, semconv.TASK_ID)},
}


def odd(draw, odds: int) -> bool:
    """True one time in ``odds``."""
    return draw(st.integers(0, odds - 1)) == 0


@st.composite
def spans(draw):
    if odd(draw, 8):  # anything, repeated keys included
        keys = draw(st.lists(st.sampled_from(KEYS), max_size=8))
        attributes = [(key, draw(values)) for key in keys]
    else:
        keys = draw(st.lists(st.sampled_from(KEYS), max_size=8, unique=True))
        attributes = [(key, draw(clean.get(key, scalars) if not odd(draw, 25) else values)) for key in keys]
    return {
        "attributes": attributes,
        "kind": draw(st.sampled_from([0, 1, 2, 3, 4, 5])) if not odd(draw, 25) else 9,
        "status": draw(st.sampled_from([None, (0, ""), (1, "ok"), (2, "boom \"x\"")])) if not odd(draw, 25) else (7, ""),
        "parent": draw(st.sampled_from([None, b"", bytes(8), b"\x00" * 7 + b"\x05"])),
        "events": odd(draw, 5),
        "links": odd(draw, 8),
        "day": draw(st.sampled_from([0, 0, 1, 2])),
        "name": draw(text),
    }


resources = st.lists(
    st.tuples(
        st.sampled_from([
            {"service.name": "svc", semconv.RUN_ID: "run-a", semconv.EPOCH: 2},
            {"service.name": "svc", semconv.RUN_ID: "run-b", semconv.ROLLOUT_ID: "ro-1", semconv.TASK_ID: "t", semconv.ATTEMPT: 2},
            {"service.name": "prod"},
            {semconv.AGENTLIGHTNING_ROLLOUT_ID: "al-7", semconv.RUN_ID: "", semconv.EPOCH: ""},
            {},
        ]),
        st.lists(st.lists(spans(), max_size=6), min_size=1, max_size=2),  # scopes of spans
    ),
    min_size=1, max_size=3,
)


def _build(drawn) -> ExportTraceServiceRequest:
    request = ExportTraceServiceRequest()
    n = 0
    for resource, scopes in drawn:
        rs = request.resource_spans.add()
        fill_attributes(rs.resource.attributes, resource)
        for s, scope_spans in enumerate(scopes):
            scope = rs.scope_spans.add()
            if s == 0:
                scope.scope.name, scope.scope.version = "scope", "1.0"
            for fields in scope_spans:
                n += 1
                span = scope.spans.add()
                span.trace_id = (n % 3 + 1).to_bytes(16, "big")
                span.span_id = n.to_bytes(8, "big")
                span.name = fields["name"]
                span.kind = fields["kind"]
                span.start_time_unix_nano = 1_700_000_000_000_000_000 + fields["day"] * 86_400 * 10**9 + n
                span.end_time_unix_nano = span.start_time_unix_nano + 1000
                if fields["parent"] is not None:
                    span.parent_span_id = fields["parent"]
                if fields["status"] is not None:
                    span.status.code, span.status.message = fields["status"]
                for key, value in fields["attributes"]:
                    kv = span.attributes.add()
                    kv.key = key
                    if value is STRINDEX:
                        kv.value.string_value_strindex = 7  # a oneof member the columnar path leaves to Python
                    elif value is not None:
                        set_value(kv.value, value)
                if fields["events"]:
                    event = span.events.add(name="exception", time_unix_nano=5)
                    fill_attributes(event.attributes, {"exception.message": "x"})
                if fields["links"]:
                    span.links.add(trace_id=bytes(15) + b"\x01", span_id=bytes(7) + b"\x02")
    return request


def _python(request: ExportTraceServiceRequest) -> dict:
    grouped = span_rows.request_to_rows(request, received_ns=123)
    return {partition: span_rows.rows_to_table(rows) for partition, rows in grouped.items()}


COUNTS = {"spans": 0, "python": 0}


def _assert_same(request: ExportTraceServiceRequest) -> None:
    expected = _python(request)
    python = span_rows.request_to_rows

    def counting(*args, only=None, **kwargs):
        COUNTS["python"] += len(only) if only is not None else sum(len(ss.spans) for rs in request.resource_spans for ss in rs.scope_spans)
        return python(*args, only=only, **kwargs)

    body = request.SerializeToString()
    span_rows.request_to_rows = counting
    try:
        got = otlp_columns.request_to_tables(request, body, 123)
    finally:
        span_rows.request_to_rows = python
    COUNTS["spans"] += sum(t.num_rows for t in expected.values())
    _assert_tables_equal(got, expected)
    # the collector's way: the request's outline (attributes, events and links left as bytes) and its body
    _assert_tables_equal(otlp_columns.request_to_tables(otlp_decode.parse_outline(body), body, 123), expected)


def _assert_tables_equal(got: dict, expected: dict) -> None:
    assert list(got) == list(expected)
    for partition, table in expected.items():
        other = got[partition]
        assert other.schema.equals(table.schema)
        for name in table.column_names:
            mine, theirs = other.column(name).to_pylist(), table.column(name).to_pylist()
            assert mine == theirs or repr(mine) == repr(theirs), (partition, name)  # repr: NaN equals NaN


@settings(max_examples=300, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(drawn=resources)
def test_random_requests_give_the_python_paths_rows(drawn):
    _assert_same(_build(drawn))


def test_the_random_requests_were_mostly_columnar():
    """The test above is worth something only if most of its spans took the columnar path."""
    if COUNTS["spans"] == 0:  # run on its own: run the random requests here
        test_random_requests_give_the_python_paths_rows()
    assert COUNTS["spans"] > 1000
    assert COUNTS["python"] < 0.6 * COUNTS["spans"], COUNTS


def test_a_clean_gateway_request_is_converted_as_columns_only(monkeypatch):
    """The request shape of the ingest benchmark leaves nothing to the Python path."""
    from benchmarks.ingest_bench import build_request

    body = build_request(3, spans=60)
    request = ExportTraceServiceRequest.FromString(body)

    def refuse(*args, **kwargs):
        raise AssertionError("the Python path was used")

    _assert_same(request)
    monkeypatch.setattr(span_rows, "request_to_rows", refuse)
    tables = otlp_columns.request_to_tables(request, body, 123)
    table = tables[span_schema.Partition("ingest", 0)]
    assert table.num_rows == 60
    assert table.column("prompt_token_ids")[0].as_py() == [(3 * 60 + 1 + j) % 49152 for j in range(200)]
    assert table.column("attributes")[1].as_py().startswith('{"arclight.rollout_id":"ro-3-0"')


@pytest.mark.parametrize("fields, message", [
    ({"trace_id": b"\x01" * 15}, "trace_id must be 16 bytes"),
    ({"trace_id": bytes(16)}, "must not be all zeros"),
    ({"start": 2**63}, "start and end times"),
])
def test_a_bad_span_raises_the_python_paths_error(fields, message):
    from tests.otlp_factory import export_request

    request = export_request({semconv.RUN_ID: "r"}, [{}, fields])
    with pytest.raises(SpanDataError, match=message):
        request_to_tables(request)


def test_one_odd_span_costs_only_itself():
    """A span with a map value goes through Python; its neighbours stay columnar and in order."""
    request = ExportTraceServiceRequest()
    rs = request.resource_spans.add()
    fill_attributes(rs.resource.attributes, {semconv.RUN_ID: "r"})
    scope = rs.scope_spans.add()
    for n in range(1, 6):
        span = scope.spans.add(trace_id=n.to_bytes(16, "big"), span_id=n.to_bytes(8, "big"), name=f"s{n}")
        fill_attributes(span.attributes, {"x": {"nested": [1, 2]}} if n == 3 else {"x": n})
    table = request_to_tables(request)[span_schema.Partition("r", 0)]
    assert table.column("name").to_pylist() == ["s1", "s2", "s3", "s4", "s5"]
    assert table.column("attributes").to_pylist()[1:4] == ['{"x":2}', '{"x":{"nested":[1,2]}}', '{"x":4}']
    assert pa.types.is_string(table.schema.field("attributes").type)


def test_a_value_of_a_newer_oneof_member_goes_to_python():
    """``string_value_strindex`` (OTLP's profile dictionaries) is not a value the columnar path knows."""
    request = ExportTraceServiceRequest()
    rs = request.resource_spans.add()
    fill_attributes(rs.resource.attributes, {semconv.RUN_ID: "r"})
    span = rs.scope_spans.add().spans.add(trace_id=b"\x01" * 16, span_id=b"\x02" * 8, name="s")
    kv = span.attributes.add(key="k")
    kv.value.string_value_strindex = 7
    _assert_same(request)
    [table] = request_to_tables(request).values()
    assert table.column("attributes").to_pylist() == ['{"k":7}']


def _field(tag: int, payload: bytes) -> bytes:
    from google.protobuf.internal.encoder import _VarintBytes

    return bytes([tag]) + _VarintBytes(len(payload)) + payload


def test_the_outline_refuses_a_span_field_of_the_wrong_wire_type_as_the_whole_parse_does():
    from opentelemetry.proto.trace.v1.trace_pb2 import Span

    span = Span(trace_id=b"\x01" * 16, span_id=b"\x02" * 8).SerializeToString() + bytes([0x28, 0x05])  # name as a varint
    body = _field(0x0A, _field(0x12, _field(0x12, span)))
    for parse in (lambda b: otlp_decode.parse(b, otlp_decode.PROTOBUF), otlp_decode.parse_outline):
        with pytest.raises(otlp_decode.RequestRejected, match="opentelemetry.proto.trace.v1.Span.name .* wire type 0"):
            parse(body)


def test_a_bytes_variant_of_a_field_otlp_does_not_have_fails_loudly():
    with pytest.raises(RuntimeError, match="no_such_field"):
        otlp_decode.bytes_variant({"opentelemetry.proto.common.v1.AnyValue": {"no_such_field"}})


def test_the_collectors_path_never_parses_a_clean_gateway_request_whole(monkeypatch):
    """The outline and the compiled reader (``otlp_wire``) are all a clean request costs: protobuf's whole parse
    (~4 ms of a ~10 ms conversion for the benchmark's 1 MB request) and the Python path stay for odd requests."""
    from benchmarks.ingest_bench import build_request

    body = build_request(5, spans=60)

    def refuse(*args, **kwargs):
        raise AssertionError("the whole request was parsed or converted in Python")

    outline = otlp_decode.parse_outline(body)
    monkeypatch.setattr(otlp_decode, "parse", refuse)
    monkeypatch.setattr(span_rows, "request_to_rows", refuse)
    tables = request_to_tables(outline, body=body)
    assert sum(t.num_rows for t in tables.values()) == 60
    assert tables[span_schema.Partition("ingest", 0)].column("response_token_ids")[0].as_py() == [(5 * 60 + 1 + j) % 49152 for j in range(40)]


def _element(kind: str, value: int) -> bytes:
    """One encoded ``ArrayValue.values`` element: a clean token id, or a shape the decoder must refuse."""
    from google.protobuf.internal.encoder import _VarintBytes
    from opentelemetry.proto.common.v1.common_pb2 import AnyValue

    if kind == "id":
        return _field(0x0A, AnyValue(int_value=value).SerializeToString())
    if kind == "negative":  # a 10-byte varint
        return _field(0x0A, AnyValue(int_value=-value - 1).SerializeToString())
    if kind == "double":
        return _field(0x0A, AnyValue(double_value=value / 7).SerializeToString())
    if kind == "string":
        return _field(0x0A, AnyValue(string_value=str(value)).SerializeToString())
    if kind == "padded":  # the id's varint with a redundant continuation byte: protobuf reads the same id
        varint = bytearray(_VarintBytes(value))
        varint[-1] |= 0x80
        return _field(0x0A, bytes([0x18]) + bytes(varint) + b"\x00")
    if kind in ("long", "short"):  # an id whose element length byte is one off
        clean = AnyValue(int_value=value).SerializeToString()
        return bytes([0x0A, len(clean) + (1 if kind == "long" else -1)]) + clean
    if kind == "bool":  # the same shape, another varint field of AnyValue
        return _field(0x0A, AnyValue(bool_value=bool(value % 2)).SerializeToString())
    if kind == "unknown":  # the same shape in a field ArrayValue does not have (protobuf skips it)
        return bytes([0x12]) + _element("id", value)[1:]
    if kind == "extra":  # an id and another field in the same value
        return _field(0x0A, AnyValue(int_value=value).SerializeToString() + bytes([0x08, 0x01]))
    if kind == "high":  # a stray byte that continues a varint
        return bytes([0x80 | value % 128])
    return bytes([value % 128])  # "noise": a stray byte that ends one


elements = st.tuples(st.sampled_from(["id"] * 12 + ["negative", "double", "string", "padded", "long", "short", "bool", "unknown", "extra", "noise", "high"]),
                     st.one_of(st.integers(0, 300), st.integers(0, 2**31 - 1), st.integers(2**31, 2**35)))


@settings(max_examples=400, deadline=None, database=None)
@given(arrays=st.lists(st.lists(elements, max_size=12), min_size=1, max_size=6), shift=st.integers(0, 3))
@example(arrays=[[("id", 5), ("high", 5), ("id", 70000)]], shift=0)  # a stray byte between elements
@example(arrays=[[("id", 5), ("bool", 1)]], shift=0)
@example(arrays=[[("unknown", 5), ("id", 6)]], shift=0)
@example(arrays=[[("id", 5), ("long", 300)], [("id", 1)]], shift=0)
@example(arrays=[[("short", 300), ("id", 5)]], shift=0)
@example(arrays=[[("id", 5), ("id", 2**31 - 1)], [("id", 1)]], shift=2)  # arrays that split an element
@example(arrays=[[("id", 2**31), ("id", 1)]], shift=0)
@example(arrays=[[("id", 2**35 - 1)]], shift=0)  # a 6-byte varint
def test_the_token_id_decoder_accepts_only_arrays_protobuf_reads_as_those_ids(arrays, shift):
    """``otlp_wire.token_ids_at`` (compiled, over the encoded ``ArrayValue`` payloads) either refuses an array, or
    gives exactly the int values protobuf parses from it, each element an ``AnyValue`` of only ``int_value``
    within the token id range. Clean ids in range are never refused. (``shift`` moves the last bytes of
    the first array to the start of the second: arrays that split an element.)"""
    import numpy as np
    from google.protobuf.message import DecodeError
    from opentelemetry.proto.common.v1.common_pb2 import ArrayValue

    payloads = [b"".join(_element(kind, value) for kind, value in array) for array in arrays]
    if len(payloads) > 1 and 0 < shift <= len(payloads[0]):
        payloads[:2] = [payloads[0][:-shift], payloads[0][-shift:] + payloads[1]]
        arrays = [[("split", 0)], [("split", 0)]] + arrays[2:]  # not clean any more
    bounds = np.cumsum([0] + [len(p) for p in payloads])
    values, counts, ok = otlp_wire.token_ids_at(np.frombuffer(b"".join(payloads), np.uint8), bounds[:-1], bounds[1:])
    at = 0
    for array, payload, count, decoded in zip(arrays, payloads, counts.tolist(), ok.tolist()):
        clean = all(kind == "id" and value < 2**31 for kind, value in array)
        if not decoded:
            assert not clean and count == 0, array
            continue
        try:
            parsed = ArrayValue.FromString(payload)
        except DecodeError:
            raise AssertionError(f"decoded what protobuf refuses: {payload.hex()}") from None
        assert all(v.ListFields() and [f.name for f, _ in v.ListFields()] == ["int_value"] for v in parsed.values)
        assert values[at : at + count].tolist() == [v.int_value for v in parsed.values]
        assert all(0 <= v.int_value < 2**31 for v in parsed.values)
        at += count
    assert at == len(values)


def test_joined_requests_convert_to_the_rows_of_each_alone():
    """The collector converts requests that queue together as one body (two serialised requests one after
    the other are one request): the same rows, per partition in the order of the requests."""
    from benchmarks.ingest_bench import build_request

    first, second = build_request(1, spans=40), build_request(2, spans=40, run_id="other")
    third = build_request(3, spans=40)
    joined = first + second + third
    got = otlp_columns.request_to_tables(otlp_decode.outline_unchecked(joined), joined, 123)
    alone = [otlp_columns.request_to_tables(otlp_decode.parse_outline(b), b, 123) for b in (first, second, third)]
    assert list(got) == [span_schema.Partition("ingest", 0), span_schema.Partition("other", 0)]
    assert got[span_schema.Partition("ingest", 0)].equals(pa.concat_tables([alone[0][span_schema.Partition("ingest", 0)],
                                                                      alone[2][span_schema.Partition("ingest", 0)]]))
    assert got[span_schema.Partition("other", 0)].equals(alone[1][span_schema.Partition("other", 0)])


def _kv(key: bytes, *values: bytes) -> bytes:
    """A ``KeyValue`` with ``values`` as its ``value`` field, each an encoded ``AnyValue`` (several: protobuf merges)."""
    return _field(0x0A, key) + b"".join(_field(0x12, value) for value in values)


def _body(*spans: bytes, scope: bytes = b"") -> bytes:
    from opentelemetry.proto.resource.v1.resource_pb2 import Resource

    resource = Resource()
    fill_attributes(resource.attributes, {semconv.RUN_ID: "r"})
    scope_spans = scope + b"".join(_field(0x12, span) for span in spans)
    return _field(0x0A, _field(0x0A, resource.SerializeToString()) + _field(0x12, scope_spans))


IDS = _field(0x0A, b"\x01" * 16) + _field(0x12, b"\x02" * 8)
ARRAY = _field(0x2A, _field(0x0A, bytes([0x18, 5])) + _field(0x0A, bytes([0x18, 7])))  # AnyValue{array_value: [5, 7]}


@pytest.mark.parametrize("body", [
    # fields in another order, attributes between the others, a time before the ids
    _body(bytes([0x39]) + (5).to_bytes(8, "little") + _field(0x4A, _kv(b"a", _field(0x0A, b"x"))) + _field(0x2A, b"late")
          + IDS + _field(0x4A, _kv(b"b", bytes([0x18, 3]))) + bytes([0x30, 2])),
    # a status in two parts (protobuf merges them: the code of one, the message of the other)
    _body(IDS + _field(0x7A, bytes([0x18, 2])) + _field(0x7A, _field(0x12, b"why"))),
    # unknown span fields: a varint, a fixed32, a group with a field inside, a length-delimited one
    _body(IDS + bytes([0xF8, 0x07, 1]) + bytes([0xFD, 0x07]) + b"\x00" * 4 + bytes([0xFB, 0x07, 0x08, 1, 0xFC, 0x07])
          + bytes([0xFA, 0x07, 2]) + b"zz" + _field(0x4A, _kv(b"k", _field(0x0A, b"v")))),
    # a value in two parts: the later member wins; an array in two parts is merged (the Python path's)
    _body(IDS + _field(0x4A, _kv(b"k", _field(0x0A, b"s"), bytes([0x18, 9])))),
    _body(IDS + _field(0x4A, _kv(b"arclight.llm.prompt_token_ids", ARRAY, ARRAY))),
    _body(IDS + _field(0x4A, _kv(b"arclight.llm.prompt_token_ids", ARRAY, _field(0x0A, b"s"), ARRAY))),
    # a KeyValue with an unknown field, a value with no member, a key given twice in one KeyValue
    _body(IDS + _field(0x4A, _kv(b"k", b"") + bytes([0x18, 1])) + _field(0x4A, _field(0x0A, b"x") + _field(0x0A, b"y"))),
    # a negative kind (a 10-byte varint), a scope in two parts, a span with no attributes after one with many
    _body(IDS + bytes([0x30]) + b"\xff" * 9 + b"\x01", IDS + _field(0x4A, _kv(b"d", bytes([0x21]) + b"\x00" * 8)),
          scope=_field(0x0A, _field(0x0A, b"name")) + _field(0x0A, _field(0x12, b"1.0"))),
    # int_value with a double's wire type: protobuf keeps it as an unknown field (a value with no member)
    _body(IDS + _field(0x4A, _kv(b"k", bytes([0x19]) + b"\x00" * 8))),
])
def test_protobuf_the_reader_takes_in_any_valid_form_gives_the_python_paths_rows(body):
    """``otlp_wire`` reads the wire format as protobuf does: any field order, unknown fields (groups too) skipped,
    a message that comes twice merged, the last member of a oneof kept; what it does not take as protobuf would
    (an array that comes twice) goes to the Python path."""
    expected = _python(ExportTraceServiceRequest.FromString(body))
    _assert_tables_equal(otlp_columns.request_to_tables(otlp_decode.parse_outline(body), body, 123), expected)


@pytest.mark.parametrize("attribute", [
    _kv(b"k", _field(0x0A, b"x"))[:-1],  # cut short inside the value
    _field(0x0A, b"\xff\xfe") + _field(0x12, _field(0x0A, b"x")),  # a key that is not UTF-8
    _kv(b"k", _field(0x0A, b"\xc3")),  # a string value that is not UTF-8
])
def test_an_attribute_protobuf_refuses_refuses_the_request(attribute):
    body = _body(IDS + _field(0x4A, attribute))
    with pytest.raises(Exception):
        ExportTraceServiceRequest.FromString(body)
    with pytest.raises(otlp_decode.RequestRejected):
        otlp_columns.request_to_tables(otlp_decode.parse_outline(body), body, 123)
