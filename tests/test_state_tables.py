"""The state tables (runs, epochs, rollouts, ...) as Delta tables: commits of what a write changed, all or
nothing, writers in turn across processes, readers that hold nothing, and the move from a catalog file."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import duckdb
import pytest
from deltalake import DeltaTable

from lightning_core.store import catalog as catalog_module
from lightning_core.store.catalog import STATE_TABLE_NAMES, STATE_TABLES, Catalog
from lightning_core.store.delta import table_properties

REPO = Path(__file__).resolve().parents[1]


def _versions(catalog: Catalog) -> dict[str, int]:
    return {name: DeltaTable(str(catalog.state_root / name)).version()
            for name in STATE_TABLE_NAMES if DeltaTable.is_deltatable(str(catalog.state_root / name))}


def test_a_write_commits_the_tables_it_changed_and_nothing_when_it_fails(tmp_path):
    catalog = Catalog(tmp_path / "lake")
    catalog.ensure()
    with catalog.write() as con:
        con.execute("INSERT INTO runs (run_id, project) VALUES ('r1', 'p')")
        con.execute("INSERT INTO epochs (run_id, epoch, status) VALUES ('r1', 0, 'planned')")
    first = _versions(catalog)
    assert set(first) == {"runs", "epochs"}
    with catalog.write() as con:
        con.execute("UPDATE epochs SET status = 'completed' WHERE epoch = 0")
    assert _versions(catalog) == {"runs": first["runs"], "epochs": first["epochs"] + 1}
    with catalog.write() as con:  # one change made to several rows (a sum of row hashes, not an XOR, sees it)
        con.execute("INSERT INTO rollouts (rollout_id, run_id, status) VALUES ('a', 'r1', 'planned'), ('b', 'r1', 'planned')")
    with catalog.write() as con:
        con.execute("UPDATE rollouts SET prompt_versions = '{\"p\": \"p-v1\"}' WHERE status = 'planned'")
    with catalog.read(spans=False) as con:
        assert con.execute("SELECT count(*) FROM rollouts WHERE prompt_versions IS NOT NULL").fetchall() == [(2,)]
    first["rollouts"] = _versions(catalog)["rollouts"]
    with catalog.write() as con:
        con.execute("SELECT count(*) FROM runs").fetchall()  # a write that changes nothing commits nothing
    assert _versions(catalog) == {"runs": first["runs"], "epochs": first["epochs"] + 1, "rollouts": first["rollouts"]}
    with pytest.raises(RuntimeError, match="boom"):
        with catalog.write() as con:
            con.execute("INSERT INTO runs (run_id) VALUES ('r2')")
            raise RuntimeError("boom")
    with catalog.read(spans=False) as con:
        assert con.execute("SELECT run_id FROM runs").fetchall() == [("r1",)]
        assert con.execute("SELECT status, typeof(started_at) FROM epochs").fetchall() == [("completed", "TIMESTAMP WITH TIME ZONE")]
        with pytest.raises(duckdb.ConstraintException):  # the keys hold on the loaded state
            con.execute("INSERT INTO runs (run_id) VALUES ('r1')")


_INCREMENT = """
import sys
from lightning_core.store.catalog import Catalog
catalog = Catalog(sys.argv[1])
for _ in range(25):
    with catalog.write() as con:
        (n,) = con.execute("SELECT count(*) FROM rollouts").fetchall()[0]
        con.execute("INSERT INTO rollouts (rollout_id, run_id, epoch) VALUES (?, 'r', 0)", [f"{sys.argv[2]}-{n}"])
"""


def test_writers_in_two_processes_take_turns_and_lose_no_update(tmp_path):
    catalog = Catalog(tmp_path / "lake")
    catalog.ensure()
    procs = [subprocess.Popen([sys.executable, "-c", _INCREMENT, str(tmp_path / "lake"), tag], cwd=REPO)
             for tag in ("a", "b")]
    assert [p.wait(timeout=300) for p in procs] == [0, 0]
    with catalog.read(spans=False) as con:
        ids = [r for (r,) in con.execute("SELECT rollout_id FROM rollouts ORDER BY 1").fetchall()]
    assert len(ids) == 50 and len({i.split("-")[1] for i in ids}) == 50  # each count seen once: no lost update


def test_a_reader_holding_the_state_files_never_holds_up_a_writer(tmp_path):
    catalog = Catalog(tmp_path / "lake")
    with catalog.write() as con:
        con.execute("INSERT INTO runs (run_id) VALUES ('r1')")
    files = DeltaTable(str(catalog.state_root / "runs")).file_uris()
    held = subprocess.Popen([sys.executable, "-c", "import duckdb, sys, time\n"
                             f"con = duckdb.connect(); con.execute(\"CREATE VIEW v AS FROM read_parquet({files!r})\")\n"
                             "print(con.execute('SELECT count(*) FROM v').fetchall(), flush=True); time.sleep(60)"],
                            stdout=subprocess.PIPE, text=True)
    try:
        assert held.stdout.readline().strip() == "[(1,)]"
        with catalog.write(timeout_s=5) as con:
            con.execute("INSERT INTO runs (run_id) VALUES ('r2')")
    finally:
        held.kill()
    with catalog.read(spans=False) as con:
        assert con.execute("SELECT count(*) FROM runs").fetchall() == [(2,)]


def test_the_state_of_an_older_catalog_file_moves_into_the_tables_once(tmp_path):
    lake = tmp_path / "lake"
    lake.mkdir()
    old = duckdb.connect(str(lake / "catalog.duckdb"))  # the catalog of Arclight before the Delta state
    old.execute(STATE_TABLES)
    old.execute("INSERT INTO runs (run_id, project, config) VALUES ('r1', 'p', '{\"a\": 1}')")
    old.execute("INSERT INTO epochs (run_id, epoch, status, stats) VALUES ('r1', 0, 'completed', '{\"spans\": 3}')")
    old.execute("INSERT INTO policy_versions (version, policy, epoch) VALUES ('default-v1', 'default', 0)")
    old.close()
    catalog = Catalog(lake)
    with catalog.read(spans=False) as con:
        assert con.execute("SELECT run_id, config->>'a' FROM runs").fetchall() == [("r1", "1")]
        assert con.execute("SELECT status, stats->>'spans' FROM epochs").fetchall() == [("completed", "3")]
        assert con.execute("SELECT version FROM policy_versions").fetchall() == [("default-v1",)]
    assert (catalog.state_root / "MIGRATED_FROM_CATALOG_FILE").exists() and (lake / "catalog.duckdb").exists()
    with catalog.write() as con:
        con.execute("DELETE FROM runs")
    catalog.ensure()  # the file is not read again
    with catalog.read(spans=False) as con:
        assert con.execute("SELECT count(*) FROM runs").fetchall() == [(0,)]


def test_a_state_tables_log_keeps_only_its_window_and_the_state_is_whole(tmp_path, monkeypatch):
    # delta-rs lists the whole log folder on every commit: a log that only grew made every write slower
    monkeypatch.setattr(catalog_module, "STATE_PROPERTIES", table_properties(1))  # a one-second window, not a minute
    catalog = Catalog(tmp_path / "lake")
    catalog.ensure()
    for round_ in range(2):
        for i in range(12):
            with catalog.write() as con:
                con.execute("INSERT INTO runs (run_id, project) VALUES (?, 'p')", [f"r{round_}-{i}"])
        time.sleep(1.2)
    assert len(list((catalog.state_root / "runs" / "_delta_log").glob("*.json"))) < 20
    with catalog.read(spans=False) as con:
        assert con.execute("SELECT count(*) FROM runs").fetchall() == [(24,)]
