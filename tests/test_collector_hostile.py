"""The collector against hostile and unlucky input (issue 15, items 2 and 6): a bad request gets its
own 4xx, never fails anyone else's, and never leaves a row that breaks a query."""

from __future__ import annotations

import concurrent.futures
import gzip
import json
import socket
import time
from pathlib import Path

import httpx
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from lightning_core.ingest import group_commit
from lightning_core import semconv
from lightning_core.store.catalog import Catalog
from lightning_core.ingest.group_commit import GroupCommitWriter
from lightning_core.store.spans import Lake
from lightning_core.ingest.service import start_collector
from lightning_core.ingest.tables import request_to_tables
from tests.conftest import make_config
from tests.otlp_factory import add_resource, export_request, otlp_json

PB = {"Content-Type": "application/x-protobuf"}
JS = {"Content-Type": "application/json"}
BODY_LIMIT = 1024 * 1024


@pytest.fixture(scope="module")
def hostile(tmp_path_factory):
    """A collector whose group commits last 300 ms (so concurrent requests share one) and a small byte budget."""
    cfg = make_config(tmp_path_factory.mktemp("hostile"), "collector.flush_interval_ms=300", f"collector.max_body_bytes={BODY_LIMIT}",
                      f"collector.max_inflight_bytes={int(BODY_LIMIT * 1.5)}", "collector.compact_idle_s=3600")
    Catalog.from_config(cfg).ensure()
    service = start_collector(cfg)
    yield cfg, service
    service.stop()


def _post(service, body: bytes, headers=PB) -> httpx.Response:
    return httpx.post(f"{service.url}/v1/traces", content=body, headers=headers, timeout=60)


def _count(cfg, run_id: str) -> int:
    with Catalog.from_config(cfg).read() as con:
        return con.execute("SELECT count(*) FROM spans WHERE run_id = ?", [run_id]).fetchall()[0][0]


def _spans_still_query(cfg) -> None:
    with Catalog.from_config(cfg).read() as con:
        con.execute("SELECT * FROM spans").fetchall()


def test_a_bad_span_gets_its_own_400_and_every_other_request_in_its_commit_is_stored(hostile):
    # fails before: the start time >= 2^63 and the 300-digit epoch failed the whole group commit,
    # so they and the valid requests that shared it all got 503
    cfg, service = hostile
    good = {f"good-{i}": export_request({"arclight.run_id": f"good-{i}"}, 5).SerializeToString() for i in range(6)}
    bad = {
        "start time 2^63": export_request({"arclight.run_id": "bad-a"}, [{"start": 2**63, "end": 2**63 + 1}]).SerializeToString(),
        "epoch of 300 digits": export_request({"arclight.run_id": "bad-b", "arclight.epoch": "9" * 300}).SerializeToString(),
        "start time 2^63-1": export_request({"arclight.run_id": "bad-c"}, [{"start": 2**63 - 1}]).SerializeToString(),
    }
    with concurrent.futures.ThreadPoolExecutor(len(good) + len(bad)) as pool:
        answers = dict(zip([*good, *bad], pool.map(lambda b: _post(service, b), [*good.values(), *bad.values()])))
    assert {k: answers[k].status_code for k in good} == {k: 200 for k in good}
    assert {k: answers[k].status_code for k in bad} == {k: 400 for k in bad}
    assert [_count(cfg, run) for run in good] == [5] * len(good)
    _spans_still_query(cfg)


def test_a_failed_commit_is_written_again_request_by_request(tmp_path):
    # fails before: one request the lake could not write failed every request of its commit
    class PoisonedLake(Lake):
        def write(self, tables):
            if any(p.run_id == "poison" for p in tables):
                raise OSError("cannot write run poison")
            return super().write(tables)

    lake = PoisonedLake(tmp_path / "lake")
    writer = GroupCommitWriter(lake, flush_interval_s=0.3)
    try:
        futures = {run: writer.submit(request_to_tables(export_request({"arclight.run_id": run}, 3)))
                   for run in ("a", "poison", "b", "c")}
        concurrent.futures.wait(futures.values(), timeout=30)
    finally:
        writer.close()
    assert {run: f.exception() is None for run, f in futures.items()} == {"a": True, "poison": False, "b": True, "c": True}
    counts = {run: pa.concat_tables([pq.read_table(f) for f in (tmp_path / "lake" / "spans" / "training" / f"run_id={run}").rglob("part-*.parquet")]).num_rows
              for run in ("a", "b", "c")}
    assert counts == {"a": 3, "b": 3, "c": 3}  # exactly once: the failed merged commit left nothing behind


def test_a_cancelled_wait_does_not_stop_the_writer(tmp_path):
    # fails before: setting the result of a cancelled future raised in the writer thread, which died, and
    # every later request waited for ever
    lake = Lake(tmp_path / "lake")
    writer = GroupCommitWriter(lake, flush_interval_s=0.3)
    try:
        gone = writer.submit(request_to_tables(export_request({"arclight.run_id": "gone"}, 3)))
        assert gone.cancel()
        kept = writer.submit(request_to_tables(export_request({"arclight.run_id": "kept"}, 2)))
        assert kept.result(30) == 2
        later = writer.submit(request_to_tables(export_request({"arclight.run_id": "later"}, 1)))
        assert later.result(30) == 1
    finally:
        writer.close()
    assert {run: len(list((tmp_path / "lake" / "spans" / "training" / f"run_id={run}").rglob("part-*.parquet")))
            for run in ("gone", "kept", "later")} == {"gone": 1, "kept": 1, "later": 1}  # nothing received is dropped


def test_a_lake_write_is_one_commit_per_table_and_a_failed_one_leaves_nothing_visible(tmp_path, monkeypatch):
    from deltalake import DeltaTable

    from lightning_core.store.spans import snapshot

    lake = Lake(tmp_path / "lake")
    tables = request_to_tables(export_request({"arclight.run_id": "one"}, 2))
    tables.update(request_to_tables(export_request({"arclight.run_id": "two"}, 2)))
    lake.write(tables)  # two partitions of the training table: one commit
    assert snapshot(tmp_path / "lake").versions["training"] == 1  # version 0 is the table's creation
    calls = []

    def commit_fails(table, actions, *args, **kwargs):  # the data files are written, the commit is not
        calls.append(len(actions))
        raise OSError("disk full")

    monkeypatch.setattr(DeltaTable, "create_write_transaction", commit_fails)
    more = request_to_tables(export_request({"arclight.run_id": "three"}, 2))
    more.update(request_to_tables(export_request({"arclight.run_id": "four"}, 2)))
    with pytest.raises(OSError):
        lake.write(more)
    assert list((tmp_path / "lake" / "spans" / "training").glob("run_id=three/epoch=0/*.parquet"))  # written, not committed
    assert calls == [2]  # one commit of both partitions' files
    snap = snapshot(tmp_path / "lake")
    assert snap.versions["training"] == 1 and len(snap.files["training"]) == 2


def test_commits_are_bounded_in_partitions(tmp_path, monkeypatch):
    monkeypatch.setattr(group_commit, "MAX_PARTITIONS_PER_COMMIT", 8)
    sizes = []

    class CountingLake(Lake):
        def write(self, tables):
            sizes.append(len(tables))
            return super().write(tables)

    writer = GroupCommitWriter(CountingLake(tmp_path / "lake"), flush_interval_s=0.5)
    try:
        futures = []
        for k in range(5):
            request = export_request({"arclight.run_id": f"r{k}", "arclight.epoch": 0})
            for e in range(1, 3):
                add_resource(request, {"arclight.run_id": f"r{k}", "arclight.epoch": e})
            futures.append(writer.submit(request_to_tables(request)))  # 3 partitions each
        assert [f.result(timeout=30) for f in futures] == [3] * 5
    finally:
        writer.close()
    assert sum(sizes) == 15 and max(sizes) <= 8


def test_a_request_fanned_over_thousands_of_partitions_is_refused_at_once(hostile):
    # fails before: ~230 KB over 2,000 date partitions was accepted and stalled all ingestion for 17 s
    cfg, service = hostile
    day = 86_400 * 10**9
    spans = [{"start": 1_600_000_000 * 10**9 + i * day, "end": 1_600_000_000 * 10**9 + i * day + 1} for i in range(2000)]
    body = export_request({"service.name": "fan"}, spans).SerializeToString()
    assert len(body) > 100_000
    started = time.monotonic()
    r = _post(service, body)
    assert r.status_code == 400 and time.monotonic() - started < 5
    assert "2000 lake partitions" in _reason(r)
    assert _post(service, export_request({"arclight.run_id": "after-fan"}, 2).SerializeToString()).status_code == 200


def _reason(r: httpx.Response) -> str:
    if r.headers["content-type"].startswith("application/json"):
        return r.json()["error"]
    from google.rpc.status_pb2 import Status

    return Status.FromString(r.content).message


def _nested_json(depth: int) -> bytes:
    return b'{"resourceSpans":' + b"[" * depth + b"]" * depth + b"}"


def _json_with_epoch(epoch: dict) -> bytes:
    data = otlp_json(export_request({"arclight.run_id": "js"}))
    data["resourceSpans"][0]["resource"]["attributes"].append({"key": "arclight.epoch", "value": epoch})
    return json.dumps(data).encode()


def _deep_attribute_json(depth: int) -> bytes:
    data = otlp_json(export_request({"arclight.run_id": "deep"}))
    data["resourceSpans"][0]["scopeSpans"][0]["spans"][0]["attributes"] = [{"key": "deep", "value": "DEEP"}]
    value = '{"arrayValue":{"values":[' * depth + '{"intValue":"1"}' + "]}}" * depth
    return json.dumps(data).replace('"DEEP"', value).encode()


def _inside_an_attribute(case: str) -> bytes:
    """A request whose only fault lies inside a span's attribute, which the collector's outline parse keeps
    as bytes: the compiled reader leaves it to the Python path, and protobuf's whole parse names the fault."""
    request = export_request({"arclight.run_id": "z"}, 1)
    attribute = request.resource_spans[0].scope_spans[0].spans[0].attributes.add(key="note")
    if case == "utf8":
        attribute.value.string_value = "BAD-TEXT"
        return request.SerializeToString().replace(b"BAD-TEXT", b"BAD\xff\xfeEXT")
    if case == "continuation":  # token ids whose ArrayValue is 4 bytes that each continue a varint
        attribute.key = semconv.PROMPT_TOKEN_IDS
        attribute.value.string_value = "TOKS"
        return request.SerializeToString().replace(b"\x0a\x04TOKS", b"\x2a\x04\x80\x80\x80\x80")
    value = attribute.value
    for _ in range(200):
        value = value.array_value.values.add()
    value.int_value = 1
    return request.SerializeToString()


# field 1 (resource_spans, a message) sent as a varint; and inside it, field 2 (scope_spans) as a varint
WRONG_WIRE_TYPE_TOP = bytes([0x08, 0x05])
WRONG_WIRE_TYPE_INNER = bytes([0x0A, 0x02, 0x10, 0x01])


@pytest.mark.parametrize("case, body, headers", [
    ("JSON nested 10,000 deep", _nested_json(10_000), JS),
    ("attribute nested 500 deep", _deep_attribute_json(500), JS),
    ("epoch +inf", _json_with_epoch({"doubleValue": "Infinity"}), JS),
    ("epoch -1", _json_with_epoch({"intValue": "-1"}), JS),
    ("epoch 1.5", _json_with_epoch({"doubleValue": 1.5}), JS),
    ("epoch true", _json_with_epoch({"boolValue": True}), JS),
    ("epoch ' 7 '", _json_with_epoch({"stringValue": " 7 "}), JS),
    ("wrong wire type", WRONG_WIRE_TYPE_TOP, PB),
    ("wrong wire type inside", WRONG_WIRE_TYPE_INNER, PB),
    ("invalid UTF-8 in an attribute value", _inside_an_attribute("utf8"), PB),
    ("protobuf attribute nested 200 deep", _inside_an_attribute("deep"), PB),
    ("token id attribute of varint continuation bytes only", _inside_an_attribute("continuation"), PB),
    ("all-zero trace id", export_request({"arclight.run_id": "z"}, [{"trace_id": bytes(16)}]).SerializeToString(), PB),
    ("all-zero span id", export_request({"arclight.run_id": "z"}, [{"span_id": bytes(8)}]).SerializeToString(), PB),
    ("parent id of 3 bytes", export_request({"arclight.run_id": "z"}, [{"parent": b"abc"}]).SerializeToString(), PB),
    ("gzip of nested JSON", gzip.compress(_nested_json(10_000), mtime=0), {**JS, "Content-Encoding": "gzip"}),
])
def test_edge_cases_get_400_and_the_collector_keeps_serving(hostile, case, body, headers):
    # fails before: 500 for the deep JSON and +inf, 200 with nothing stored for the wrong wire types,
    # 200 with the value coerced for the epochs, 200 for all-zero ids
    cfg, service = hostile
    r = _post(service, body, headers)
    assert r.status_code == 400, (case, r.status_code, r.text[:200])
    assert _reason(r)
    if "attribute" in case and headers is PB:
        assert "not a valid OTLP protobuf ExportTraceServiceRequest" in _reason(r), _reason(r)
    assert _post(service, export_request({"arclight.run_id": "still"}, 1).SerializeToString()).status_code == 200
    assert _count(cfg, "z") == 0
    _spans_still_query(cfg)


def test_an_epoch_as_decimal_text_is_stored_as_that_epoch(hostile):
    cfg, service = hostile
    assert _post(service, _json_with_epoch({"stringValue": "7"}), JS).status_code == 200
    with Catalog.from_config(cfg).read() as con:
        assert con.execute("SELECT DISTINCT epoch FROM spans WHERE run_id = 'js'").fetchall() == [(7,)]


def test_bytes_in_flight_are_bounded_with_503_and_retry_after(hostile):
    # fails before: every body was read and parsed at once (six 30 MB bodies: RSS 206 MB -> 1.29 GB)
    cfg, service = hostile
    host, port = service.url.removeprefix("http://").split(":")
    slow = socket.create_connection((host, int(port)))
    try:
        slow.sendall(f"POST /v1/traces HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/x-protobuf\r\n"
                     f"Content-Length: {BODY_LIMIT}\r\n\r\n".encode() + b"\x0a" * 1000)
        time.sleep(0.5)  # the collector now holds the declared megabyte for it
        big = export_request({"arclight.run_id": "big"}, [{"attributes": {"pad": "x" * 600_000}}]).SerializeToString()
        r = _post(service, big)
        assert r.status_code == 503 and r.headers["retry-after"] == "1" and "retry" in _reason(r)
        assert _post(service, export_request({"arclight.run_id": "small"}, 1).SerializeToString()).status_code == 200
    finally:
        slow.close()
    deadline = time.monotonic() + 10
    while (r := _post(service, big)).status_code == 503 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert r.status_code == 200
    assert _count(cfg, "big") == 1


def test_a_chunked_body_is_stopped_at_the_limit(hostile):
    """The 413 comes as soon as the chunks pass the limit, while the body is still being sent: the collector neither
    waits for the rest nor holds it."""
    _, service = hostile
    host, port = service.url.removeprefix("http://").split(":")
    chunk, offered = 65536, 64  # 4 MiB offered against a 1 MiB limit, one chunk at a time
    sock = socket.create_connection((host, int(port)))
    sock.settimeout(10)
    sent, answer = 0, b""
    try:
        sock.sendall(f"POST /v1/traces HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/x-protobuf\r\n"
                     "Transfer-Encoding: chunked\r\n\r\n".encode())
        while sent < offered and not answer:
            sock.sendall(f"{chunk:x}\r\n".encode() + b"\x00" * chunk + b"\r\n")
            sent += 1
            if sent * chunk > BODY_LIMIT:  # past the limit: the answer comes now, with no more chunks
                while b"\r\n\r\n" not in answer:
                    try:
                        got = sock.recv(65536)
                    except TimeoutError:
                        got = b""
                    if not got:  # closed, or nothing for 10 s
                        answer = answer or b"nothing"
                        break
                    answer += got
    finally:
        sock.close()
    assert answer.startswith(b"HTTP/1.1 413"), f"after {sent} chunks of {chunk} bytes the collector answered {answer[:80]!r}"
    assert sent == BODY_LIMIT // chunk + 1  # the first chunk past the limit, none after it


def test_no_temporary_files_are_left_in_the_lake(hostile):
    cfg, _ = hostile
    assert not [p for p in Path(cfg.lake.path).rglob("*.tmp")]


def test_healthz_names_the_lake_only_on_loopback_or_with_the_token(tmp_path):
    # fails before: the lake path went to anyone who asked
    from starlette.testclient import TestClient

    from lightning_core.ingest.collector import build_app
    from lightning_core.config import CollectorConfig

    app = build_app(CollectorConfig(), tmp_path / "lake")
    with TestClient(app, client=("203.0.113.9", 5000)) as stranger:
        assert stranger.get("/healthz").json() == {"status": "ok"}
    with TestClient(app, client=("127.0.0.1", 5000)) as local:
        assert local.get("/healthz").json()["lake"] == str(tmp_path / "lake")
    tokened = build_app(CollectorConfig(token="t0k"), tmp_path / "lake")
    with TestClient(tokened, client=("127.0.0.1", 5000)) as client:
        assert client.get("/healthz").json() == {"status": "ok"}
        assert client.get("/healthz", headers={"Authorization": "Bearer t0k"}).json()["lake"] == str(tmp_path / "lake")


def test_a_production_span_from_1970_stays_visible(hostile):
    # found by the fuzz test: production spans whose clock started near zero went to the folder
    # date=1970-01-01, which the spans view skipped as the schema file's folder
    cfg, service = hostile
    body = export_request({"service.name": "clock-at-zero"}, [{"start": 14_061_879, "end": 14_062_000}]).SerializeToString()
    assert _post(service, body).status_code == 200
    with Catalog.from_config(cfg).read() as con:
        assert con.execute("SELECT production_date, start_ns FROM spans WHERE service_name = 'clock-at-zero'").fetchall() == [
            ("1970-01-01", 14_061_879)]
