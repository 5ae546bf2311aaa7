"""The span store on Delta Lake (issue 17): concurrent collectors, a SIGKILL mid-stream or mid-compaction,
compaction while queries loop, analysts who hold a connection, and the migration of an old Parquet lake."""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
import warnings
from pathlib import Path

import duckdb
import httpx
import pyarrow.parquet as pq
import pytest

from lightning_core import analyst, semconv
from lightning_core.store.catalog import Catalog, span_views
from lightning_core.store.spans import Lake, files_snapshot, open_table, scope_files, snapshot
from lightning_core.store.delta import LakeFormatError
from lightning_core.store.location import set_location
from lightning_core.ingest.service import start_collector
from lightning_core.store.span_schema import SPAN_SCHEMA
from lightning_core.ingest.tables import request_to_tables
from tests.conftest import REPO, make_config
from tests.otlp_factory import export_request

PB = {"Content-Type": "application/x-protobuf"}


def _request(run_id: str, n: int, epoch: int = 0):
    """An export of ``n`` spans with ids unique across processes."""
    spans = [{"trace_id": uuid.uuid4().bytes, "span_id": uuid.uuid4().bytes[:8]} for _ in range(n)]
    return export_request({"arclight.run_id": run_id, "arclight.epoch": epoch}, spans)


def _raw_counts(lake_root: Path, run_id: str) -> tuple[int, int]:
    """(rows, distinct (trace_id, span_id)) of the run in the current snapshot, without de-duplication."""
    con = duckdb.connect()
    span_views(con, lake_root.resolve(), snapshot(lake_root))
    return con.execute("SELECT count(*), count(DISTINCT (trace_id, span_id)) FROM spans_raw WHERE run_id = ?",
                       [run_id]).fetchall()[0]


RETRYABLE = {429, 502, 503, 504}  # what an OTLP/HTTP exporter sends again (the OTLP spec), after Retry-After


def _send(url: str, run_id: str, *, requests: int, spans: int, acked: list[int], stop: threading.Event | None = None,
          refusals: list[str] | None = None, may_die: bool = False):
    """Send ``requests`` exports of ``spans`` spans as an OTLP exporter does: a retryable refusal (or, unless the
    collector ``may_die``, a broken connection) is sent again, the same body, up to 5 times; every refusal is
    recorded in ``refusals``. With ``may_die``, a broken connection ends the sender: the collector was killed, and
    what it did not acknowledge is the sender's to resend elsewhere."""
    refusals = refusals if refusals is not None else []
    with httpx.Client(timeout=30) as client:
        for _ in range(requests):
            if stop is not None and stop.is_set():
                return
            body = _request(run_id, spans).SerializeToString()
            for _attempt in range(5):
                try:
                    response = client.post(f"{url}/v1/traces", content=body, headers=PB)
                except httpx.HTTPError as exc:
                    if may_die:
                        return
                    refusals.append(f"{type(exc).__name__}: {exc}")
                    time.sleep(0.5)
                    continue
                if response.status_code == 200:
                    acked.append(spans)
                    break
                refusals.append(f"{response.status_code}: {response.text[:300]}")
                if response.status_code not in RETRYABLE:
                    break
                time.sleep(min(float(response.headers.get("Retry-After", 1)), 2.0))


def _report(refusals: list[str]) -> None:
    """Refusals that a resend got past are no failure, but they are shown (pytest's warnings summary)."""
    if refusals:
        warnings.warn(f"the collector refused {len(refusals)} request(s) that the sender sent again: {refusals[:5]}")


def _s3_settings(url: str) -> list[str]:
    options = {"AWS_ENDPOINT_URL": url, "AWS_ALLOW_HTTP": "true", "conditional_put": "etag"}
    return ["lake.spans_uri=s3://arclight/lake/spans", f"lake.storage_options={json.dumps(options)}"]


@pytest.mark.parametrize("store", ["local", "s3"])
def test_two_collectors_write_one_lake_and_every_acknowledged_span_is_there_once_even_after_a_sigkill(
        tmp_path, store, request):
    # two hosts' worth of collectors: on S3 each has its own lake folder, and the span tables are shared
    extra = _s3_settings(request.getfixturevalue("s3")) if store == "s3" else []
    folders = [tmp_path / "lake"] * 2 if store == "local" else [tmp_path / "host-a", tmp_path / "host-b"]
    # locally, the first collector is itself two processes on one port (collector.workers)
    workers = ["collector.workers=2"] if store == "local" else []
    # (the two-worker collector does not compact: the other one is the table's one compactor)
    configs = [make_config(tmp_path / f"c{i}", f"lake.path={folders[i]}", *extra, *(workers if i == 0 else []))
               for i in range(2)]
    for cfg in configs:
        Catalog.from_config(cfg).ensure()  # what `arclight collector` does first: records where the spans live
    reader = make_config(tmp_path / "r", f"lake.path={tmp_path / 'reader'}", *extra) if store == "s3" else configs[0]
    Catalog.from_config(reader)
    lake_root = reader.lake.path
    services = [start_collector(cfg, timeout_s=60) for cfg in configs]
    try:
        acked: list[int] = []
        refusals: list[str] = []
        senders = [threading.Thread(target=_send, args=(s.url, "two"),
                                    kwargs=dict(requests=15, spans=40, acked=acked, refusals=refusals))
                   for s in services for _ in range(2)]
        for t in senders:
            t.start()
        for t in senders:
            t.join()
        _report(refusals)
        assert sum(acked) == 4 * 15 * 40, refusals
        assert _raw_counts(lake_root, "two") == (2400, 2400)

        # one collector SIGKILLed while two senders stream to each: every acknowledged span is readable, once
        acked_live: list[int] = []
        acked_killed: list[int] = []
        stop = threading.Event()
        senders = [threading.Thread(target=_send, args=(services[0].url, "kill"),
                                    kwargs=dict(requests=10_000, spans=40, acked=acked_killed, stop=stop, may_die=True))
                   for _ in range(2)]
        senders += [threading.Thread(target=_send, args=(services[1].url, "kill"),
                                     kwargs=dict(requests=10_000, spans=40, acked=acked_live, stop=stop, refusals=refusals))
                    for _ in range(2)]
        for t in senders:
            t.start()
        deadline = time.monotonic() + 60
        while sum(acked_killed) < 400 and time.monotonic() < deadline:
            time.sleep(0.01)
        os.killpg(services[0].process.pid, signal.SIGKILL)
        services[0].process.wait(timeout=10)
        time.sleep(1.0)  # the other collector keeps taking spans
        stop.set()
        for t in senders:
            t.join()
        _report(refusals)
        rows, distinct = _raw_counts(lake_root, "kill")
        assert rows == distinct  # no span twice
        # the killed collector may have committed a batch it could not acknowledge: at least every acknowledged one
        assert sum(acked_killed) + sum(acked_live) <= rows <= sum(acked_killed) + sum(acked_live) + 40 * 2
        assert sum(acked_live) > 0 and sum(acked_killed) >= 400

        # a collector started again on the lake goes on where it was
        services[0] = start_collector(configs[0], timeout_s=60)
        again: list[int] = []
        _send(services[0].url, "kill", requests=2, spans=40, acked=again)
        assert _raw_counts(lake_root, "kill")[0] == rows + 80
    finally:
        for s in services:
            s.stop()


def test_a_lake_on_s3_is_read_from_the_store_and_no_span_file_is_written_to_local_disk(tmp_path, s3):
    """DuckDB reads the span files on S3 through the store's filesystem (``attach_store``), through compaction and
    vacuum: nothing of them lands in the lake folder, and the read copies an older Arclight kept (``_mirror``) go."""
    root = tmp_path / "lake"
    set_location(root, "s3://arclight/read-test/spans",
                 {"AWS_ENDPOINT_URL": s3, "AWS_ALLOW_HTTP": "true", "conditional_put": "etag"})
    old_copy = root / "_mirror" / "training" / "run_id=old" / "epoch=0" / "part-0.parquet"
    old_copy.parent.mkdir(parents=True)
    old_copy.write_bytes(b"PAR1")
    lake = Lake(root, retention_hours=0)
    for _ in range(4):
        lake.write(request_to_tables(_request("s3read", 10, epoch=3)))
    snap = snapshot(root)
    assert len(snap.files["training"]) == 4 and all(f.startswith("s3://arclight/read-test/spans/training/run_id=s3read/epoch=3/")
                                                    for f in snap.files["training"]), snap.files
    assert _raw_counts(root, "s3read") == (40, 40)
    assert lake.compact(min_files=2, idle_s=0) == 1  # one file replaces four, and vacuum (retention 0) deletes them
    assert _raw_counts(root, "s3read") == (40, 40)
    with Catalog(root).read() as con:  # the catalog's connections read the store too
        assert con.execute("SELECT count(*), min(epoch) FROM spans WHERE run_id = 's3read'").fetchall() == [(40, 3)]
    # an epoch's recorded files are the objects' URIs, and read back from them
    recorded = scope_files(root, snapshot(root), "s3read", 3)
    assert [f.startswith("s3://") for f in recorded["training"]] == [True]
    assert files_snapshot(root, {"training": 5}, recorded).files["training"] == recorded["training"]

    local = sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())
    print("the lake folder holds:", local)
    assert not (root / "_mirror").exists(), local
    assert not [p for p in local if p.endswith(".parquet") and not p.startswith("_schema/")], local


def test_threads_sharing_a_handle_on_the_store_each_read_the_bytes_at_their_own_offset(s3):
    """DuckDB's threads read one Parquet file through one handle, each as seek-then-read; pyarrow lets go of the GIL
    while it reads, so with one shared position a thread read at another's offset (the 1M-span pipeline over S3
    failed with a corrupt page header, now and then). Each thread has its own position now."""
    from concurrent.futures import ThreadPoolExecutor

    from lightning_core.store.location import Location, store_filesystem

    import boto3

    body = os.urandom(4 << 20)
    boto3.client("s3", endpoint_url=s3, region_name="us-east-1").put_object(Bucket="arclight", Key="race/blob", Body=body)
    fs = store_filesystem(Location("s3://arclight/race", {"AWS_ENDPOINT_URL": s3, "AWS_ALLOW_HTTP": "true"}))
    handle = fs.open("arclight/race/blob", "rb")

    def reads(worker: int) -> int:
        wrong = 0
        for i in range(40):
            at = ((worker * 40 + i) * 99_991) % (len(body) - (64 << 10))
            handle.seek(at)
            time.sleep(0)  # DuckDB takes the GIL for the seek and again for the read: another thread may run between
            wrong += handle.read(64 << 10) != body[at:at + (64 << 10)]
        return wrong

    with ThreadPoolExecutor(4) as pool:
        assert sum(pool.map(reads, range(4))) == 0
    handle.seek(len(body) - 10)
    assert handle.read() == body[-10:] and handle.tell() == len(body)


def test_arclight_views_on_a_lake_on_s3_gives_the_duckdb_cli_the_store_and_no_key(tmp_path, s3):
    """A duckdb CLI reads S3 only with httpfs: the script ``arclight views`` prints loads it and makes a secret from
    the AWS credential chain with the lake's endpoint, before views over the objects' URIs; no key is in it."""
    from lightning_core import analyst

    root = tmp_path / "lake"
    set_location(root, "s3://arclight/views-test/spans", {"AWS_ENDPOINT_URL": s3, "AWS_ALLOW_HTTP": "true",
                                                          "AWS_SECRET_ACCESS_KEY": "never-in-the-script"})
    Lake(root).write(request_to_tables(_request("views", 3)))
    script = analyst.cli_script(root)
    statements = [st.query.strip().rstrip(";").strip() for st in duckdb.connect().extract_statements(script)]
    secret = next(st for st in statements if st.startswith("CREATE OR REPLACE SECRET"))
    assert statements.index("LOAD httpfs") < statements.index(secret) < next(
        i for i, st in enumerate(statements) if "spans_raw" in st), statements[:6]
    host = s3.split("://", 1)[1]
    assert all(part in secret for part in ("PROVIDER credential_chain", f"ENDPOINT '{host}'", "USE_SSL false",
                                           "SCOPE 's3://arclight/views-test/spans'")), secret
    assert "s3://arclight/views-test/spans/training/run_id=views/" in script
    assert "never-in-the-script" not in script


def test_the_lake_folder_records_where_its_spans_are_but_no_storage_key(tmp_path):
    """``spans.location.json`` tells every reader of the lake folder where the span tables are, and the folder is
    readable by other users of the host: it keeps the endpoint and the options, never a key or a token. The process
    that was given them goes on using them; another reader takes its credentials from the AWS_* environment."""
    from lightning_core.store.location import LOCATION_FILE, location

    public = {"AWS_ENDPOINT_URL": "http://127.0.0.1:9", "AWS_ALLOW_HTTP": "true", "conditional_put": "etag"}
    keys = {"AWS_ACCESS_KEY_ID": "SECRET-id-20f1", "AWS_SECRET_ACCESS_KEY": "SECRET-aws-3b9e",
            "AWS_SESSION_TOKEN": "SECRET-sts-c5a7"}
    cfg = make_config(tmp_path, "lake.spans_uri=s3://arclight/keys/spans", f"lake.storage_options={json.dumps(public | keys)}")
    Catalog.from_config(cfg)  # what every command does first: records where the spans live
    recorded = (cfg.lake.path / LOCATION_FILE).read_text()
    assert "SECRET-" not in recorded, recorded
    assert json.loads(recorded) == {"uri": "s3://arclight/keys/spans", "storage_options": public}
    assert location(cfg.lake.path).options == public | keys  # this process still reads the store with its keys


# The log kept an hour: with the default 10 s, a loaded machine (a unit lane of 24 min) took longer than that over the
# 48 appends, the compactor's log cleanup removed their commits, and the history below counted 10 of 49.
KEEP_THE_LOG_S = 3600


def _compact_forever(root: str, begun: str) -> None:
    lake = Lake(root, log_retention_s=KEEP_THE_LOG_S)
    Path(begun).touch()  # the parent kills from here on: the first compaction begins now
    while True:
        lake.compact(min_files=2, idle_s=0)


def _log_version(table_path: Path) -> int:
    """The table's latest version, from its log's file names (cheap enough to poll)."""
    return max(int(p.stem) for p in (table_path / "_delta_log").glob("*.json"))


@pytest.mark.parametrize("kill_at", ["begun", 1, 6])
def test_a_compactor_killed_at_any_moment_leaves_every_span_once(tmp_path, kill_at):
    """Killed as its first compaction begins, or right after its first or sixth commit (of 12 partitions): every
    span once, and the next compactor compacts exactly the partitions the killed one left."""
    lake = Lake(tmp_path / "lake", log_retention_s=KEEP_THE_LOG_S)
    for epoch in range(12):
        for _ in range(4):
            lake.write(request_to_tables(_request("ck", 25, epoch=epoch)))
    table_path = lake.table_path("training")
    written = _log_version(table_path)
    begun = tmp_path / "begun"
    child = multiprocessing.get_context("spawn").Process(target=_compact_forever,
                                                         args=(str(tmp_path / "lake"), str(begun)))
    child.start()
    deadline = time.monotonic() + 120
    while not (begun.exists() if kill_at == "begun" else _log_version(table_path) >= written + kill_at):
        assert child.is_alive() and time.monotonic() < deadline, f"the child compactor never reached {kill_at!r}"
        time.sleep(0.005)
    os.kill(child.pid, signal.SIGKILL)
    child.join()
    assert _raw_counts(tmp_path / "lake", "ck") == (1200, 1200)
    history = open_table(tmp_path / "lake", "training", create=False).history()
    compacted = sum(h["operation"] == "OPTIMIZE" for h in history)  # the killed child's commits: each one partition
    assert len(history) - compacted == written + 1  # the create and the 48 appends; nothing else committed
    assert compacted >= (0 if kill_at == "begun" else kill_at)
    # what it left does not stop the next one, which compacts exactly the partitions still in 4 files
    assert Lake(tmp_path / "lake", log_retention_s=KEEP_THE_LOG_S).compact(min_files=2, idle_s=0) == 12 - compacted
    snap = snapshot(tmp_path / "lake")
    assert len(snap.files["training"]) == 12 and _raw_counts(tmp_path / "lake", "ck") == (1200, 1200)


def test_queries_loop_while_spans_arrive_and_compaction_runs_with_no_failure_and_no_duplicate(tmp_path):
    root = tmp_path / "lake"
    lake = Lake(root)
    lake.write(request_to_tables(_request("loop", 10)))
    stop = threading.Event()
    errors: list[BaseException] = []
    written = [10]

    def writer():
        mine = Lake(root)
        while not stop.is_set():
            mine.write(request_to_tables(_request("loop", 10)))
            written.append(10)

    def compactor():
        mine = Lake(root)
        while not stop.is_set():
            try:
                mine.compact(min_files=2, idle_s=0)
            except BaseException as exc:  # noqa: BLE001 - the test reports it
                errors.append(exc)

    threads = [threading.Thread(target=writer), threading.Thread(target=compactor)]
    for t in threads:
        t.start()
    con = analyst.connect(root)
    polls, last = [], 0
    try:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            analyst.refresh(con)
            rows, distinct, deduplicated = con.execute(
                "SELECT count(*), count(DISTINCT (trace_id, span_id)), (SELECT count(*) FROM spans WHERE run_id = 'loop') "
                "FROM spans_raw WHERE run_id = 'loop'").fetchall()[0]
            polls.append((rows, distinct, deduplicated))
            assert rows == distinct == deduplicated and rows % 10 == 0 and rows >= last
            last = rows
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert not errors, errors
    assert len(polls) >= 20 and polls[-1][0] > polls[0][0]
    versions = [h["operation"] for h in open_table(root, "training", create=False).history()]
    assert "OPTIMIZE" in versions  # compaction did run meanwhile
    assert _raw_counts(root, "loop") == (sum(written), sum(written))


def test_an_analyst_connection_holds_nothing_and_can_pin_a_snapshot(tmp_path):
    from lightning_core.store.catalog import Catalog

    root = tmp_path / "lake"
    lake = Lake(root)
    Catalog(root).ensure()
    lake.write(request_to_tables(_request("pin", 5)))
    con = analyst.connect(root)
    pinned = dict(con.execute("SELECT * FROM lake_snapshot").fetchall())
    lake.write(request_to_tables(_request("pin", 5)))
    # the state can be written while the analyst holds the connection
    with Catalog(root).write(timeout_s=1) as writer:
        writer.execute("INSERT INTO runs (run_id, project) VALUES ('pin', 'p')")
    assert con.execute("SELECT count(*) FROM spans").fetchall() == [(5,)]  # its snapshot until refreshed
    analyst.refresh(con)
    assert con.execute("SELECT count(*) FROM spans").fetchall() == [(10,)]
    assert con.execute("SELECT run_id FROM runs").fetchall() == [("pin",)]
    old = analyst.connect(root, at_version=pinned)  # time travel: what a pipeline run with those versions read
    assert old.execute("SELECT count(*) FROM spans").fetchall() == [(5,)]
    with pytest.raises(ValueError, match="versions 0..2, not 9"):
        analyst.connect(root, at_version={"training": 9})
    assert not (root / "catalog.duckdb").exists()  # no DuckDB file for a held connection to lock
    # the duckdb CLI's way in: the script sets up the same views and a copy of the state
    script = subprocess.run([sys.executable, "-m", "lightning_core", "views", "--lake", str(root)],
                            cwd=REPO, capture_output=True, text=True, timeout=120)
    assert script.returncode == 0, script.stderr
    cli = duckdb.connect()
    cli.execute(script.stdout)
    assert cli.execute("SELECT count(*) FROM spans").fetchall() == [(10,)]
    assert cli.execute("SELECT run_id FROM runs").fetchall() == [("pin",)]
    with Catalog(root).write(timeout_s=1):  # the session holds nothing a writer waits on
        pass


def _old_parquet_lake(root: Path) -> int:
    """A lake as Arclight wrote it before the Delta store: plain files, a schema file, a stale marker."""
    rows = 0
    for epoch in range(3):
        folder = root / "spans" / "training" / "run_id=old" / f"epoch={epoch}"
        folder.mkdir(parents=True)
        for i in range(2):
            table = next(iter(request_to_tables(_request("old", 7, epoch=epoch)).values()))
            if i == 0:  # a file from before the promoted columns existed
                table = table.drop_columns(["prompt_token_ids", "response_token_ids", "response_logprobs"])
            pq.write_table(table, folder / f"part-{epoch}{i}-x.parquet")
            rows += table.num_rows
    (root / "spans" / "training" / "run_id=old" / "epoch=0" / ".compacting").write_text("host-1")
    schema = root / "spans" / "training" / "run_id=_schema" / "epoch=-1"
    schema.mkdir(parents=True)
    pq.write_table(SPAN_SCHEMA.empty_table(), schema / "part-0-schema.parquet")
    production = root / "spans" / "production" / "date=2026-01-02"
    production.mkdir(parents=True)
    table = next(iter(request_to_tables(export_request({}, 4)).values()))
    pq.write_table(table, production / "part-1-y.parquet")
    return rows


def test_an_old_parquet_lake_is_refused_with_the_fix_and_migrated_by_one_command(tmp_path):
    root = tmp_path / "lake"
    rows = _old_parquet_lake(root)
    with pytest.raises(LakeFormatError, match="arclight migrate-lake"):
        Lake(root).write(request_to_tables(_request("new", 1)))
    out = subprocess.run([sys.executable, "-m", "lightning_core", "query", "--lake", str(root), "SELECT 1"],
                         cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 1 and "arclight migrate-lake" in out.stderr and "Traceback" not in out.stderr
    out = subprocess.run([sys.executable, "-m", "lightning_core", "migrate-lake", "--lake", str(root)],
                         cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    said = out.stdout + out.stderr
    assert "spans/training: 42 spans" in said and "spans/production: 4 spans" in said
    assert rows == 42
    con = analyst.connect(root)
    assert con.execute("SELECT epoch, count(*) FROM spans WHERE run_id = 'old' GROUP BY 1 ORDER BY 1").fetchall() == [
        (0, 14), (1, 14), (2, 14)]
    assert con.execute("SELECT count(*) FROM spans WHERE production_date = '2026-01-02'").fetchall() == [(4,)]
    assert con.execute("SELECT count(*) FROM spans WHERE run_id = '_schema'").fetchall() == [(0,)]
    Lake(root).write(request_to_tables(_request("new", 3)))  # and it takes new spans
    assert analyst.connect(root).execute("SELECT count(*) FROM spans").fetchall() == [(49,)]
    assert [p.name for p in (root / "spans").iterdir() if p.name.startswith("training.parquet-")]  # kept aside
    out = subprocess.run([sys.executable, "-m", "lightning_core", "migrate-lake", "--lake", str(root)],
                         cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "nothing to convert" in out.stdout + out.stderr


def test_two_compactions_of_one_partition_at_once_are_reported_loudly(tmp_path):
    """delta-rs 1.6.6 lets two compactions of the same files both commit (rows then stored twice); the
    second compactor must say so instead of going on silently. Two table objects at one version stand in
    for two processes that listed the table at the same moment."""
    from deltalake import DeltaTable

    from lightning_core.store.spans import ConcurrentCompaction, _check_no_concurrent_compaction

    lake = Lake(tmp_path / "lake")
    for _ in range(3):
        lake.write(request_to_tables(_request("twice", 5)))
    path = tmp_path / "lake" / "spans" / "training"
    first, second = DeltaTable(str(path)), DeltaTable(str(path))
    read = second.version()
    first.optimize.compact()
    second.optimize.compact()  # not refused by delta-rs
    assert _raw_counts(tmp_path / "lake", "twice") == (30, 15)  # what it did: every row twice
    with pytest.raises(ConcurrentCompaction, match="stored twice"):
        _check_no_concurrent_compaction(path, read, second.version(), ("twice", 0))
    _check_no_concurrent_compaction(path, read, read + 1, ("twice", 0))  # the first one alone is fine
    con = analyst.connect(tmp_path / "lake")
    assert con.execute("SELECT count(*) FROM spans WHERE run_id = 'twice'").fetchall() == [(15,)]  # readers: once


def test_files_of_a_commit_that_never_happened_are_vacuumed_and_an_old_table_gets_the_checkpoint_interval(tmp_path, monkeypatch):
    """A writer that dies between its data files and its commit leaves files no version lists: ``vacuum`` (full
    mode) removes them once they are older than the retention window, and keeps every committed file. A table
    created before the checkpoint setting gets it when a writer opens it."""
    from deltalake import DeltaTable

    from lightning_core.store import delta, span_schema

    root = tmp_path / "lake"
    table_uri = str(root / "spans" / "training")
    DeltaTable.create(table_uri, span_schema.table_schema("training"), partition_by=["run_id", "epoch"])  # as an older Arclight did
    assert delta.CHECKPOINT_INTERVAL not in DeltaTable(table_uri).metadata().configuration
    lake = Lake(root, retention_hours=0)
    lake.write(request_to_tables(_request("kept", 3)))
    configuration = DeltaTable(table_uri).metadata().configuration
    assert configuration[delta.CHECKPOINT_INTERVAL] == str(delta.CHECKPOINT_EVERY)
    assert configuration[delta.STATS_COLUMNS] == "0"  # no column statistics for delta-rs to parse at each commit

    def commit_fails(*args, **kwargs):
        raise OSError("killed before the commit")

    with monkeypatch.context() as patch:
        patch.setattr(DeltaTable, "create_write_transaction", commit_fails)
        with pytest.raises(OSError):
            lake.write(request_to_tables(_request("orphan", 3)))
    [orphan] = (root / "spans" / "training").glob("run_id=orphan/epoch=0/*.parquet")
    committed = set((root / "spans" / "training").glob("run_id=kept/epoch=0/*.parquet"))
    time.sleep(0.01)
    removed = lake.vacuum(lake.table("training"))
    assert not orphan.exists() and any(path.endswith(orphan.name) for path in removed)
    assert all(path.exists() for path in committed) and _raw_counts(root, "kept") == (3, 3)


def test_a_collector_keeps_the_span_tables_log_short_whatever_its_compaction_settings(tmp_path):
    # every commit lists the whole _delta_log folder: a log that only grew made every commit slower
    cfg = make_config(tmp_path, "collector.log_retention_s=1", "collector.compact_idle_s=3600")
    Catalog.from_config(cfg).ensure()
    service = start_collector(cfg, timeout_s=60)
    try:
        acked: list[int] = []
        _send(service.url, "short", requests=25, spans=5, acked=acked)
        time.sleep(7)  # the compactor's log cleanup runs every 5 s, whatever compact_idle_s says
        _send(service.url, "short", requests=1, spans=5, acked=acked)
        time.sleep(6)
        log = cfg.lake.path / "spans" / "training" / "_delta_log"
        assert sum(acked) == 130 and len(list(log.glob("*.json"))) < 15, sorted(p.name for p in log.iterdir())
        assert _raw_counts(cfg.lake.path, "short") == (130, 130)
    finally:
        service.stop()


def test_a_span_file_is_written_with_the_encodings_chosen_for_ingest_and_reads_back_equal(tmp_path):
    """Ids and times are nearly all distinct: no dictionary for them, times delta-encoded; token ids and logprobs
    split into byte streams, with no dictionary; no min/max statistics for JSON texts and lists, while the columns
    queries filter on keep theirs. DuckDB reads the file back as written."""
    lake = Lake(tmp_path / "lake")
    spans = [{"trace_id": uuid.uuid4().bytes, "span_id": uuid.uuid4().bytes[:8],
              "attributes": {semconv.PROMPT_TOKEN_IDS: [i % 7, 3, 5], semconv.RESPONSE_TOKEN_IDS: [2, 4],
                             semconv.RESPONSE_LOGPROBS: [-0.5, -1.25]}}
             for i in range(40)]
    tables = request_to_tables(export_request({"arclight.run_id": "encoded"}, spans))
    (path,) = lake.write(tables)
    meta = pq.ParquetFile(path).metadata
    columns = {meta.row_group(0).column(i).path_in_schema.split(".")[0]: meta.row_group(0).column(i)
               for i in range(meta.num_columns)}
    assert not any("DICTIONARY" in e for e in columns["span_id"].encodings)
    assert "DELTA_BINARY_PACKED" in columns["start_ns"].encodings
    assert any("DICTIONARY" in e for e in columns["name"].encodings)
    for column in ("prompt_token_ids", "response_token_ids", "response_logprobs"):
        assert "BYTE_STREAM_SPLIT" in columns[column].encodings, (column, columns[column].encodings)
        assert not any("DICTIONARY" in e for e in columns[column].encodings), column
    assert not columns["attributes"].is_stats_set and not columns["prompt_token_ids"].is_stats_set
    assert columns["start_ns"].is_stats_set and columns["trace_id"].is_stats_set
    (table,) = tables.values()
    assert table.column("prompt_token_ids").to_pylist()[:2] == [[0, 3, 5], [1, 3, 5]]
    assert pq.read_table(path).equals(table)
    read = duckdb.sql(f"SELECT prompt_token_ids, response_token_ids, response_logprobs FROM read_parquet('{path}')").fetchall()
    assert read == list(zip(*(table.column(c).to_pylist() for c in ("prompt_token_ids", "response_token_ids", "response_logprobs"))))
