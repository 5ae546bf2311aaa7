"""Columnar conversion of an OTLP export request into span tables, with no Python loop per span.

``span_rows.request_to_rows`` converts span by span and attribute by attribute in Python, which cost the
collector ~25 ms per request of 1,050 spans (a dict per row, an ``AnyValue`` per attribute, one
JSON text per span). Here the spans and their attributes are read from the request's protobuf bytes as
flat columns by compiled code (``otlp_wire``, numba), and every column of ``span_schema.SPAN_SCHEMA`` is
computed for all spans at once with Arrow compute and numpy: hex ids from a lookup table, the attributes
JSON joined from per-attribute fragments, token ids and logprobs decoded from their arrays' encoded bytes
(compiled too). The collector hands in only the request's outline (``otlp_decode.parse_outline``: the
spans' attributes, events and links left as bytes); the Python path, and the events and links it writes,
parse the whole request on first use.

The rows are the Python path's, byte for byte (``tests/test_otlp_columns.py`` checks random
requests against it). A span this path does not convert the same way -- repeated keys, a value
nested in an array or a map, a promoted key of another type, an out-of-range enum -- is converted
by the Python path (``span_rows.request_to_rows(..., only=...)``) and put back in its place, so an odd
span costs only itself; so are the events and links of the few spans that have them. Ids, times and
resource attributes are checked as before; a request that fails a check is converted by the Python
path, which raises the same error.
"""

from __future__ import annotations

import functools
from typing import Callable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from google.protobuf.message import Message

from lightning_core.ingest import otlp_decode, otlp_wire, span_rows
from lightning_core.store import span_schema
from lightning_core import semconv

_HEX = np.array([[ord(c) for c in f"{i:02x}"] for i in range(256)], np.uint8).view("<u2").ravel()  # byte -> its two hex digits
_DAY_NS = 86_400 * 10**9
_MAX_TIME_NS = span_rows.MAX_TIME_NS
_KIND_NAMES = pa.array([span_rows.KIND_NAMES[i] for i in range(len(span_rows.KIND_NAMES))])
_STATUS_NAMES = pa.array([span_rows.STATUS_NAMES[i] for i in range(len(span_rows.STATUS_NAMES))])
_COUNT_CELLS = 4_000_000  # spans x distinct keys up to which repeated keys are found by counting


def request_to_tables(request: Message, body: bytes, received_ns: int) -> dict[span_schema.Partition, pa.Table]:
    """The span tables of ``request`` (parsed from ``body``, whole or as ``otlp_decode.parse_outline``'s outline)
    by partition, as ``span_rows.request_to_rows`` gives them."""
    whole = functools.cache(lambda: otlp_decode.whole_request(request, body))  # for the Python path, parsed once
    wire = otlp_wire.decode(body)
    if wire is None or len(wire.scopes_per_resource) != len(request.resource_spans):
        return _python(whole(), received_ns)  # protobuf parses it whole: it refuses the request or Python converts it
    n = len(wire.kind)
    if n == 0:
        return {}
    # which resource and scope each span belongs to
    scope_of_span = np.repeat(np.arange(len(wire.spans_per_scope)), wire.spans_per_scope)
    resource_of_scope = np.repeat(np.arange(len(wire.scopes_per_resource)), wire.scopes_per_resource)
    resource_of_span = resource_of_scope[scope_of_span]

    trace_id, span_id, parent_id = wire.trace_id, wire.span_id, wire.parent_span_id
    start, end = wire.start, wire.end
    if not (
        (_widths(trace_id) == 16).all() and (_widths(span_id) == 8).all() and np.isin(_widths(parent_id), (0, 8)).all()
        and (start <= _MAX_TIME_NS).all() and (end <= _MAX_TIME_NS).all()
    ):
        return _python(whole(), received_ns)  # raises the Python path's error for the first bad span
    trace_bytes, span_bytes = _fixed(trace_id, 16), _fixed(span_id, 8)
    if not (trace_bytes.any(axis=1).all() and span_bytes.any(axis=1).all()):
        return _python(whole(), received_ns)

    # the rollout context of every resource, as the Python path reads it (a bad value raises there)
    contexts = [span_rows.resource_context(rs) for rs in request.resource_spans]
    slow = wire.odd.copy()  # spans the Python path converts
    kind, status_code, status_message = _enums(wire, slow)
    attributes = _Attributes(wire, n)
    columns: dict[str, pa.Array] = {
        "trace_id": _hex(trace_bytes),
        "span_id": _hex(span_bytes),
        "parent_id": _parent_hex(parent_id, n),
        "name": wire.name,
        "kind": kind,
        "start_ns": pa.array(start.astype(np.int64)),
        "end_ns": pa.array(end.astype(np.int64)),
        "status_code": status_code,
        "status_message": status_message,
        **_events_and_links(whole, wire, n),
    }
    scope_names, scope_versions = wire.scope_name, wire.scope_version
    columns["resource"] = _per_span([c["resource_json"] for c in contexts], resource_of_span)
    columns["scope_name"] = pc.take(_empty_to_null(scope_names), pa.array(scope_of_span))
    columns["scope_version"] = pc.take(_empty_to_null(scope_versions), pa.array(scope_of_span))
    columns["service_name"] = _per_span([c["service_name"] for c in contexts], resource_of_span)
    for column, key in (("rollout_id", semconv.ROLLOUT_ID), ("task_id", semconv.TASK_ID)):
        from_resource = _per_span([c[column] or None for c in contexts], resource_of_span)
        columns[column] = pc.coalesce(from_resource, attributes.string(key))
    resource_attempt = [c["attempt"] for c in contexts]
    # a span's own arclight.attempt counts only where the resource has none: the Python path reads it
    slow |= attributes.present(semconv.ATTEMPT) & np.array([a is None for a in resource_attempt], bool)[resource_of_span]
    columns["attempt"] = _per_span(resource_attempt, resource_of_span, pa.int64())
    columns["received_ns"] = pa.repeat(pa.scalar(received_ns, pa.int64()), n)
    for key, column in span_schema.PROMOTED_STRINGS.items():
        columns[column] = attributes.string(key)
    columns["reward_value"] = attributes.reward()
    for key, (column, element, _) in span_schema.PROMOTED_ARRAYS.items():
        columns[column] = attributes.array(key, element)
    columns["attributes"] = attributes.json()  # after the arrays: the ones stored in columns leave the JSON
    slow |= attributes.slow

    table = pa.Table.from_arrays([columns[f.name] for f in span_schema.SPAN_SCHEMA], schema=span_schema.SPAN_SCHEMA)
    partitions = _partitions(contexts, resource_of_span, start)
    if slow.any():
        table, partitions = _merge_python(whole(), received_ns, table, partitions, slow)
    return _split(table, partitions)


class _Attributes:
    """The spans' attributes as columns: one row per key-value pair, with the span it belongs to."""

    def __init__(self, wire: otlp_wire.Wire, n_spans: int):
        self.n, self.wire = n_spans, wire
        self.span = np.repeat(np.arange(n_spans), wire.pairs_per_span)
        self.keys = wire.key
        self.slow = np.zeros(n_spans, bool)  # spans these attributes send to the Python path (and ``wire.odd``)
        self._null = None
        self.removed = np.zeros(len(self.keys), bool)  # promoted arrays, stored in their own columns
        encoded = pc.dictionary_encode(self.keys)
        self.key_codes = _numpy(encoded.indices).astype(np.int64)
        self.key_names = encoded.dictionary.to_pylist()
        self._index = {key: i for i, key in enumerate(self.key_names)}
        # a repeated key keeps its first place and its last value (as in a dict): the Python path does that
        self.repeated = np.zeros(n_spans, bool)
        width = max(1, len(self.key_names))
        combined = self.span * width + self.key_codes
        if n_spans * width <= _COUNT_CELLS:  # a count per (span, key): one pass
            cells = np.flatnonzero(np.bincount(combined, minlength=n_spans * width) > 1)
            self.repeated[cells // width] = True
        elif len(np.unique(combined)) != len(combined):  # too many distinct keys for that: sort
            order = np.sort(combined)
            self.repeated[order[1:][order[1:] == order[:-1]] // width] = True
        self.slow |= self.repeated
        # nested values (lists and maps) other than the promoted arrays: the Python path
        nested = (wire.value_type == otlp_wire.ARRAY) | (wire.value_type == otlp_wire.KVLIST)
        promoted_codes = [self._index[k] for k in span_schema.PROMOTED_ARRAYS if k in self._index]
        nested &= ~np.isin(self.key_codes, promoted_codes)
        self.slow[self.span[nested]] = True

    def _pairs_of(self, key: str) -> np.ndarray:
        """The pairs holding ``key``, at most one per span (a span with a repeated key is converted in Python)."""
        code = self._index.get(key)
        if code is None:
            return np.empty(0, np.int64)
        pairs = np.flatnonzero(self.key_codes == code)
        return pairs[~self.repeated[self.span[pairs]]]

    def present(self, key: str) -> np.ndarray:
        """Spans that carry ``key``."""
        out = np.zeros(self.n, bool)
        out[self.span[self._pairs_of(key)]] = True
        return out

    def string(self, key: str) -> pa.Array:
        """``key``'s string value per span (NULL where absent or null); spans with another type go to Python."""
        pairs = self._pairs_of(key)
        if not len(pairs):
            return pa.nulls(self.n, pa.string())
        strings = self.wire.values(otlp_wire.STRING)
        other = _numpy(pc.take(strings, pa.array(pairs)).is_null()) & ~_numpy(pc.take(self._value_null(), pa.array(pairs)))
        self.slow[self.span[pairs[other]]] = True
        return pc.take(strings, self._per_span_index(pairs))

    def _per_span_index(self, pairs: np.ndarray) -> pa.Array:
        """An index into the pairs per span: the span's pair among ``pairs``, NULL for a span without one."""
        index = np.zeros(self.n, np.int64)
        index[self.span[pairs]] = pairs
        missing = np.ones(self.n, bool)
        missing[self.span[pairs]] = False
        return pa.array(index, mask=missing)

    def reward(self) -> pa.Array:
        """``arclight.reward.value`` (else Agent Lightning's) as a float; a string or a bool value goes to Python."""
        out = np.full(self.n, np.nan)
        valid = np.zeros(self.n, bool)
        done = np.zeros(self.n, bool)
        for key in (semconv.REWARD_VALUE, semconv.AGENTLIGHTNING_REWARD_0_VALUE):
            pairs = self._pairs_of(key)
            pairs = pairs[~done[self.span[pairs]]]
            if not len(pairs):
                continue
            take = pa.array(pairs)
            doubles = pc.take(self.wire.values(otlp_wire.DOUBLE), take)
            ints = pc.take(self.wire.values(otlp_wire.INT), take)
            is_double, is_int = ~_numpy(doubles.is_null()), ~_numpy(ints.is_null())
            other = ~is_double & ~is_int & ~_numpy(pc.take(self._value_null(), take))
            self.slow[self.span[pairs[other]]] = True
            spans = self.span[pairs]
            out[spans[is_double]] = _numpy(doubles.filter(pa.array(is_double)))
            out[spans[is_int]] = _numpy(ints.filter(pa.array(is_int))).astype(np.float64)
            valid[spans[is_double | is_int]] = True
            done[spans] = True
        return pa.array(out, pa.float64(), mask=~valid)

    def array(self, key: str, element: type) -> pa.Array:
        """The promoted array ``key`` per span, decoded from its ``ArrayValue`` bytes; other shapes go to Python."""
        pairs = self._pairs_of(key)
        value_type = pa.int64() if element is int else pa.float64()
        if not len(pairs):
            return pa.nulls(self.n, pa.list_(value_type))
        is_array = self.wire.value_type[pairs] == otlp_wire.ARRAY
        if not is_array.all():
            self.slow[self.span[pairs[~is_array]]] = True
            pairs = pairs[is_array]
        decode = otlp_wire.token_ids if element is int else otlp_wire.logprobs
        values, counts, ok = decode(self.wire, pairs)
        self.slow[self.span[pairs[~ok]]] = True
        self.removed[pairs[ok]] = True
        pairs, counts = pairs[ok], counts[ok]
        lengths = np.zeros(self.n, np.int64)
        lengths[self.span[pairs]] = counts
        # the pairs are in span order, one per span
        list_offsets = np.zeros(self.n + 1, np.int64)
        np.cumsum(lengths, out=list_offsets[1:])
        if list_offsets[-1] >= 2**31:
            raise span_rows.SpanDataError(f"the request's spans hold {list_offsets[-1]} array values, over the 2^31 one table "
                                     "can hold: send fewer spans per request")
        mask = np.ones(self.n, bool)
        mask[self.span[pairs]] = False
        return pa.ListArray.from_arrays(pa.array(list_offsets.astype(np.int32)), pa.array(values, value_type),
                                        type=pa.list_(value_type), mask=pa.array(mask))

    def _value_null(self) -> pa.Array:
        """Pairs whose value holds nothing (JSON null)."""
        if self._null is None:
            self._null = pa.array(self.wire.value_type == 0)
        return self._null

    def json(self) -> pa.Array:
        """The attributes JSON per span (without the promoted arrays), as ``json.dumps`` writes the dict."""
        n_pairs = len(self.keys)
        if n_pairs == 0:
            return pa.array(np.full(self.n, "{}", object), pa.string())
        keys = pa.array([span_rows.dumps_json(k) + ":" for k in self.key_names], pa.string())
        fragments_key = pc.take(keys, pa.array(self.key_codes))
        strings = self.wire.values(otlp_wire.STRING)
        escape = _needs_escape(strings)
        plain_strings = pc.binary_join_element_wise('"', pc.if_else(pa.array(~escape), strings, None), '"', "")
        ints = pc.cast(self.wire.values(otlp_wire.INT), pa.string())
        bools = pc.if_else(self.wire.values(otlp_wire.BOOL), "true", "false")
        # the rest, rare in one request, through json.dumps: strings with characters to escape, doubles
        # (Python writes 1.0, 1e-05, NaN), bytes (as hex text)
        others = np.full(n_pairs, None, object)
        escape = np.flatnonzero(escape)
        for i, value in zip(escape, pc.take(strings, pa.array(escape)).to_pylist()):
            others[i] = span_rows.dumps_json(value)
        doubles = self.wire.values(otlp_wire.DOUBLE)
        where = np.flatnonzero(~_numpy(doubles.is_null()))
        for i, value in zip(where, pc.take(doubles, pa.array(where)).to_pylist()):
            others[i] = span_rows.dumps_json(value)
        byte_values = self.wire.values(otlp_wire.BYTES)
        where = np.flatnonzero(~_numpy(byte_values.is_null()))
        for i, value in zip(where, pc.take(byte_values, pa.array(where)).to_pylist()):
            others[i] = span_rows.dumps_json(value.hex())
        values = pc.coalesce(plain_strings, ints, bools, pa.array(others, pa.string()), pa.scalar("null"))
        fragments = pc.binary_join_element_wise(fragments_key, values, "")
        kept = ~self.removed
        counts = np.bincount(self.span[kept], minlength=self.n)
        offsets = np.zeros(self.n + 1, np.int64)
        np.cumsum(counts, out=offsets[1:])
        per_span = pa.ListArray.from_arrays(pa.array(offsets.astype(np.int32)), fragments.filter(pa.array(kept)))
        return pc.binary_join_element_wise("{", pc.binary_join(per_span, ","), "}", "")


def _events_and_links(whole: Callable[[], Message], wire: otlp_wire.Wire, n: int) -> dict[str, pa.Array]:
    """The ``events`` and ``links`` JSON columns: "[]" for most spans, the few with some written by the Python path."""
    columns, span_objects = {}, None
    for column, write, counts in (("events", span_rows.events_json, wire.events), ("links", span_rows.links_json, wire.links)):
        having = np.flatnonzero(counts > 0)
        if not len(having):
            columns[column] = pa.repeat(pa.scalar("[]"), n)
            continue
        if span_objects is None:
            span_objects = [span for rs in whole().resource_spans for ss in rs.scope_spans for span in ss.spans]
        texts = np.full(n, "[]", object)
        for i in having:
            texts[i] = write(span_objects[i])
        columns[column] = pa.array(texts, pa.string())
    return columns


def _enums(wire: otlp_wire.Wire, slow: np.ndarray) -> tuple[pa.Array, pa.Array, pa.Array]:
    kinds, codes = wire.kind.copy(), wire.status_code.copy()
    odd = (kinds < 0) | (kinds >= len(_KIND_NAMES)) | (codes < 0) | (codes >= len(_STATUS_NAMES))
    slow |= odd
    kinds[odd], codes[odd] = 0, 0
    return pc.take(_KIND_NAMES, pa.array(kinds)), pc.take(_STATUS_NAMES, pa.array(codes)), _empty_to_null(wire.status_message)


def _partitions(contexts: list[dict], resource_of_span: np.ndarray, start: np.ndarray) -> np.ndarray:
    """Each span's partition, as a numpy object array: its resource's run and epoch, or its day (UTC)."""
    out = _objects([c["training"] for c in contexts])[resource_of_span]
    production = np.flatnonzero(np.array([c["training"] is None for c in contexts], bool)[resource_of_span])
    if len(production):
        ns = start[production].astype(np.int64)
        days, into_day = np.unique(ns // _DAY_NS, return_inverse=True)
        # one date per distinct day, from a span of that day away from midnight (the float seconds
        # ``span_rows.utc_date`` computes round the same way there); spans within a microsecond of midnight, or
        # at time 0 (dated now), each through ``span_rows.utc_date``
        edge = (ns == 0) | (ns % _DAY_NS < 1000) | (_DAY_NS - ns % _DAY_NS < 1000)
        per_day = _objects([span_schema.Partition(None, None, span_rows.utc_date(int(day * _DAY_NS + _DAY_NS // 2))) for day in days])
        out[production] = per_day[into_day]
        for i in np.flatnonzero(edge):
            out[production[i]] = span_schema.Partition(None, None, span_rows.utc_date(int(ns[i])))
    return out


def _merge_python(request, received_ns: int, table: pa.Table, partitions: np.ndarray, slow: np.ndarray):
    """Replace the rows of the ``slow`` spans by the Python path's rows, keeping span order."""
    indices = np.flatnonzero(slow)
    grouped = span_rows.request_to_rows(request, received_ns=received_ns, only=set(indices.tolist()))
    rows, row_partitions = [], []
    for partition, partition_rows in grouped.items():
        rows += partition_rows
        row_partitions += [partition] * len(partition_rows)
    order = np.argsort([row.pop("_index") for row in rows], kind="stable")
    python = span_rows.rows_to_table([rows[i] for i in order])
    fast = np.flatnonzero(~slow)
    combined = pa.concat_tables([table.take(pa.array(fast)), python])
    position = np.empty(len(slow), np.int64)
    position[fast] = np.arange(len(fast))
    position[indices] = len(fast) + np.arange(len(indices))
    merged_partitions = np.empty(len(slow), object)
    merged_partitions[fast] = partitions[fast]
    for target, i in zip(indices, order):
        merged_partitions[target] = row_partitions[i]
    return combined.take(pa.array(position)), merged_partitions


def _split(table: pa.Table, partitions: np.ndarray) -> dict[span_schema.Partition, pa.Table]:
    """One table per partition, partitions in the order their first span comes (as the Python path groups them)."""
    # most spans share a few Partition objects: group by object first, then merge equal objects
    _, first, inverse = np.unique(np.fromiter(map(id, partitions), np.int64, len(partitions)), return_index=True, return_inverse=True)
    codes: dict[span_schema.Partition, int] = {}
    for i in np.argsort(first):
        codes.setdefault(partitions[first[i]], len(codes))
    if len(codes) == 1:
        return {next(iter(codes)): table}
    code_of_object = np.array([codes[partitions[f]] for f in first], np.int64)
    index = code_of_object[inverse.reshape(-1)]
    return {p: table.take(pa.array(np.flatnonzero(index == code))) for p, code in codes.items()}


def _python(request, received_ns: int) -> dict[span_schema.Partition, pa.Table]:
    grouped = span_rows.request_to_rows(request, received_ns=received_ns)
    return {partition: span_rows.rows_to_table(rows) for partition, rows in grouped.items()}


# --- Arrow helpers


def _numpy(array: pa.Array) -> np.ndarray:
    return array.to_numpy(zero_copy_only=False)


def _offsets(binary: pa.Array) -> np.ndarray:
    large = pa.types.is_large_binary(binary.type) or pa.types.is_large_string(binary.type)
    offsets = np.frombuffer(binary.buffers()[1], np.int64 if large else np.int32)
    return offsets[binary.offset : binary.offset + len(binary) + 1].astype(np.int64)


def _widths(binary: pa.Array) -> np.ndarray:
    return np.diff(_offsets(binary))


def _fixed(binary: pa.Array, width: int) -> np.ndarray:
    """A binary array whose values are all ``width`` bytes, as an (n, width) uint8 array."""
    offsets = _offsets(binary)
    return _bytes(binary)[offsets[0] : offsets[-1]].reshape(-1, width)


def _bytes(binary: pa.Array) -> np.ndarray:
    """The data buffer of a binary array (indexed by ``_offsets``)."""
    buffer = binary.buffers()[2]
    return np.frombuffer(buffer, np.uint8) if buffer is not None else np.empty(0, np.uint8)


def _needs_escape(strings: pa.Array) -> np.ndarray:
    """Per string, whether it holds a character ``json.dumps(ensure_ascii=False)`` escapes: a control character,
    ``"`` or a backslash (never a byte of a multi-byte UTF-8 character). False for a null."""
    offsets = _offsets(strings)
    region = _bytes(strings)[offsets[0] : offsets[-1]]
    hits = np.flatnonzero((region < 0x20) | (region == 0x22) | (region == 0x5C)) + offsets[0]
    out = np.zeros(len(strings), bool)
    out[np.searchsorted(offsets, hits, side="right") - 1] = True
    return out


def _hex(ids: np.ndarray) -> pa.Array:
    n, width = ids.shape
    data = np.take(_HEX, ids).view(np.uint8).reshape(-1)  # 16x faster than indexing a (256, 2) table
    offsets = np.arange(0, n * 2 * width + 1, 2 * width, dtype=np.int32)
    return pa.StringArray.from_buffers(n, pa.py_buffer(offsets), pa.py_buffer(data))


def _parent_hex(parents: pa.Array, n: int) -> pa.Array:
    has = _widths(parents) == 8
    out = np.zeros((n, 8), np.uint8)
    data, offsets = _bytes(parents), _offsets(parents)
    if has.any():
        starts = offsets[:-1][has]
        out[has] = np.take(data, starts[:, None] + np.arange(8))
    valid = has & out.any(axis=1)  # an all-zero parent id means no parent
    hexed = _hex(out)
    return pc.if_else(pa.array(valid), hexed, pa.scalar(None, pa.string()))


def _objects(values: list) -> np.ndarray:
    out = np.empty(len(values), object)
    out[:] = values
    return out


def _per_span(values: list, index: np.ndarray, type_: pa.DataType = pa.string()) -> pa.Array:
    return pc.take(pa.array(values, type_), pa.array(index))


def _empty_to_null(strings: pa.Array) -> pa.Array:
    return pc.if_else(pc.equal(strings, ""), pa.scalar(None, pa.string()), strings)
