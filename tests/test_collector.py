"""The collector against a real OTLP exporter in another process, and its answers to bad input."""

from __future__ import annotations

import gzip
import json
import subprocess
import sys
import time

import duckdb
import httpx
import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

from lightning_core.store.catalog import Catalog, view_sql
from lightning_core.store.spans import Lake
from lightning_core.ingest.service import start_collector
from tests.conftest import REPO, make_config
from tests.otlp_factory import otlp_json


def _stored(cfg, where: str, params: list) -> dict[str, dict]:
    with Catalog.from_config(cfg).read() as con:
        rows = con.execute(
            f"SELECT trace_id, span_id, parent_id, name, start_ns, end_ns, attributes::VARCHAR AS a, "
            f"events::VARCHAR AS e, run_id, epoch, rollout_id, task_id, attempt FROM spans WHERE {where}",
            params,
        ).fetchall()
    return {r[1]: r for r in rows}


def test_ten_thousand_spans_from_a_real_exporter_arrive_identical(collector, collector_config, tmp_path):
    out = tmp_path / "sent.json"
    subprocess.run(
        [sys.executable, "-m", "tests.helpers.otlp_sender", collector.url, "10000", str(out)],
        cwd=REPO, check=True, timeout=300,
    )
    sent = json.loads(out.read_text())
    assert len(sent) == 10000
    stored = _stored(collector_config, "run_id = 'bulk' AND epoch = 3", [])
    assert len(stored) == 10000
    for span in sent:
        row = stored[span["span_id"]]
        assert row[0] == span["trace_id"]
        assert row[2] == span["parent_id"]
        assert row[3] == span["name"]
        assert (row[4], row[5]) == (span["start_ns"], span["end_ns"])
        assert json.loads(row[6]) == span["attributes"]
        assert json.loads(row[7]) == span["events"]
        assert row[8:] == ("bulk", 3, "ro-1", "task-1", 0)
    # nesting survived: every parent id refers to a stored span of the same trace
    by_id = {s["span_id"]: s for s in sent}
    nested = [s for s in sent if s["parent_id"]]
    assert len(nested) > 6000
    assert all(by_id[s["parent_id"]]["trace_id"] == s["trace_id"] for s in nested)
    # the None attribute was dropped, the dict and mixed list were kept as JSON
    agent_row = next(s for s in sent if s["name"].startswith("agent "))
    assert "note" not in agent_row["attributes"]
    assert json.loads(agent_row["attributes"]["nested"]) == {"k": [1, 2]}
    assert agent_row["attributes"]["tags"] == ["a", "b"]


def _export_request(run_id: str, n: int = 3) -> ExportTraceServiceRequest:
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
    from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans

    memory = InMemorySpanExporter()
    provider = TracerProvider(resource=Resource.create({"arclight.run_id": run_id, "arclight.epoch": 1}))
    provider.add_span_processor(SimpleSpanProcessor(memory))
    tracer = provider.get_tracer("t")
    for i in range(n):
        with tracer.start_as_current_span(f"s{i}", attributes={"i": i}):
            pass
    return encode_spans(memory.get_finished_spans())


def _count(cfg, run_id: str) -> int:
    with Catalog.from_config(cfg).read() as con:
        return con.execute("SELECT count(*) FROM spans WHERE run_id = ?", [run_id]).fetchall()[0][0]


@pytest.fixture(scope="module")
def guarded(tmp_path_factory):
    """A collector with a bearer token and a small body limit."""
    cfg = make_config(tmp_path_factory.mktemp("guarded"), "collector.token=s3cret", "collector.max_body_bytes=4096")
    Catalog.from_config(cfg).ensure()
    service = start_collector(cfg)
    yield cfg, service
    service.stop()


AUTH = {"Authorization": "Bearer s3cret"}
PB = {"Content-Type": "application/x-protobuf", **AUTH}


def _still_serving(url: str) -> None:
    assert httpx.get(f"{url}/healthz").json()["status"] == "ok"


def test_protobuf_json_and_gzip_are_accepted(guarded):
    cfg, service = guarded
    url = f"{service.url}/v1/traces"
    body = _export_request("plain").SerializeToString()
    assert httpx.post(url, content=body, headers=PB).status_code == 200
    gz = gzip.compress(_export_request("gz").SerializeToString())
    assert httpx.post(url, content=gz, headers={**PB, "Content-Encoding": "gzip"}).status_code == 200
    js = json.dumps(otlp_json(_export_request("js"))).encode()
    r = httpx.post(url, content=js, headers={"Content-Type": "application/json", **AUTH})
    assert r.status_code == 200 and r.json() == {}
    gzjs = gzip.compress(json.dumps(otlp_json(_export_request("gzjs"))).encode())
    r = httpx.post(url, content=gzjs, headers={"Content-Type": "application/json", "Content-Encoding": "gzip", **AUTH})
    assert r.status_code == 200
    assert [_count(cfg, r) for r in ("plain", "gz", "js", "gzjs")] == [3, 3, 3, 3]
    with Catalog.from_config(cfg).read() as con:
        ids = con.execute("SELECT run_id, trace_id, span_id FROM spans WHERE run_id IN ('js', 'plain')").fetchall()
    assert all(len(t) == 32 and len(s) == 16 for _, t, s in ids)


@pytest.mark.parametrize(
    "case, headers, body, status, reason",
    [
        ("malformed protobuf", PB, b"\x0a\xff\xff\xff\xff\x0f garbage", 400, "not a valid OTLP protobuf"),
        ("malformed json", {"Content-Type": "application/json", **AUTH}, b"{not json", 400, "not a valid OTLP/JSON"),
        ("json with bad hex id", {"Content-Type": "application/json", **AUTH},
         b'{"resourceSpans":[{"scopeSpans":[{"spans":[{"traceId":"zz","spanId":"00"}]}]}]}', 400, "is not hex"),
        ("empty body", PB, b"", 400, "empty body"),
        ("truncated gzip", {**PB, "Content-Encoding": "gzip"}, gzip.compress(b"x" * 100, mtime=0)[:20], 400, "truncated"),
        ("not gzip", {**PB, "Content-Encoding": "gzip"}, b"plain bytes", 400, "could not be decompressed"),
        ("over the limit", PB, b"\x00" * 5000, 413, "over the limit"),
        ("gzip bomb", {**PB, "Content-Encoding": "gzip"}, gzip.compress(b"\x00" * 100_000, mtime=0), 413, "decompresses to more"),
        ("wrong token", {"Content-Type": "application/x-protobuf", "Authorization": "Bearer nope"}, b"", 401, "bearer token"),
        ("no token", {"Content-Type": "application/x-protobuf"}, b"", 401, "bearer token"),
        ("unknown content type", {"Content-Type": "text/plain", **AUTH}, b"hello", 415, "not supported"),
        ("unknown encoding", {**PB, "Content-Encoding": "br"}, b"hello", 415, "not supported"),
    ],
)
def test_bad_requests_get_documented_status_and_collector_keeps_serving(guarded, case, headers, body, status, reason):
    cfg, service = guarded
    r = httpx.post(f"{service.url}/v1/traces", content=body, headers=headers)
    assert r.status_code == status, case
    if r.headers["content-type"].startswith("application/json"):
        assert reason in r.json()["error"]
    else:
        from google.rpc.status_pb2 import Status

        assert reason in Status.FromString(r.content).message
    _still_serving(service.url)
    ok = httpx.post(f"{service.url}/v1/traces", content=_export_request("after").SerializeToString(), headers=PB)
    assert ok.status_code == 200


def test_invalid_run_id_is_rejected_with_the_fix(guarded):
    _, service = guarded
    body = _export_request("bad/run").SerializeToString()
    r = httpx.post(f"{service.url}/v1/traces", content=body, headers=PB)
    assert r.status_code == 400
    from google.rpc.status_pb2 import Status

    assert "arclight.run_id 'bad/run' is not valid" in Status.FromString(r.content).message


def _metrics(url: str) -> dict[str, float]:
    """The collector's samples by name and labels, e.g. ``requests_rejected_total{reason="unauthorized"}``."""
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(f"{url}/metrics").text
    return {s.name.removeprefix("arclight_collector_") + "".join(f'{{{k}="{v}"}}' for k, v in s.labels.items()): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def test_metrics_count_spans_and_rejections(guarded):
    _, service = guarded
    before = _metrics(service.url)
    bodies = [_export_request("metrics", n).SerializeToString() for n in (3, 5)]
    for body in bodies:  # one after the other: two conversions, two commits
        assert httpx.post(f"{service.url}/v1/traces", content=body, headers=PB).status_code == 200
    assert httpx.post(f"{service.url}/v1/traces", content=bodies[0],
                      headers={"Content-Type": "application/x-protobuf"}).status_code == 401
    assert httpx.post(f"{service.url}/v1/traces", content=b"\x00" * 5000, headers=PB).status_code == 413
    after = _metrics(service.url)
    delta = {name: after[name] - before.get(name, 0.0) for name in after}
    assert delta["spans_received_total"] == 8
    assert delta["requests_total"] == 2
    assert delta["bytes_received_total"] == sum(len(b) for b in bodies)
    assert delta['requests_rejected_total{reason="unauthorized"}'] == 1
    assert delta['requests_rejected_total{reason="too_large"}'] == 1
    assert delta["files_written_total"] == 2
    assert delta["flush_latency_seconds_count"] == 2 and delta["flush_latency_seconds_sum"] > 0
    assert delta["requests_per_conversion_count"] == 2 and delta["requests_per_conversion_sum"] == 2


def test_non_loopback_bind_without_token_refuses_to_start(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "lightning_core", "collector", "--lake", str(tmp_path / "lake"), "--host", "0.0.0.0", "--port", "0"],
        cwd=REPO, capture_output=True, text=True, timeout=60, env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)},
    )
    assert proc.returncode == 2
    assert "needs a bearer token" in proc.stderr


def test_spans_without_run_id_go_to_the_production_partition_by_date(guarded):
    cfg, service = guarded
    req = _export_request("x")
    req.resource_spans[0].resource.ClearField("attributes")
    r = httpx.post(f"{service.url}/v1/traces", content=req.SerializeToString(), headers=PB)
    assert r.status_code == 200
    with Catalog.from_config(cfg).read() as con:
        rows = con.execute("SELECT run_id, epoch, production_date FROM spans WHERE run_id IS NULL").fetchall()
    assert len(rows) == 3
    assert rows[0][2] >= "2026-01-01"
    assert list((cfg.lake.path / "spans" / "production").glob("date=*/part-*.parquet"))


def test_compaction_merges_small_files_keeps_every_row_and_vacuums_after_the_retention(tmp_path):
    from lightning_core.store.spans import snapshot
    from lightning_core.ingest.tables import request_to_tables

    lake = Lake(tmp_path / "lake")
    for _ in range(20):
        lake.write(request_to_tables(_export_request("many", n=5)))
    folder = tmp_path / "lake" / "spans" / "training" / "run_id=many" / "epoch=1"
    assert len(list(folder.glob("part-*.parquet"))) == 20
    before = snapshot(tmp_path / "lake")
    assert lake.compact(min_files=16, idle_s=3600) == 0  # not idle yet
    assert lake.compact(min_files=16, idle_s=0) == 1
    after = snapshot(tmp_path / "lake")
    assert len(after.files["training"]) == 1 and after.versions["training"] == before.versions["training"] + 1
    # the replaced files stay for the retention window: a query that listed them still reads them
    assert len(list(folder.glob("part-*.parquet"))) == 21
    catalog = Catalog(tmp_path / "lake")
    catalog.ensure()
    for snap in (before, after):
        con = duckdb.connect()
        con.execute(view_sql(tmp_path / "lake", snap))
        assert con.execute("SELECT count(*), count(DISTINCT span_id) FROM spans_raw WHERE run_id='many'").fetchall() == [(100, 100)]
    Lake(tmp_path / "lake", retention_hours=0).compact(min_files=16, idle_s=0)  # nothing to merge; vacuum runs
    assert len(list(folder.glob("part-*.parquet"))) == 1
    with catalog.read() as con:
        assert con.execute("SELECT count(*), count(DISTINCT span_id) FROM spans WHERE run_id='many'").fetchall() == [(100, 100)]


def test_a_partition_still_receiving_spans_is_compacted_once_it_has_max_files(tmp_path):
    # a production day, or a long epoch, is never idle; every commit costs more with every file in the table
    from lightning_core.store.spans import snapshot
    from lightning_core.ingest.tables import request_to_tables

    lake = Lake(tmp_path / "lake")
    for _ in range(12):
        lake.write(request_to_tables(_export_request("busy", n=5)))
    assert lake.compact(min_files=4, idle_s=3600, max_files=13) == 0  # receiving, under the limit
    assert lake.compact(min_files=4, idle_s=3600) == 0  # no limit: only an idle partition is compacted
    assert lake.compact(min_files=4, idle_s=3600, max_files=12) == 1
    assert len(snapshot(tmp_path / "lake").files["training"]) == 1
    for _ in range(11):  # the merged file is small too: it counts with the new ones
        lake.write(request_to_tables(_export_request("busy", n=5)))
    assert lake.compact(min_files=4, idle_s=3600, max_files=12) == 1
    assert len(snapshot(tmp_path / "lake").files["training"]) == 1
    catalog = Catalog(tmp_path / "lake")
    catalog.ensure()
    with catalog.read() as con:
        assert con.execute("SELECT count(*), count(DISTINCT span_id) FROM spans_raw WHERE run_id='busy'").fetchall() == [(115, 115)]


def test_the_collector_compacts_a_partition_that_never_goes_idle(tmp_path):
    from lightning_core.store.spans import snapshot

    cfg = make_config(tmp_path, "collector.compact_min_files=2", "collector.compact_idle_s=3600",
                      "collector.compact_max_files=6")
    service = start_collector(cfg)
    try:
        for _ in range(6):
            body = _export_request("crowded", n=4).SerializeToString()
            response = httpx.post(f"{service.url}/v1/traces", content=body, headers={"Content-Type": "application/x-protobuf"})
            assert response.status_code == 200
        deadline = time.monotonic() + 60  # the compactor looks every 10 s
        while len(snapshot(cfg.lake.path).files["training"]) > 1 and time.monotonic() < deadline:
            time.sleep(0.5)
        assert len(snapshot(cfg.lake.path).files["training"]) == 1
        assert _count(cfg, "crowded") == 24
    finally:
        service.stop()


def test_rollout_context_on_spans_fills_the_columns_when_the_resource_has_none():
    # a process serving many rollouts (a gateway in another language) puts them on each span
    from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    from lightning_core.ingest.span_rows import request_to_rows

    memory = InMemorySpanExporter()
    provider = TracerProvider(resource=Resource.create({"arclight.run_id": "r1"}))
    provider.add_span_processor(SimpleSpanProcessor(memory))
    tracer = provider.get_tracer("t")
    with tracer.start_as_current_span("a", attributes={"arclight.rollout_id": "ro-7", "arclight.task_id": "t-3",
                                                       "arclight.attempt": 2}):
        pass
    with tracer.start_as_current_span("b", attributes={"arclight.rollout_id": "ro-8", "arclight.attempt": "x"}):
        pass
    [rows] = request_to_rows(encode_spans(memory.get_finished_spans())).values()
    got = [(r["name"], r["rollout_id"], r["task_id"], r["attempt"]) for r in rows]
    assert got == [("a", "ro-7", "t-3", 2), ("b", "ro-8", None, None)]

    memory.clear()
    provider = TracerProvider(resource=Resource.create({"arclight.run_id": "r1", "arclight.rollout_id": "ro-res"}))
    provider.add_span_processor(SimpleSpanProcessor(memory))
    with provider.get_tracer("t").start_as_current_span("c", attributes={"arclight.rollout_id": "ro-span"}):
        pass
    [rows] = request_to_rows(encode_spans(memory.get_finished_spans())).values()
    assert rows[0]["rollout_id"] == "ro-res"
