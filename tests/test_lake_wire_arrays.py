"""The promoted token arrays decoded from their elements' wire bytes (``otlp_columns``) give the rows the Python path gives.

The oracle is the per-span Python conversion the lake keeps for every other value:
``promoted_columns(key_values(span.attributes))``. Random spans carry the three promoted keys with
every shape a sender may put there: clean token ids and logprobs (the fast path), values out of the
token id range, negatives, bools, nulls, strings, doubles among ints, ints among doubles, nested
arrays, maps, JSON text, empty arrays, repeated keys, and unknown fields inside an element. Each
row's attributes JSON and its three array columns must be the same either way.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lightning_core import semconv
from lightning_core.ingest import span_rows
from lightning_core.store import span_schema
from lightning_core.ingest.span_rows import SpanDataError, key_values, promoted_columns
from lightning_core.ingest.tables import request_to_tables
from tests.otlp_factory import export_request, set_value

ARRAY_KEYS = [semconv.PROMPT_TOKEN_IDS, semconv.RESPONSE_TOKEN_IDS, semconv.RESPONSE_LOGPROBS]
COLUMNS = {semconv.PROMPT_TOKEN_IDS: "prompt_token_ids", semconv.RESPONSE_TOKEN_IDS: "response_token_ids",
           semconv.RESPONSE_LOGPROBS: "response_logprobs"}

token_ids = st.lists(st.integers(0, 2**31 - 1), max_size=50)
logprobs = st.lists(st.floats(allow_nan=True, allow_infinity=True), max_size=50)
odd_element = st.one_of(
    st.integers(-(2**63), 2**63 - 1), st.just(2**31), st.just(-1), st.booleans(), st.none(), st.text(max_size=5),
    st.floats(allow_nan=True), st.lists(st.integers(0, 9), max_size=2), st.dictionaries(st.text(max_size=3), st.integers(0, 9), max_size=2),
)
odd_array = st.tuples(st.one_of(token_ids, logprobs), odd_element, st.integers(0, 50)).map(
    lambda t: t[0][: t[2]] + [t[1]] + t[0][t[2]:]
)
array_values = st.one_of(
    token_ids, token_ids, logprobs, logprobs, odd_array,
    st.just([]), st.integers(0, 10), st.text(max_size=10), st.just("[1, 2, 3]"), st.just('[0.5, "x"]'),
    st.dictionaries(st.text(max_size=3), st.integers(0, 9), max_size=2),
)
other_values = st.one_of(st.text(max_size=10), st.integers(-5, 5), st.floats(allow_nan=False), st.booleans())


@st.composite
def span_attributes(draw) -> list[tuple[str, object, bool]]:
    """(key, value, unknown-field marker) in send order; keys may repeat."""
    keys = draw(st.lists(st.sampled_from(ARRAY_KEYS + ["agent.name", "gen_ai.response.id", "x"]), max_size=7))
    return [(key, draw(array_values if key in COLUMNS else other_values), draw(st.integers(0, 9)) == 0) for key in keys]


def _request(spans: list[list[tuple[str, object, bool]]]):
    request = export_request({"arclight.run_id": "wire", "arclight.epoch": 1}, len(spans))
    for span, attributes in zip(request.resource_spans[0].scope_spans[0].spans, spans):
        for key, value, unknown in attributes:
            kv = span.attributes.add()
            kv.key = key
            set_value(kv.value, value)
            if unknown and kv.value.array_value.values:  # an element with a field this OTLP version does not know
                element = kv.value.array_value.values[0]
                element.MergeFromString(element.SerializeToString() + b"\xf8\x06\x01")  # field 111, varint 1
    return request


def _same_number(x, y) -> bool:
    if x is None or y is None:
        return x is y
    if math.isnan(x):
        return math.isnan(y)
    return x == y and math.copysign(1, x) == math.copysign(1, y)


def _same(a, b) -> bool:
    if a is None or b is None:
        return a is b
    return len(a) == len(b) and all(_same_number(x, y) for x, y in zip(a, b))


@settings(max_examples=300, deadline=None)
@given(spans=st.lists(span_attributes(), min_size=1, max_size=6))
def test_decoded_arrays_store_what_the_python_path_stores(spans):
    request = _request(spans)
    expected = []
    for span in request.resource_spans[0].scope_spans[0].spans:
        try:
            expected.append(promoted_columns(key_values(span.attributes)))
        except SpanDataError:
            with pytest.raises(SpanDataError):
                request_to_tables(request)
            return
    [table] = request_to_tables(request).values()
    rows = table.to_pylist()
    assert len(rows) == len(expected)
    for row, want in zip(rows, expected):
        assert row["attributes"] == want["attributes"]
        for column in COLUMNS.values():
            assert _same(row[column], want[column]), (column, row[column], want[column])


def _python_spans(monkeypatch) -> list[int]:
    """Count the spans ``otlp_columns`` leaves to the Python path."""
    counted, python = [], span_rows.request_to_rows

    def counting(*args, only=None, **kwargs):
        counted.extend(only or [-1])
        return python(*args, only=only, **kwargs)

    monkeypatch.setattr(span_rows, "request_to_rows", counting)
    return counted


def test_a_gateway_request_takes_the_wire_path_and_keeps_every_value(monkeypatch):
    ids = [0, 1, 127, 128, 16383, 16384, 2**21, 2**28, 2**31 - 1]
    spans = [[(semconv.PROMPT_TOKEN_IDS, ids, False), (semconv.RESPONSE_TOKEN_IDS, ids[::-1], False),
              (semconv.RESPONSE_LOGPROBS, [-0.0, -1.5, float("-inf")], False), ("agent.name", "writer", False)]] * 3
    python = _python_spans(monkeypatch)
    [table] = request_to_tables(_request(spans)).values()
    assert python == []  # every array decoded from its wire bytes, none left to Python
    assert table["prompt_token_ids"].to_pylist() == [ids] * 3
    assert table["response_token_ids"].to_pylist() == [ids[::-1]] * 3
    assert table["response_logprobs"].to_pylist() == [[-0.0, -1.5, float("-inf")]] * 3
    assert table["attributes"].to_pylist() == ['{"agent.name":"writer"}'] * 3


def test_one_odd_array_goes_to_the_python_path_alone(monkeypatch):
    """A bad array among good ones: only its span goes to Python, where the array stays in the JSON."""
    python = _python_spans(monkeypatch)
    spans = [[(semconv.PROMPT_TOKEN_IDS, ids, False)] for ids in ([1, 2, 3], [4, -5, 6], [7])]
    [table] = request_to_tables(_request(spans)).values()
    assert python == [1]
    assert table["prompt_token_ids"].to_pylist() == [[1, 2, 3], None, [7]]
    assert table["attributes"].to_pylist() == ["{}", '{"arclight.llm.prompt_token_ids":[4,-5,6]}', "{}"]


def test_rows_with_python_lists_and_nulls_build_the_same_columns():
    """``rows_to_table`` takes list columns as numpy arrays, Python lists (null elements too) or None."""
    rows = [{"trace_id": "t", "prompt_token_ids": np.array([1, 2]), "response_logprobs": None},
            {"trace_id": "u", "prompt_token_ids": [3, None], "response_logprobs": np.array([0.5])}]
    table = span_rows.rows_to_table(rows)
    assert table.schema == span_schema.SPAN_SCHEMA
    assert table["prompt_token_ids"].to_pylist() == [[1, 2], [3, None]]
    assert table["response_logprobs"].to_pylist() == [None, [0.5]]
    assert table["response_token_ids"].to_pylist() == [None, None]
