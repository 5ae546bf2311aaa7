"""The pipeline's outputs (triplets, llm_calls, rewards, rollout_summary) as Delta tables: one commit per
partition replace, readers on one version, time travel to what an epoch trained on, migration."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from pathlib import Path

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from lightning_core import analyst
from lightning_core.epoch import bookkeeping as ep
from lightning_core.store import outputs as store
from lightning_core.store.catalog import Catalog
from lightning_core.store.spans import Lake
from lightning_core.store.delta import LakeFormatError
from lightning_core.pipeline.triplets import materialize_triplets
from lightning_core.store.span_schema import Partition
from lightning_core.ingest.span_rows import rows_to_table
from lightning_core.store.outputs import load_triplets
from tests.conftest import make_config
from tests.spans_factory import Rollout, write

REPO = Path(__file__).resolve().parents[1]


def _rows(table) -> pa.Table:
    """The table's current rows, read by DuckDB with the partition values from the folder names (delta-rs's own
    ``to_pyarrow_table`` leaves the interpreter to abort at exit, 4 times in 6 here)."""
    return duckdb.sql(f"SELECT * FROM read_parquet({table.file_uris()!r}, hive_partitioning = true, "
                      "hive_types = {'run_id': VARCHAR, 'epoch': BIGINT}, union_by_name = true)").to_arrow_table()


def _rollout(rollout_id: str, task_id: str, reward: float, calls: int = 2) -> Rollout:
    r = Rollout(rollout_id, task_id=task_id)
    a = r.agent("solver", 0, 100, parent=r.span("rollout", 0, 200))
    for i in range(calls):
        r.call(1 + 10 * i, 5 + 10 * i, parent=a, prompt=(i + 1,))
    r.reward(reward, 90, parent=a)
    return r


def test_readers_see_one_generation_of_a_partition_while_the_pipeline_rewrites_it(tmp_path):
    # Before the Delta outputs, a re-run renamed its new files in and then unlinked the old ones: a
    # reader listing the folder in between counted both generations.
    cfg = make_config(tmp_path)
    write(cfg.lake.path, [_rollout(f"ro{i}", f"t{i % 3}", float(i % 2), calls=3) for i in range(12)])
    materialize_triplets(cfg, run_id="r1", epoch=0)
    con = analyst.connect(cfg)
    expected = con.execute("SELECT count(*), count(DISTINCT span_id) FROM triplets").fetchall()[0]
    assert expected == (36, 36)
    stop, seen, errors = threading.Event(), [], []

    def poll() -> None:
        reader = analyst.connect(cfg)
        while not stop.is_set():
            try:
                analyst.refresh(reader)
                seen.append(reader.execute("SELECT count(*), count(DISTINCT span_id) FROM triplets").fetchall()[0])
                seen.append(reader.execute("SELECT count(*) FROM llm_calls").fetchall()[0] + (36,))
            except duckdb.Error as exc:  # pragma: no cover - what the test is for
                errors.append(repr(exc))

    thread = threading.Thread(target=poll)
    thread.start()
    try:
        for _ in range(8):
            materialize_triplets(cfg, run_id="r1", epoch=0)
    finally:
        stop.set()
        thread.join()
    assert errors == []
    assert len(seen) > 8 and set(seen) == {(36, 36)}
    with Catalog.from_config(cfg).read() as cat:  # the pipeline's own read connection has the same views
        assert cat.execute("SELECT count(*) FROM triplets").fetchall() == [(36,)]


def test_an_epoch_s_output_versions_give_back_the_triplets_it_trained_on(tmp_path):
    cfg = make_config(tmp_path)
    write(cfg.lake.path, [_rollout("ro1", "t1", 1.0), _rollout("ro2", "t1", 0.0)])
    first = materialize_triplets(cfg, run_id="r1", epoch=0)
    write(cfg.lake.path, [_rollout("ro3", "t2", 1.0), _rollout("ro4", "t2", 0.0)])
    second = materialize_triplets(cfg, run_id="r1", epoch=0)  # a re-run over more spans replaces the partition
    assert second.output_versions["triplets"] > first.output_versions["triplets"]
    now = analyst.connect(cfg)
    assert now.execute("SELECT count(*) FROM triplets").fetchall() == [(8,)]
    then = analyst.connect(cfg, at_version={**first.span_versions, **first.output_versions})
    assert then.execute("SELECT count(*), count(DISTINCT rollout_id) FROM triplets").fetchall() == [(4, 2)]
    assert then.execute("SELECT count(*) FROM spans WHERE rollout_id IN ('ro3', 'ro4')").fetchall() == [(0,)]
    pinned = dict(then.execute("SELECT * FROM lake_snapshot").fetchall())
    assert pinned["triplets"] == first.output_versions["triplets"] and pinned["training"] == first.span_versions["training"]
    with pytest.raises(ValueError, match="unknown tables.*triplet"):
        analyst.connect(cfg, at_version={"triplet": 1})


def test_the_duckdb_cli_gets_the_outputs_and_the_state_from_the_delta_tables(tmp_path):
    cfg = make_config(tmp_path)
    write(cfg.lake.path, [_rollout("ro1", "t1", 1.0)])
    materialize_triplets(cfg, run_id="r1", epoch=0)
    catalog = Catalog.from_config(cfg)
    ep.set_epoch_status(catalog, run_id="r1", epoch=0, status="triplets_done")
    assert not catalog.path.exists()  # no DuckDB file that a held connection could lock
    script = analyst.cli_script(cfg)  # `arclight views`: the CLI's way in
    cli = duckdb.connect()
    cli.execute(script)
    assert cli.execute("SELECT count(*), min(reward) FROM triplets").fetchall() == [(2, 1.0)]
    assert cli.execute("SELECT agent_name, calls FROM agents").fetchall() == [("solver", 2)]
    assert cli.execute("SELECT run_id, epoch, status FROM epochs").fetchall() == [("r1", 0, "triplets_done")]


def test_a_new_output_column_is_added_to_the_table(tmp_path):
    lake = tmp_path / "lake"
    store.replace_partition(lake, "rewards", pa.table({"kind": ["reward"], "value": [1.0]}), run_id="r1", epoch=0)
    store.replace_partition(lake, "rewards", pa.table({"kind": ["reward"], "value": [2.0], "note": ["new"]}),
                            run_id="r1", epoch=1)
    table = store.open_output(lake, "rewards")
    assert table.schema().to_arrow().names == ["kind", "value", "run_id", "epoch", "note"]
    rows = sorted(_rows(table).to_pylist(), key=lambda r: r["epoch"])
    assert rows == [{"kind": "reward", "value": 1.0, "run_id": "r1", "epoch": 0, "note": None},
                    {"kind": "reward", "value": 2.0, "run_id": "r1", "epoch": 1, "note": "new"}]
    with pytest.raises(LakeFormatError, match="do not fit"):
        store.replace_partition(lake, "rewards", pa.table({"kind": ["reward"], "value": ["high"], "other": [1]}),
                                run_id="r1", epoch=2)


def test_parquet_outputs_of_an_older_arclight_are_refused_then_migrated(tmp_path):
    cfg = make_config(tmp_path)
    write(cfg.lake.path, [_rollout("ro1", "t1", 1.0), _rollout("ro2", "t1", 0.0)])
    materialize_triplets(cfg, run_id="r1", epoch=0)
    made = load_triplets(cfg, run_id="r1", epoch=0, policy="default")
    calls = _rows(store.open_output(cfg.lake.path, "llm_calls"))
    # the layout Arclight wrote before the Delta outputs: the same folders, files only, a _schema partition
    old = make_config(tmp_path / "old")
    lake = old.lake.path
    for output, table, partition in (
            ("triplets", made, "run_id=r1/epoch=0/policy=default"),
            ("llm_calls", calls, "run_id=r1/epoch=0"),
            ("llm_calls", calls.slice(0, 1), "run_id=_production/epoch=0")):
        folder = lake / output / partition
        folder.mkdir(parents=True)
        pq.write_table(store.drop_partition_columns(table), folder / "part-1-a.parquet")
    (lake / "llm_calls" / "run_id=_schema" / "epoch=-1").mkdir(parents=True)
    pq.write_table(store.drop_partition_columns(calls.slice(0, 0)), lake / "llm_calls" / "run_id=_schema" / "epoch=-1" / "part-0.parquet")
    with pytest.raises(LakeFormatError, match="arclight migrate-lake"):
        load_triplets(old, run_id="r1", epoch=0, policy="default")
    assert store.migrate(old.lake.path) == {"triplets": 4, "llm_calls": 5}
    assert load_triplets(old, run_id="r1", epoch=0, policy="default").equals(made)
    migrated = _rows(store.open_output(old.lake.path, "llm_calls")).to_pylist()
    assert sorted(r["run_id"] for r in migrated) == ["_production"] + ["r1"] * 4
    assert len(list((old.lake.path).glob("llm_calls.parquet-*/run_id=r1/epoch=0/part-1-a.parquet"))) == 1
    assert store.migrate(old.lake.path) == {}  # nothing left to convert


_REPLACER = """
import sys, pyarrow as pa
from lightning_core.store import outputs as store
lake, epoch, tag = sys.argv[1], int(sys.argv[2]), sys.argv[3]
for i in range(15):
    store.replace_partition(lake, "rewards", pa.table({"kind": [tag] * 3, "value": [float(i)] * 3}), run_id="r", epoch=epoch)
"""


def test_processes_replacing_partitions_of_one_table_at_once_all_commit(tmp_path):
    # delta-rs refuses an overwrite after any concurrent removal, of another partition too: without the
    # retry about half of these commits failed with CommitFailedError
    lake = tmp_path / "lake"
    store.replace_partition(lake, "rewards", pa.table({"kind": ["seed"], "value": [0.0]}), run_id="r", epoch=9)
    procs = [subprocess.Popen([sys.executable, "-c", _REPLACER, str(lake), str(epoch), tag], cwd=REPO)
             for epoch, tag in ((0, "a"), (1, "b"), (0, "c"))]
    assert [p.wait(timeout=300) for p in procs] == [0, 0, 0]
    rows = _rows(store.open_output(lake, "rewards")).to_pylist()
    by_epoch = {e: sorted((r["kind"], r["value"]) for r in rows if r["epoch"] == e) for e in (0, 1, 9)}
    assert by_epoch[1] == [("b", 14.0)] * 3 and by_epoch[9] == [("seed", 0.0)]
    assert by_epoch[0] in ([("a", 14.0)] * 3, [("c", 14.0)] * 3)  # the later of the two last replaces wins
    assert store.open_output(lake, "rewards").version() == 1 + 45  # 0 the create, 1 the seed, then each replace once


def test_query_at_an_epoch_sees_the_spans_and_triplets_it_trained_on(tmp_path):
    cfg = make_config(tmp_path)
    catalog = Catalog.from_config(cfg)
    catalog.ensure()
    write(cfg.lake.path, [_rollout("ro1", "t1", 1.0), _rollout("ro2", "t1", 0.0)])
    first = materialize_triplets(cfg, run_id="r1", epoch=0)
    ep.set_epoch_status(catalog, run_id="r1", epoch=0, status="triplets_done",  # as the epoch flow records it
                        stats={"span_versions": first.span_versions, "output_versions": first.output_versions,
                               "span_files": first.span_files})
    ep.set_epoch_status(catalog, run_id="r1", epoch=1, status="planned")
    write(cfg.lake.path, [_rollout("ro3", "t2", 1.0)])
    materialize_triplets(cfg, run_id="r1", epoch=0)  # someone re-runs the pipeline on more spans afterwards
    sql = "SELECT (SELECT count(*) FROM triplets), (SELECT count(DISTINCT rollout_id) FROM spans)"
    assert analyst.connect(cfg).execute(sql).fetchall() == [(6, 3)]
    assert analyst.connect(cfg, at_epoch=("r1", 0)).execute(sql).fetchall() == [(4, 2)]
    out = subprocess.run([sys.executable, "-m", "lightning_core", "query", "--lake", str(cfg.lake.path),
                          "--at-epoch", "r1:0", "--format", "csv", sql], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.splitlines()[1] == "4,2", out.stderr
    for bad, code, message in (("r1:1", 1, "has not made its triplets"), ("r9:0", 1, "no epoch 0 of run 'r9'"),
                               ("r1", 2, "RUN:EPOCH")):
        out = subprocess.run([sys.executable, "-m", "lightning_core", "query", "--lake", str(cfg.lake.path),
                              "--at-epoch", bad, sql], cwd=REPO, capture_output=True, text=True, timeout=120)
        assert out.returncode == code and message in " ".join(out.stderr.split()), out.stderr


def test_an_epochs_spans_stay_reachable_after_the_log_of_the_version_it_read_is_cleaned_up(tmp_path):
    cfg = make_config(tmp_path)
    catalog = Catalog.from_config(cfg)
    catalog.ensure()
    write(cfg.lake.path, [_rollout("ro1", "t1", 1.0), _rollout("ro2", "t1", 0.0)])
    write(cfg.lake.path, [_rollout("other", "t1", 1.0)], epoch=1)  # another epoch's spans: not what epoch 0 read
    first = materialize_triplets(cfg, run_id="r1", epoch=0)
    assert list(first.span_files) == ["training"] and len(first.span_files["training"]) == 1
    ep.set_epoch_status(catalog, run_id="r1", epoch=0, status="triplets_done",
                        stats={"span_versions": first.span_versions, "output_versions": first.output_versions,
                               "span_files": first.span_files})
    lake = Lake(cfg.lake.path, log_retention_s=1)  # a collector with a one-second log window
    late = [_rollout("late", "t2", 1.0)]
    for round_ in range(2):  # a checkpoint every 10 commits; entries before it older than the window may go
        for _ in range(12):
            lake.write_table(Partition("r1", 0), rows_to_table([row for r in late for row in r.rows]))
        time.sleep(1.2)
    lake.compact(min_files=10_000)  # the collector's compactor pass: it also cleans the log up
    log_files = list((cfg.lake.path / "spans" / "training" / "_delta_log").glob("*.json"))
    assert len(log_files) < 20 and not (cfg.lake.path / "spans/training/_delta_log/00000000000000000001.json").exists()
    with pytest.raises(ValueError, match="no longer in the table's log"):
        analyst.connect(cfg, at_version={"training": first.span_versions["training"]})
    sql = "SELECT count(DISTINCT rollout_id), count(*) FILTER (WHERE rollout_id = 'late') FROM spans"
    assert analyst.connect(cfg, at_epoch=("r1", 0)).execute(sql).fetchall() == [(2, 0)]
    assert analyst.connect(cfg).execute(sql).fetchall()[0][0] == 4
