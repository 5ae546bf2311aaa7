"""Property-based fuzzing of a real collector with random OTLP ExportTraceServiceRequests (issue 15).

Random structures, ids, names, attribute types and values (nested, promoted keys, token ids out
of range), times, resource attributes (run ids and epochs of every type) and encodings
(protobuf or OTLP/JSON, gzip or not, lone surrogates in JSON). After every example:

- the collector answered 200 or a 4xx, never a 5xx, and still answers /healthz;
- an accepted request's spans are all stored, a refused one left nothing;
- ``SELECT * FROM spans`` still runs over the whole lake;
- nothing was written outside the lake, and nothing inside it outside the span layout.

``ARCLIGHT_FUZZ_EXAMPLES`` sets the number of examples (a few dozen here; ``make stress`` runs
thousands).
"""

from __future__ import annotations

import gzip
import itertools
import json
import os
import re
from pathlib import Path

import httpx
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

from lightning_core import semconv
from lightning_core.store.catalog import Catalog
from lightning_core.ingest.service import start_collector
from tests.conftest import make_config
from tests.otlp_factory import fill_attributes, otlp_json

EXAMPLES = int(os.environ.get("ARCLIGHT_FUZZ_EXAMPLES", "30"))
INT64 = st.integers(-(2**63), 2**63 - 1)
_examples = itertools.count()

# --- strategies: mostly plausible values, with hostile ones mixed in ----------------------------


def mostly(good, bad, *, odds: int = 5):
    """``bad`` about once in ``odds`` draws, else ``good``."""
    # hypothesis draws boundary integers far more often than 1/n: pick from a list with bad last
    return st.sampled_from(range(odds)).flatmap(lambda i: bad if i == odds - 1 else good)


names = mostly(
    st.from_regex(r"[A-Za-z0-9][A-Za-z0-9._-]{0,20}", fullmatch=True),
    st.one_of(st.sampled_from(["..", ".", "ok\n", "a/b", "../../etc", "_schema", "-x", "x" * 200, " ", "\x00", "é"]),
              st.text(max_size=12)), odds=8,
)
epochs = mostly(
    st.one_of(st.integers(0, 1000), st.sampled_from(["7", str(2**63 - 1)])),
    st.one_of(INT64, st.sampled_from([" 7 ", "9223372036854775808", "9" * 300, "-1", "007", "1e3"]),
              st.floats(allow_nan=True), st.booleans(), st.text(max_size=6)), odds=8,
)
scalars = st.one_of(st.booleans(), INT64, st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=30),
                    st.binary(max_size=12))
values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                       st.dictionaries(st.text(max_size=8), inner, max_size=4)), max_leaves=12)


@st.composite
def deep_values(draw):
    """A value nested 20 to 45 levels deep (the lake's limit is 32)."""
    value = draw(scalars)
    for _ in range(draw(st.integers(20, 45))):
        value = [value] if draw(st.booleans()) else {"k": value}
    return value


keys = st.one_of(st.sampled_from([semconv.PROMPT_TOKEN_IDS, semconv.RESPONSE_TOKEN_IDS, semconv.RESPONSE_LOGPROBS,
                                  semconv.REWARD_VALUE, semconv.AGENT_NAME, semconv.GEN_AI_RESPONSE_ID, semconv.SPAN_KIND,
                                  semconv.ATTEMPT, semconv.ROLLOUT_ID, semconv.TASK_ID, "agentlightning.reward.0.value"]),
                 st.text(max_size=16))
token_ids = st.lists(st.one_of(st.integers(0, 2**31 - 1), INT64, st.floats(allow_nan=True)), max_size=8)
attributes = st.dictionaries(keys, mostly(st.one_of(values, token_ids), deep_values(), odds=30), max_size=6)
ids = lambda size: mostly(st.binary(min_size=size, max_size=size).filter(any),  # noqa: E731
                          st.one_of(st.just(bytes(size)), st.binary(max_size=size + 4)), odds=25)
times = mostly(st.integers(1_600_000_000 * 10**9, 1_900_000_000 * 10**9),
               st.one_of(st.integers(0, 2**64 - 1), st.sampled_from([0, 2**63 - 2, 2**63 - 1, 2**63, 2**64 - 1])), odds=20)

span_fields = st.fixed_dictionaries({
    "trace_id": ids(16), "span_id": ids(8), "parent": st.one_of(st.just(b""), ids(8)),
    "name": st.text(max_size=30), "kind": st.integers(0, 6), "start": times, "end": times,
    "status": st.integers(0, 3), "message": st.text(max_size=10), "attributes": attributes,
    "events": st.lists(st.tuples(st.text(max_size=8), times, attributes), max_size=2),
    "links": st.lists(st.tuples(ids(16), ids(8), attributes), max_size=2),
})
resource_fields = st.fixed_dictionaries({}, optional={
    semconv.RUN_ID: names, semconv.EPOCH: epochs, semconv.ATTEMPT: epochs, semconv.ROLLOUT_ID: names,
    semconv.TASK_ID: names, semconv.SERVICE_NAME: st.text(max_size=10), "other": values,
})
requests = st.lists(st.tuples(resource_fields, st.text(max_size=8),
                              st.lists(st.lists(span_fields, max_size=4), min_size=1, max_size=2)), min_size=1, max_size=3)
encodings = st.fixed_dictionaries({"json": st.booleans(), "gzip": st.booleans(), "surrogate": mostly(st.just(False), st.just(True), odds=10)})


def build(resources, example: str) -> tuple[ExportTraceServiceRequest, int]:
    """The request, and how many spans it carries."""
    request, n = ExportTraceServiceRequest(), 0
    for resource, scope_name, scopes in resources:
        rs = request.resource_spans.add()
        fill_attributes(rs.resource.attributes, {**resource, "fuzz.example": example})
        for spans in scopes:
            ss = rs.scope_spans.add()
            ss.scope.name = scope_name
            for f in spans:
                s = ss.spans.add()
                s.trace_id, s.span_id, s.parent_span_id = f["trace_id"], f["span_id"], f["parent"]
                s.name, s.kind = f["name"], f["kind"]
                s.start_time_unix_nano, s.end_time_unix_nano = f["start"], f["end"]
                s.status.code, s.status.message = f["status"], f["message"]
                fill_attributes(s.attributes, f["attributes"])
                for name, at, attrs in f["events"]:
                    event = s.events.add()
                    event.name, event.time_unix_nano = name, at
                    fill_attributes(event.attributes, attrs)
                for trace_id, span_id, attrs in f["links"]:
                    link = s.links.add()
                    link.trace_id, link.span_id = trace_id, span_id
                    fill_attributes(link.attributes, attrs)
                n += 1
    return request, n


def encode(request: ExportTraceServiceRequest, encoding: dict) -> tuple[bytes, dict]:
    """The body and headers: protobuf or OTLP/JSON (hex ids), maybe with a lone surrogate, maybe gzipped."""
    if encoding["json"]:
        data = otlp_json(request)
        body = json.dumps(data).encode()
        if encoding["surrogate"]:
            body = body.replace(b'"stringValue": "', b'"stringValue": "\\ud800', 1)
        headers = {"Content-Type": "application/json"}
    else:
        body, headers = request.SerializeToString(), {"Content-Type": "application/x-protobuf"}
    if encoding["gzip"]:
        body, headers = gzip.compress(body), {**headers, "Content-Encoding": "gzip"}
    return body, headers


# --- the property ----------------------------------------------------------------------------

LAKE_FILE = re.compile(
    r"catalog\.duckdb(\.wal)?|catalog\.state/lake_id|"
    r"spans/(training|production)/_delta_log/([0-9]{20}\.(json|checkpoint\.parquet|crc)|_last_checkpoint|_commit_[^/]+\.json\.tmp)|"
    r"spans/training/run_id=[A-Za-z0-9][A-Za-z0-9._-]{0,127}/epoch=(0|[1-9][0-9]{0,18})/part-[0-9a-z-]+\.zstd\.parquet|"
    r"spans/production/date=[0-9]{4}-[0-9]{2}-[0-9]{2}/part-[0-9a-z-]+\.zstd\.parquet|"
    r"_schema/training/run_id=_schema/epoch=-1/part-0-schema\.parquet|"
    r"_schema/production/date=1970-01-01/part-0-schema\.parquet")


@pytest.fixture(scope="module")
def fuzzed(tmp_path_factory):
    """A collector on a lake at <root>/lake (compacting every few seconds), its log outside root."""
    root = tmp_path_factory.mktemp("fuzz")
    cfg = make_config(root, "lake.path=lake", "collector.compact_idle_s=2", "collector.compact_min_files=8", "collector.flush_interval_ms=5",
                      "collector.max_body_bytes=4194304")
    Catalog.from_config(cfg).ensure()
    service = start_collector(cfg, log_dir=tmp_path_factory.mktemp("fuzz-logs"))
    yield root, cfg, service
    service.stop()


@settings(max_examples=EXAMPLES, deadline=None, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture, HealthCheck.data_too_large])
@given(resources=requests, encoding=encodings)
def test_random_exports_never_break_the_collector_the_lake_or_anything_outside_it(fuzzed, resources, encoding):
    root, cfg, service = fuzzed
    example = f"ex-{next(_examples)}"
    request, n_spans = build(resources, example)
    body, headers = encode(request, encoding)
    answer = httpx.post(f"{service.url}/v1/traces", content=body, headers=headers, timeout=60)
    event(f"answered {answer.status_code}")
    assert answer.status_code in (200, 400, 413), (answer.status_code, answer.text[:300])
    assert httpx.get(f"{service.url}/healthz", timeout=10).status_code == 200
    with Catalog.from_config(cfg).read() as con:
        # every column of this example's rows converts (earlier rows were checked in their example;
        # a bad folder name anywhere would fail this query too)
        # spans_raw: every stored row (random ids repeat across examples, and the spans view keeps one copy)
        stored = con.sql("SELECT * FROM spans_raw WHERE json_extract_string(resource, '$.\"fuzz.example\"') = $example",
                         params={"example": example}).to_arrow_table().num_rows
    assert stored == (n_spans if answer.status_code == 200 else 0), (answer.status_code, answer.text[:300])
    assert sorted(p.name for p in root.iterdir()) == ["lake"]
    lake = Path(cfg.lake.path)
    strays = [str(p.relative_to(lake)) for p in lake.rglob("*") if p.is_file() and not LAKE_FILE.fullmatch(str(p.relative_to(lake)))]
    assert strays == []
