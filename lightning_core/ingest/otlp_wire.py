"""An OTLP trace request's spans and attributes read straight from its protobuf bytes, as flat columns.

The collector parses a request's outline with protobuf (upb) first (``otlp_decode.parse_outline``: every
field down to the spans is checked, their attributes, events and links are left as bytes). What the
columnar conversion (``otlp_columns``) needs of the spans is then read from the same bytes by compiled
code (numba): per span its ids, name, kind, times, status and how many events and links it has; per
attribute its key and its value (the ``AnyValue`` member set, with arrays and maps kept as their encoded
payload). Nothing is built per span or per attribute in Python. The bytes are walked twice: the first
walk counts, the second fills arrays of exactly that size. Token ids and logprobs are decoded from their
arrays' payloads by compiled loops too (``token_ids``, ``logprobs``).

Protobuf's rules are kept: fields in any order, unknown fields skipped, the last value of a scalar field
wins, and a message field that comes twice is merged (field by field, which is what the walk does). What
this reader does not take as protobuf would -- an attribute that is not a well-formed ``KeyValue``, a value
of an ``AnyValue`` member it does not know (``string_value_strindex``), an array or map value that comes
twice (protobuf concatenates them) -- marks the span ``odd``: the Python path converts it (and refuses the
request when protobuf does). ``decode`` returns None for invalid UTF-8 in a key or a string value, and for
bytes that are not the protobuf the outline parse took; the Python path then parses the request whole.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numba
import numpy as np
import pyarrow as pa

from lightning_core.store.span_schema import TOKEN_ID_RANGE

# the AnyValue member a pair holds (the columns of ``values``): its field number in AnyValue
STRING, BOOL, INT, DOUBLE, ARRAY, KVLIST, BYTES = 1, 2, 3, 4, 5, 6, 7
_VARINT, _I64, _LEN = 0, 1, 2  # wire types
_NONE = np.uint8(0)


@numba.njit(cache=True, nogil=True)
def _varint(buf, pos, end):
    """The varint at ``pos`` and the position after it; position -1 when it runs past ``end`` or 10 bytes."""
    if pos < end and buf[pos] < 0x80:  # most tags and lengths
        return np.uint64(buf[pos]), pos + 1
    value = np.uint64(0)
    shift = np.uint64(0)
    for _ in range(10):
        if pos >= end:
            return value, -1
        byte = buf[pos]
        pos += 1
        value |= np.uint64(byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += np.uint64(7)
    return value, -1


@numba.njit(cache=True, nogil=True)
def _skip(buf, pos, end, wire):
    """The position after a field's value of wire type ``wire`` at ``pos`` (a group up to its end tag); -1 when it
    does not fit or is not protobuf."""
    depth = 0
    while True:
        if wire == 0:
            _, pos = _varint(buf, pos, end)
        elif wire == 1:
            pos = pos + 8 if pos + 8 <= end else -1
        elif wire == 5:
            pos = pos + 4 if pos + 4 <= end else -1
        elif wire == 2:
            length, pos = _varint(buf, pos, end)
            if pos >= 0:
                pos = pos + np.int64(length) if length <= np.uint64(end - pos) else -1
        elif wire == 3:
            depth += 1
        elif wire == 4 and depth > 0:
            depth -= 1
        else:
            return -1
        if pos < 0 or depth == 0:
            return pos
        tag, pos = _varint(buf, pos, end)
        if pos < 0:
            return -1
        wire = tag & np.uint64(7)


@numba.njit(cache=True, nogil=True)
def _fixed64(buf, pos):
    value = np.uint64(0)
    for k in range(8):
        value |= np.uint64(buf[pos + k]) << np.uint64(8 * k)
    return value


@numba.njit(cache=True, nogil=True)
def _field(buf, pos, end):
    """The field at ``pos``: its number, its wire type, where its value starts, the position after it (a
    length-delimited field's value is ``buf[start:after]``) and a varint's or a fixed64's bits; ``after`` is -1
    when the field does not fit."""
    tag, pos = _varint(buf, pos, end)
    if pos < 0:
        return 0, 0, -1, -1, np.uint64(0)
    field, wire = np.int64(tag >> np.uint64(3)), np.int64(tag & np.uint64(7))
    if wire == _LEN:
        start, after = _length(buf, pos, end)
        return field, wire, start, after, np.uint64(0)
    if wire == _VARINT:
        bits, after = _varint(buf, pos, end)
        return field, wire, pos, after, bits
    if wire == _I64 and pos + 8 <= end:
        return field, wire, pos, pos + 8, _fixed64(buf, pos)
    return field, wire, pos, _skip(buf, pos, end, wire), np.uint64(0)


@numba.njit(cache=True, nogil=True)
def _value(buf, pos, end, pair, v_type, v_start, v_end, v_bits):
    """Read one ``AnyValue`` (``buf[pos:end]``) into the pair's columns (merged into what a value that came
    before left there); False where the columnar path cannot take it."""
    # (reads its fields itself, as ``_key_value`` does, rather than through ``_field``: these two run for every
    # attribute, and through ``_field`` a pair of benchmark requests decoded in 3.38 instead of 3.14 ms)
    while pos < end:
        tag, pos = _varint(buf, pos, end)
        if pos < 0:
            return False
        field, wire = tag >> np.uint64(3), tag & np.uint64(7)
        if field == STRING or field == ARRAY or field == KVLIST or field == BYTES:
            if wire != _LEN:
                return False
            length, start = _varint(buf, pos, end)
            if start < 0 or length > np.uint64(end - start):
                return False
            if (field == ARRAY or field == KVLIST) and v_type[pair] == field:
                return False  # protobuf merges a repeated list or map: the Python path does
            pos = start + np.int64(length)
            v_start[pair], v_end[pair] = start, pos
        elif field == BOOL or field == INT:
            if wire != _VARINT:
                return False
            bits, pos = _varint(buf, pos, end)
            if pos < 0:
                return False
            v_bits[pair] = bits if field == INT else np.uint64(bits != 0)
        elif field == DOUBLE:
            if wire != _I64 or pos + 8 > end:
                return False
            v_bits[pair] = _fixed64(buf, pos)
            pos += 8
        else:
            return False  # a member this path does not know (string_value_strindex) or an unknown field
        v_type[pair] = field
    return True


@numba.njit(cache=True, nogil=True)
def _key_value(buf, pos, end, pair, k_start, k_end, v_type, v_start, v_end, v_bits):
    """Read one ``KeyValue`` into the pair's columns; False where the columnar path cannot take it."""
    while pos < end:
        tag, pos = _varint(buf, pos, end)
        if pos < 0:
            return False
        field, wire = tag >> np.uint64(3), tag & np.uint64(7)
        if field == 1 or field == 2:
            if wire != _LEN:
                return False
            length, pos = _varint(buf, pos, end)
            if pos < 0 or length > np.uint64(end - pos):
                return False
            stop = pos + np.int64(length)
            if field == 1:
                k_start[pair], k_end[pair] = pos, stop
            elif not _value(buf, pos, stop, pair, v_type, v_start, v_end, v_bits):
                return False
            pos = stop
        elif wire == 3 or wire == 4:
            return False  # a group in an attribute: protobuf's own parse decides
        else:
            pos = _skip(buf, pos, end, wire)  # key_strindex and newer fields: protobuf's Python path ignores them too
            if pos < 0:
                return False
    return True


@numba.njit(cache=True, nogil=True)
def _length(buf, pos, end):
    """A length-delimited field's payload at ``pos``: its start and end, (-1, -1) when it does not fit."""
    length, pos = _varint(buf, pos, end)
    if pos < 0 or length > np.uint64(end - pos):
        return -1, -1
    return pos, pos + np.int64(length)


@numba.njit(cache=True, nogil=True)
def _enum(value):
    """An enum's int32 value from its varint (a negative one is sign-extended to 10 bytes)."""
    return np.int64(np.int32(np.uint32(value & np.uint64(0xFFFFFFFF))))


@numba.njit(cache=True, nogil=True)
def _status(buf, pos, end, sp_bytes, sp_num, s):
    """Read a span's ``Status``: its message (2) into ``sp_bytes[s, 8:10]``, its code (3) into ``sp_num[s, 3]``."""
    while pos < end:
        field, wire, start, pos, bits = _field(buf, pos, end)
        if pos < 0:
            return False
        if field == 2 and wire == _LEN:
            sp_bytes[s, 8], sp_bytes[s, 9] = start, pos
        elif field == 3 and wire == _VARINT:
            sp_num[s, 3] = _enum(bits)
    return True


@numba.njit(cache=True, nogil=True)
def _span(buf, pos, end, fill, s, pair, sp_bytes, sp_num, sp_odd, k_start, k_end, v_type, v_start, v_end, v_bits):
    """Read one span (``buf[pos:end]``); return the next pair's index, -1 when the span does not fit."""
    while pos < end:
        field, wire, start, pos, bits = _field(buf, pos, end)
        if pos < 0:
            return -1
        if field == 9 and wire == _LEN:  # attributes
            if fill:
                v_type[pair] = _NONE
                k_start[pair], k_end[pair] = 0, 0
                v_start[pair], v_end[pair], v_bits[pair] = 0, 0, np.uint64(0)
                if not _key_value(buf, start, pos, pair, k_start, k_end, v_type, v_start, v_end, v_bits):
                    sp_odd[s] = True
            pair += 1
        elif not fill:
            continue
        elif wire == _LEN and (field == 1 or field == 2 or field == 4 or field == 5):
            slot = 0 if field == 1 else 1 if field == 2 else 2 if field == 4 else 3  # trace, span, parent ids; name
            sp_bytes[s, 2 * slot], sp_bytes[s, 2 * slot + 1] = start, pos
        elif field == 11 and wire == _LEN:
            sp_num[s, 4] += 1  # events
        elif field == 13 and wire == _LEN:
            sp_num[s, 5] += 1  # links
        elif field == 15 and wire == _LEN:
            if not _status(buf, start, pos, sp_bytes, sp_num, s):
                return -1
        elif field == 6 and wire == _VARINT:
            sp_num[s, 0] = _enum(bits)  # kind
        elif (field == 7 or field == 8) and wire == _I64:  # start and end times
            sp_num[s, 1 if field == 7 else 2] = np.int64(bits)
    return pair


@numba.njit(cache=True, nogil=True)
def _scope(buf, pos, end, sc_bytes, sc):
    """Read an ``InstrumentationScope``: its name (1) and version (2) into ``sc_bytes[sc]``."""
    while pos < end:
        field, wire, start, pos, _ = _field(buf, pos, end)
        if pos < 0:
            return False
        if (field == 1 or field == 2) and wire == _LEN:
            col = 0 if field == 1 else 2
            sc_bytes[sc, col], sc_bytes[sc, col + 1] = start, pos
    return True


@numba.njit(cache=True, nogil=True)
def _walk(buf, fill, counts, rs_scopes, sc_spans, sc_bytes, sp_bytes, sp_num, sp_odd, sp_pairs,
          k_start, k_end, v_type, v_start, v_end, v_bits):
    """Walk the request: count resources, scopes, spans and attributes (``fill`` False, into ``counts``), or fill
    the columns sized by those counts. False when the request is not the protobuf the outline parse took."""
    r = sc = s = pair = 0
    pos, end = 0, len(buf)
    while pos < end:  # ExportTraceServiceRequest: resource_spans (1)
        field, wire, r_pos, pos, _ = _field(buf, pos, end)
        if pos < 0:
            return False
        if field != 1 or wire != _LEN:
            continue
        while r_pos < pos:  # ResourceSpans: scope_spans (2)
            field, wire, sc_pos, r_pos, _ = _field(buf, r_pos, pos)
            if r_pos < 0:
                return False
            if field != 2 or wire != _LEN:
                continue
            while sc_pos < r_pos:  # ScopeSpans: scope (1), spans (2)
                field, wire, start, sc_pos, _ = _field(buf, sc_pos, r_pos)
                if sc_pos < 0:
                    return False
                if wire != _LEN:
                    continue
                if field == 1 and fill and not _scope(buf, start, sc_pos, sc_bytes, sc):
                    return False
                if field == 2:
                    if fill:
                        sc_spans[sc] += 1
                        sp_pairs[s] = pair
                    pair = _span(buf, start, sc_pos, fill, s, pair, sp_bytes, sp_num, sp_odd,
                                 k_start, k_end, v_type, v_start, v_end, v_bits)
                    if pair < 0:
                        return False
                    s += 1
            if fill:
                rs_scopes[r] += 1
            sc += 1
        r += 1
    if fill:
        sp_pairs[s] = pair
    else:
        counts[0], counts[1], counts[2], counts[3] = r, sc, s, pair
    return True


@numba.njit(cache=True, nogil=True)
def _gather(buf, starts, ends, offsets, data):
    """Copy ``buf[starts[i]:ends[i]]`` one after the other into ``data`` (``offsets`` precomputed)."""
    for i in range(len(starts)):
        data[offsets[i] : offsets[i + 1]] = buf[starts[i] : ends[i]]


@numba.njit(cache=True, nogil=True)
def _token_ids(buf, starts, ends, max_value, out, counts, ok):
    """Decode the arrays ``buf[starts[i]:ends[i]]`` (``ArrayValue`` payloads) whose every element is exactly
    ``0x0a L 0x18 <varint>`` (a one-byte length, then an ``AnyValue`` holding only ``int_value``, a varint of 1-5
    bytes up to ``max_value``) into ``out``; ``counts`` and ``ok`` per array. Return the values written."""
    n = 0
    for a in range(len(starts)):
        pos, end, first = starts[a], ends[a], n
        good = True
        while pos < end:
            if pos + 3 > end or buf[pos] != 0x0A or buf[pos + 2] != 0x18 or buf[pos + 1] < 2 or buf[pos + 1] > 6:
                good = False
                break
            stop = pos + 2 + np.int64(buf[pos + 1])
            if stop > end:
                good = False
                break
            value = np.uint64(0)
            shift = np.uint64(0)
            for k in range(pos + 3, stop - 1):
                if buf[k] < 0x80:
                    good = False
                value |= np.uint64(buf[k] & 0x7F) << shift
                shift += np.uint64(7)
            if not good or buf[stop - 1] >= 0x80:
                good = False
                break
            value |= np.uint64(buf[stop - 1]) << shift
            if value > max_value:
                good = False
                break
            out[n] = np.int64(value)
            n += 1
            pos = stop
        if good:
            counts[a], ok[a] = n - first, True
        else:
            n, counts[a], ok[a] = first, 0, False
    return n


@numba.njit(cache=True, nogil=True)
def _logprobs(buf, starts, ends, out, counts, ok):
    """Decode the arrays whose every element is exactly ``0x0a 0x09 0x21`` and a double's 8 bytes (``out`` gets
    their bits); ``counts`` and ``ok`` per array. Return the values written."""
    n = 0
    for a in range(len(starts)):
        pos, end, first = starts[a], ends[a], n
        good = (end - pos) % 11 == 0
        while good and pos < end:
            if buf[pos] != 0x0A or buf[pos + 1] != 0x09 or buf[pos + 2] != 0x21:
                good = False
                break
            out[n] = _fixed64(buf, pos + 3)
            n += 1
            pos += 11
        if good:
            counts[a], ok[a] = n - first, True
        else:
            n, counts[a], ok[a] = first, 0, False
    return n


def token_ids(wire: "Wire", pairs: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The token ids of the array values of ``pairs``: the values of the arrays that decoded (in order), each
    array's length, and which did (the others are left to the Python path)."""
    return token_ids_at(wire.buf, wire.value_start[pairs], wire.value_end[pairs])


def token_ids_at(buf: np.ndarray, starts: np.ndarray, ends: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``token_ids`` of the ``ArrayValue`` payloads ``buf[starts[i]:ends[i]]`` (``_token_ids``)."""
    out = np.empty(int((ends - starts).sum()) // 4, np.int64)
    counts, ok = np.zeros(len(starts), np.int64), np.zeros(len(starts), np.bool_)
    n = _token_ids(buf, starts, ends, np.uint64(TOKEN_ID_RANGE[1]), out, counts, ok)
    return out[:n], counts, ok


def logprobs(wire: "Wire", pairs: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``token_ids`` for arrays of doubles (``_logprobs``)."""
    starts, ends = wire.value_start[pairs], wire.value_end[pairs]
    out = np.empty(int((ends - starts).sum()) // 11, np.uint64)
    counts, ok = np.zeros(len(pairs), np.int64), np.zeros(len(pairs), np.bool_)
    n = _logprobs(wire.buf, starts, ends, out, counts, ok)
    return out[:n].view(np.float64), counts, ok


@dataclass
class Wire:
    """The spans of a request, as columns (one row per span, per scope, per resource or per attribute)."""

    buf: np.ndarray  # the request's bytes (uint8), which ``value_start`` and ``value_end`` index
    scopes_per_resource: np.ndarray
    spans_per_scope: np.ndarray
    scope_name: pa.Array  # string
    scope_version: pa.Array  # string
    trace_id: pa.Array  # binary
    span_id: pa.Array
    parent_span_id: pa.Array
    name: pa.Array  # string
    kind: np.ndarray  # int64 (the enum's int32 value)
    start: np.ndarray  # uint64
    end: np.ndarray
    status_code: np.ndarray  # int64 (the enum's int32 value); 0 without a status
    status_message: pa.Array  # string
    events: np.ndarray  # events per span
    links: np.ndarray
    odd: np.ndarray  # spans whose attributes the Python path must convert
    pairs_per_span: np.ndarray
    key: pa.Array  # string, per attribute
    value_type: np.ndarray  # the AnyValue member (STRING ...), 0 for none
    value_start: np.ndarray  # a string's, a bytes value's, or an array's or map's encoded payload: buf[start:end]
    value_end: np.ndarray
    value_bits: np.ndarray  # uint64: an int, a bool (0/1) or a double's bits
    _built: dict = field(default_factory=dict, repr=False)

    def values(self, member: int) -> pa.Array:
        """The pairs' values of one ``AnyValue`` member, NULL for the pairs that hold another (a string or bytes
        member as a string or binary array; array and map members as their payload's bytes); built once."""
        if member not in self._built:
            self._built[member] = self._values(member)
        return self._built[member]

    def _values(self, member: int) -> pa.Array:
        absent = self.value_type != member
        if member == INT:
            return pa.array(self.value_bits.view(np.int64), mask=absent)
        if member == DOUBLE:
            return pa.array(self.value_bits.view(np.float64), mask=absent)
        if member == BOOL:
            return pa.array(self.value_bits != 0, mask=absent)
        starts, ends = self.value_start.copy(), self.value_end.copy()
        ends[absent] = starts[absent]
        array = _Binary(self.buf).binary(starts, ends, pa.string() if member == STRING else pa.binary())
        return pa.Array.from_buffers(array.type, len(array), [pa.array(~absent).buffers()[1], *array.buffers()[1:]])


def decode(body: bytes) -> Wire | None:
    """The spans of the protobuf request ``body`` (whose outline protobuf parsed); None when it is not protobuf
    this reader takes whole, or a key or a string value is not valid UTF-8 (protobuf refuses that)."""
    buf = np.frombuffer(body, np.uint8)
    counts = np.zeros(4, np.int64)
    empty = np.zeros(0, np.int64)
    if not _walk(buf, False, counts, empty, empty, empty.reshape(0, 4), empty.reshape(0, 10), empty.reshape(0, 6),
                 np.zeros(0, np.bool_), empty, empty, empty, np.zeros(0, np.uint8), empty, empty, np.zeros(0, np.uint64)):
        return None
    n_resources, n_scopes, n_spans, n_pairs = (int(c) for c in counts)
    rs_scopes, sc_spans = np.zeros(n_resources, np.int64), np.zeros(n_scopes, np.int64)
    sc_bytes, sp_bytes = np.zeros((n_scopes, 4), np.int64), np.zeros((n_spans, 10), np.int64)
    sp_num, sp_odd, sp_pairs = np.zeros((n_spans, 6), np.int64), np.zeros(n_spans, np.bool_), np.zeros(n_spans + 1, np.int64)
    k_start, k_end = np.empty(n_pairs, np.int64), np.empty(n_pairs, np.int64)
    v_type, v_start, v_end, v_bits = (np.empty(n_pairs, np.uint8), np.empty(n_pairs, np.int64), np.empty(n_pairs, np.int64),
                                      np.empty(n_pairs, np.uint64))
    if not _walk(buf, True, counts, rs_scopes, sc_spans, sc_bytes, sp_bytes, sp_num, sp_odd, sp_pairs,
                 k_start, k_end, v_type, v_start, v_end, v_bits):
        return None
    binary = _Binary(buf)
    try:
        strings = [binary.strings(sc_bytes[:, 0], sc_bytes[:, 1]), binary.strings(sc_bytes[:, 2], sc_bytes[:, 3]),
                   binary.strings(sp_bytes[:, 6], sp_bytes[:, 7]), binary.strings(sp_bytes[:, 8], sp_bytes[:, 9]),
                   binary.strings(k_start, k_end)]
    except pa.ArrowInvalid:
        return None
    wire = Wire(buf, rs_scopes, sc_spans, strings[0], strings[1],
                binary.binary(sp_bytes[:, 0], sp_bytes[:, 1]), binary.binary(sp_bytes[:, 2], sp_bytes[:, 3]),
                binary.binary(sp_bytes[:, 4], sp_bytes[:, 5]), strings[2],
                sp_num[:, 0], sp_num[:, 1].view(np.uint64), sp_num[:, 2].view(np.uint64), sp_num[:, 3], strings[3],
                sp_num[:, 4], sp_num[:, 5], sp_odd, np.diff(sp_pairs), strings[4], v_type, v_start, v_end, v_bits)
    try:
        wire.values(STRING).validate(full=True)  # the string values are UTF-8
    except pa.ArrowInvalid:
        return None
    return wire


class _Binary:
    """Arrow arrays of pieces of one buffer."""

    def __init__(self, buf: np.ndarray):
        self.buf = buf

    def binary(self, starts: np.ndarray, ends: np.ndarray, type_: pa.DataType = pa.binary()) -> pa.Array:
        offsets = np.zeros(len(starts) + 1, np.int64)
        np.cumsum(ends - starts, out=offsets[1:])
        data = np.empty(offsets[-1], np.uint8)
        _gather(self.buf, starts, ends, offsets, data)
        if offsets[-1] >= 2**31:
            type_ = pa.large_binary() if type_ == pa.binary() else pa.large_string()
            return pa.Array.from_buffers(type_, len(starts), [None, pa.py_buffer(offsets), pa.py_buffer(data)])
        return pa.Array.from_buffers(type_, len(starts), [None, pa.py_buffer(offsets.astype(np.int32)), pa.py_buffer(data)])

    def strings(self, starts: np.ndarray, ends: np.ndarray) -> pa.Array:
        """A string array, checked to be UTF-8 (``pa.ArrowInvalid`` when not)."""
        array = self.binary(starts, ends, pa.string())
        array.validate(full=True)
        return array


def warm_up() -> None:
    """Compile the loops (numba; seconds the first time, ~0.4 s from numba's cache after that) by reading a
    small request, so that no client's request waits for the compiler."""
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

    request = ExportTraceServiceRequest()
    scope = request.resource_spans.add().scope_spans.add()
    scope.scope.name = "warm-up"
    span = scope.spans.add(trace_id=b"\x01" * 16, span_id=b"\x02" * 8, name="s", kind=1)
    span.status.code = 1
    ids, logprobs_ = span.attributes.add(key="ids"), span.attributes.add(key="logprobs")
    ids.value.array_value.values.add().int_value = 1
    logprobs_.value.array_value.values.add().double_value = -0.5
    span.attributes.add(key="s").value.string_value = "x"
    wire = decode(request.SerializeToString())
    token_ids(wire, np.array([0]))
    logprobs(wire, np.array([1]))
