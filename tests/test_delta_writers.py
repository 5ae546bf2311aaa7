"""Every writer of a Delta table survives other writers moving the table under it (issue 40).

The condition that broke `make train` at its second epoch: a writer keeps its ``DeltaTable`` at version N;
another writer's commit (the collector's own compaction) lands on a checkpoint version N+1; the log cleanup
(``delta.logRetentionDuration``) then deletes the entries up to N; every later commit through the first
object failed with ``Invalid table version: N``, forever. A property change by another writer did the same
(``Metadata changed since last commit``). Each test sets the condition up, checks that it really holds (the
other commit is a checkpoint, the writer's version is gone from the log), writes, and counts every row once.
"""

from __future__ import annotations

import time
import uuid
from pathlib import Path

import duckdb
import httpx
import pyarrow as pa
import pytest
from deltalake import CommitProperties, DeltaTable, write_deltalake
from deltalake.exceptions import DeltaError

from lightning_core.store import catalog as catalog_module
from lightning_core.store import outputs as store
from lightning_core.store.catalog import Catalog
from lightning_core.store.delta import CHECKPOINT_EVERY, LOG_RETENTION, committed_with
from lightning_core.store.spans import Lake
from lightning_core.store.location import location
from lightning_core.ingest.service import start_collector
from lightning_core.store.span_schema import Partition
from lightning_core.ingest.group_commit import GroupCommitWriter
from lightning_core.ingest.tables import request_to_tables
from tests.conftest import make_config
from tests.otlp_factory import export_request

RETENTION_S = 1
PB = {"Content-Type": "application/x-protobuf"}


def _spans(run_id: str, n: int = 3, epoch: int = 0):
    spans = [{"trace_id": uuid.uuid4().bytes, "span_id": uuid.uuid4().bytes[:8]} for _ in range(n)]
    return export_request({"arclight.run_id": run_id, "arclight.epoch": epoch}, spans)


def _tables(run_id: str, n: int = 3) -> dict[Partition, pa.Table]:
    return request_to_tables(_spans(run_id, n))


def _next_is_checkpoint(version: int) -> bool:
    """delta-rs checkpoints the versions v with (v + 1) % checkpointInterval == 0 (9, 19, ...)."""
    return (version + 2) % CHECKPOINT_EVERY == 0


def _log_entry(table_uri: str, version: int) -> Path:
    return Path(table_uri.removeprefix("file://")) / "_delta_log" / f"{version:020d}.json"


def _clean_behind(table: DeltaTable, gone: int) -> None:
    """Wait past the log retention and clean the log up through ``table`` (another writer's object), until the
    entry of version ``gone`` is deleted; fail when it stays (the condition did not come about)."""
    deadline = time.monotonic() + 10 * RETENTION_S + 5
    while time.monotonic() < deadline:
        time.sleep(RETENTION_S + 0.2)
        table.update_incremental()
        table.cleanup_metadata()
        if not _log_entry(table.table_uri, gone).exists():
            return
    raise AssertionError(f"version {gone}'s log entry of {table.table_uri} was never cleaned up")


def _checkpointed(table: DeltaTable) -> bool:
    return _log_entry(table.table_uri, table.version()).with_suffix(".checkpoint.parquet").exists()


def _span_rows(lake_root: Path, run_id: str) -> tuple[int, int]:
    from lightning_core.store.catalog import span_views
    from lightning_core.store.spans import snapshot

    con = duckdb.connect()
    span_views(con, Path(lake_root).resolve(), snapshot(lake_root))
    return con.execute("SELECT count(*), count(DISTINCT (trace_id, span_id)) FROM spans_raw WHERE run_id = ?",
                       [run_id]).fetchall()[0]


def test_the_span_writer_commits_after_a_compaction_on_a_checkpoint_version_cleaned_its_read_version_away(tmp_path):
    writer = Lake(tmp_path / "lake", log_retention_s=RETENTION_S)
    written = 0
    while True:  # the compaction that follows lands on a checkpoint version
        writer.write(_tables("r"))
        written += 3
        if writer.table("training").version() >= 2 and _next_is_checkpoint(writer.table("training").version()):
            break
    read_version = writer.table("training").version()
    compactor = Lake(tmp_path / "lake", log_retention_s=RETENTION_S)  # `arclight compact`, or the collector's own
    assert compactor.compact(min_files=2, idle_s=0) == 1
    compacting = compactor._compacting["training"]
    assert compacting.version() == read_version + 1 and _checkpointed(compacting)
    _clean_behind(compacting, read_version)

    writer.write(_tables("r"))  # today's main: DeltaError "Invalid table version: <read_version>"
    writer.write(_tables("r"))
    assert _span_rows(tmp_path / "lake", "r") == (written + 6, written + 6)


def test_the_span_writer_commits_after_another_writer_changed_the_table_properties(tmp_path):
    writer = Lake(tmp_path / "lake", log_retention_s=RETENTION_S)
    writer.write(_tables("r"))
    # a collector of the same lake with another log retention opens the table (ensure_properties)
    Lake(tmp_path / "lake", log_retention_s=RETENTION_S + 5).table("training")
    writer.write(_tables("r"))  # today's main: CommitFailedError "Metadata changed since last commit", forever
    writer.write(_tables("r"))
    assert _span_rows(tmp_path / "lake", "r") == (9, 9)


def test_the_span_writer_on_object_storage_commits_after_its_read_version_was_cleaned_away(tmp_path, s3):
    from lightning_core.store.location import set_location

    options = {"AWS_ENDPOINT_URL": s3, "AWS_ALLOW_HTTP": "true", "conditional_put": "etag"}
    set_location(tmp_path / "lake", f"s3://arclight/{uuid.uuid4().hex}/spans", options)
    writer = Lake(tmp_path / "lake", log_retention_s=RETENTION_S)
    written = 0
    while True:
        writer.write(_tables("r"))
        written += 3
        if writer.table("training").version() >= 2 and _next_is_checkpoint(writer.table("training").version()):
            break
    read_version = writer.table("training").version()
    uri = location(tmp_path / "lake").table_uri(tmp_path / "lake", "training")
    other = DeltaTable(uri, storage_options=options)
    other.optimize.compact()  # `arclight compact` from another host
    assert other.version() == read_version + 1
    deadline = time.monotonic() + 10 * RETENTION_S + 5
    while _readable(uri, options, read_version):
        assert time.monotonic() < deadline, "the object store's log was never cleaned up"
        time.sleep(RETENTION_S + 0.2)
        other.cleanup_metadata()

    writer.write(_tables("r"))  # today's main: DeltaError "Invalid table version"
    assert _span_rows(tmp_path / "lake", "r") == (written + 3, written + 3)


def _readable(uri: str, options: dict[str, str], version: int) -> bool:
    """True while the table's log still holds ``version``."""
    try:
        DeltaTable(uri, version=version, storage_options=options)
        return True
    except Exception:
        return False


def test_a_collector_keeps_acknowledging_after_its_own_compaction_landed_on_a_checkpoint_and_the_log_was_cleaned(
        tmp_path):
    # the exact condition of the broken `make train`, through a real collector process
    cfg = make_config(tmp_path, f"collector.log_retention_s={RETENTION_S}", "collector.compact_min_files=2",
                      "collector.compact_idle_s=1")
    Catalog.from_config(cfg).ensure()
    collector = start_collector(cfg, timeout_s=60)
    table_path = str(Path(cfg.lake.path) / "spans" / "training")
    try:
        sent = 0
        with httpx.Client(timeout=30) as client:
            def send() -> int:
                return client.post(f"{collector.url}/v1/traces", content=_spans("c").SerializeToString(),
                                   headers=PB).status_code

            while True:  # the collector's next commit, its own compaction once it is idle, is a checkpoint version
                assert send() == 200
                sent += 3
                version = DeltaTable(table_path).version()
                if version >= 2 and _next_is_checkpoint(version):
                    break
            read_version = version
            deadline = time.monotonic() + 60
            while _log_entry(table_path, read_version).exists():  # idle: compaction, then the log cleanup
                assert time.monotonic() < deadline, "the collector never compacted and cleaned its log"
                time.sleep(0.5)
            table = DeltaTable(table_path)
            assert table.version() == read_version + 1 and _checkpointed(table)
            assert table.history(1)[0]["operation"] == "OPTIMIZE"
            for _ in range(3):
                assert send() == 200  # today's main: 503 "Invalid table version", for every later request
                sent += 3
        health = httpx.get(collector.health_url, timeout=5).json()
        assert health["status"] == "ok"
    finally:
        collector.stop()
    log = Path(cfg.project_dir, ".arclight", "logs", "collector.log").read_text()
    assert " ERROR " not in log
    assert _span_rows(cfg.lake.path, "c") == (sent, sent)


def test_the_compactor_compacts_after_another_compaction_on_a_checkpoint_cleaned_its_read_version_away(tmp_path):
    root = tmp_path / "lake"
    writer = Lake(root, log_retention_s=RETENTION_S)
    mine = Lake(root, log_retention_s=RETENTION_S)  # the collector's compactor: keeps its table object
    written = 0
    for _ in range(3):
        writer.write(_tables("a"))
        written += 3
    assert mine.compact(min_files=2, idle_s=0) == 1
    while not _next_is_checkpoint(writer.table("training").version()):
        writer.write(_tables("a"))
        written += 3
    read_version = mine._compacting["training"].version()
    other = Lake(root, log_retention_s=RETENTION_S)  # `arclight compact` run elsewhere
    assert other.compact(min_files=2, idle_s=0) == 1
    assert _checkpointed(other._compacting["training"])
    _clean_behind(other._compacting["training"], read_version)
    fresh = Lake(root, log_retention_s=RETENTION_S)  # a writer that read the table after the cleanup: only `mine` is behind
    for _ in range(3):
        fresh.write(_tables("a"))
        written += 3
    assert mine.compact(min_files=2, idle_s=0) == 1
    assert _span_rows(root, "a") == (written, written)  # (rows, distinct spans): none lost, none twice


def _move_table_past_checkpoint(path: Path, commit, reader_version: int) -> DeltaTable:
    """As another writer, commit to the table at ``path`` (``commit(table)``) until a commit lands on a checkpoint
    version with a one-second log retention, then clean the log until ``reader_version`` is gone."""
    other = DeltaTable(str(path))
    other.alter.set_table_properties({LOG_RETENTION: f"interval {RETENTION_S} seconds"})
    while not _next_is_checkpoint(other.version()):
        commit(other)
    commit(other)
    assert _checkpointed(other)
    _clean_behind(other, reader_version)
    return other


def test_the_state_tables_commit_after_another_writer_s_checkpoint_cleaned_their_read_version_away(tmp_path):
    catalog = Catalog(tmp_path / "lake")
    catalog.ensure()
    with catalog.write() as con:
        con.execute("INSERT INTO runs (run_id, project) VALUES ('r0', 'p')")
    path = catalog.state_root / "runs"
    held = catalog_module._state_tables[str(path)]  # this process's object of the table, kept across commits
    read_version = held.version()

    def overwrite(table: DeltaTable) -> None:  # another process rewriting the state with the same rows
        files = table.file_uris()
        from deltalake import write_deltalake

        write_deltalake(table, duckdb.sql(f"SELECT * FROM read_parquet({files!r})").to_arrow_table(), mode="overwrite")

    _move_table_past_checkpoint(path, overwrite, read_version)
    with catalog.write() as con:
        con.execute("INSERT INTO runs (run_id, project) VALUES ('r1', 'p')")
    with catalog.read(spans=False) as con:
        assert con.execute("SELECT run_id FROM runs ORDER BY 1").fetchall() == [("r0",), ("r1",)]


def test_the_output_tables_commit_after_another_writer_s_checkpoint_cleaned_their_read_version_away(tmp_path):
    from deltalake import write_deltalake

    lake_root = tmp_path / "lake"
    store.replace_partition(lake_root, "rollout_summary", pa.table({"rollout_id": ["x"], "reward": [1.0]}),
                            run_id="r", epoch=0)
    path = store.table_path(lake_root, "rollout_summary")
    read_version = store._writers[str(path)].version()  # this process's object of the table, kept across commits

    def other_epoch(table: DeltaTable) -> None:  # another process replacing epoch 1's partition
        write_deltalake(table, pa.table({"rollout_id": ["y"], "reward": [0.0], "run_id": ["r"],
                                         "epoch": pa.array([1], pa.int64())}),
                        mode="overwrite", predicate="run_id = 'r' AND epoch = 1")

    _move_table_past_checkpoint(path, other_epoch, read_version)
    store.replace_partition(lake_root, "rollout_summary", pa.table({"rollout_id": ["z"], "reward": [0.5]}),
                            run_id="r", epoch=2)
    current = DeltaTable(str(path))
    got = duckdb.sql(f"SELECT rollout_id FROM read_parquet({current.file_uris()!r}) ORDER BY 1").fetchall()
    assert got == [("x",), ("y",), ("z",)]


def test_a_commit_that_landed_before_delta_rs_raised_counts_as_made_and_stores_its_rows_once(tmp_path, caplog):
    """delta-rs 1.6.6 writes the commit's log entry, then makes the checkpoint; when that fails it raises, though the
    commit is made. The collector used to count such a commit as failed and write the requests again (each on its
    own, after a group commit; and the sender resends what got 503): every span of the commit stored twice."""
    lake = Lake(tmp_path / "lake")
    lake.write(_tables("warm"))
    table_path = lake.table_path("training")
    start = lake.table("training").version()
    for version in range(start + 1, start + CHECKPOINT_EVERY + 2):  # a folder in the way of every checkpoint file
        (table_path / "_delta_log" / f"{version:020d}.checkpoint.parquet").mkdir()
    writer = GroupCommitWriter(lake, flush_interval_s=0.01)
    try:
        with caplog.at_level("WARNING", logger="arclight.lake"):
            for _ in range(CHECKPOINT_EVERY):  # one commit to each version: one lands on a checkpoint version
                batch = [writer.submit(_tables("once", 4)) for _ in range(3)]  # queued together: one group commit
                assert [f.result(timeout=60) for f in batch] == [4, 4, 4]
    finally:
        writer.close()
    assert writer.failing is None
    assert _span_rows(tmp_path / "lake", "once") == (4 * 3 * CHECKPOINT_EVERY,) * 2
    assert any("counts as made" in r.getMessage() for r in caplog.records), "no commit failed after it landed"


def test_a_commit_on_object_storage_that_landed_before_delta_rs_raised_is_found_by_its_token(tmp_path):
    """The object-storage writer names no files itself (delta-rs does): it finds its commit by the token in the commit's
    metadata (``committed_with``). A local table through the same delta-rs writer shows it."""
    path = tmp_path / "t"
    write_deltalake(str(path), pa.table({"x": [0]}), configuration={"delta.checkpointInterval": "2"})
    table = DeltaTable(str(path))
    (path / "_delta_log" / f"{1:020d}.checkpoint.parquet").mkdir()  # version 1's checkpoint cannot be written
    with pytest.raises(DeltaError):
        write_deltalake(table, pa.table({"x": [1]}), mode="append",
                        commit_properties=CommitProperties(custom_metadata={"arclight.commit": "ours"}))
    assert committed_with(table, "ours") == 1
    assert committed_with(table, "theirs") is None
    assert DeltaTable(str(path)).to_pyarrow_table().num_rows == 2
