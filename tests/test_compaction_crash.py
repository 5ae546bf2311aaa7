"""A compactor SIGKILLed at any point (issue 15, item 7): after recovery every span is in the lake
exactly once, and no marker or temporary file is left behind."""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
import socket
from pathlib import Path

import pytest

from lightning_core.catalog import Catalog
from lightning_core.lake import COMPACTING_MARKER, Lake, read_lease, request_to_tables
from tests.otlp_factory import export_request


def _small_files(root: Path, n: int = 20, spans: int = 5) -> Path:
    lake = Lake(root)
    for _ in range(n):
        lake.write(request_to_tables(export_request({"arclight.run_id": "many", "arclight.epoch": 1}, spans)))
    return root / "spans" / "training" / "run_id=many" / "epoch=1"


def _compact_and_die(root: str, point: str) -> None:
    """In a child process: compact, and SIGKILL this process at ``point``."""
    from lightning_core import lake as lake_module

    die = lambda: os.kill(os.getpid(), signal.SIGKILL)  # noqa: E731
    real_replace, real_unlink, real_write = os.replace, Path.unlink, lake_module._write_synced
    if point == "writing the merged file":
        def write(folder, name, table):
            tmp = real_write(folder, name, table)
            if name.endswith("-c.parquet"):
                die()
            return tmp
        lake_module._write_synced = write
    elif point == "before the rename":
        def replace(src, dst):
            if str(dst).endswith("-c.parquet"):
                die()
            real_replace(src, dst)
        os.replace = replace
    elif point == "after the rename":
        def replace(src, dst):
            real_replace(src, dst)
            if str(dst).endswith("-c.parquet"):
                die()
        os.replace = replace
    elif point == "halfway through removing the small files":
        removed = []

        def unlink(self, missing_ok=False):
            real_unlink(self, missing_ok=missing_ok)
            if self.name.startswith("part-") and not self.name.endswith("-c.parquet"):
                removed.append(self)
                if len(removed) == 7:
                    die()
        Path.unlink = unlink
    Lake(root).compact(min_files=2, idle_s=0)


def _rows(root: Path) -> tuple[int, int]:
    catalog = Catalog(root)
    catalog.ensure()
    with catalog.read() as con:
        return con.execute("SELECT count(*), count(DISTINCT span_id) FROM spans WHERE run_id = 'many'").fetchall()[0]


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name == COMPACTING_MARKER or p.name.endswith(".tmp"))


POINTS = ["writing the merged file", "before the rename", "after the rename", "halfway through removing the small files"]


def _kill_during_compaction(tmp_path: Path, point: str) -> Path:
    folder = _small_files(tmp_path / "lake")
    child = multiprocessing.get_context("fork").Process(target=_compact_and_die, args=(str(tmp_path / "lake"), point))
    child.start()
    child.join(60)
    assert child.exitcode == -signal.SIGKILL, f"the compactor was not killed {point}"
    return folder


@pytest.mark.parametrize("point", POINTS)
def test_restart_after_a_compactor_was_killed_recovers_exactly_once_rows_and_no_leftovers(tmp_path, point):
    # fails before: killed after the rename, 100 spans were stored as 100 + up to 100 rows for good
    # (the next compaction merged the duplicates too) and the .compacting marker stayed; killed
    # while writing the merged file, its temporary file stayed forever
    folder = _kill_during_compaction(tmp_path, point)
    Lake(tmp_path / "lake").recover()  # what a restarting collector (and every compaction) does first
    assert _leftovers(folder) == []
    assert _rows(tmp_path / "lake") == (100, 100)
    assert Lake(tmp_path / "lake").compact(min_files=2, idle_s=0) in (0, 1)
    assert _rows(tmp_path / "lake") == (100, 100)
    assert _leftovers(folder) == []


@pytest.mark.parametrize("point", ["after the rename", "halfway through removing the small files"])
def test_a_reader_settles_a_dead_compactors_swap_before_it_lists_files(tmp_path, point):
    folder = _kill_during_compaction(tmp_path, point)
    with read_lease(folder.parent, wait_s=1):
        assert _leftovers(folder) == []
        assert _rows(tmp_path / "lake") == (100, 100)


def test_two_compactors_never_merge_one_partition_at_once(tmp_path):
    # fails before: the collector's compactor and `arclight compact` could both merge the same files,
    # each renaming its own merged copy into place (every row twice)
    from lightning_core import lake as lake_module

    folder = _small_files(tmp_path / "lake")
    lake = Lake(tmp_path / "lake")
    real_write, inner = lake_module._write_synced, []

    def write_while_another_compacts(folder_, name, table):
        if not inner:
            inner.append(lake.compact(min_files=2, idle_s=0))  # a second compactor arrives meanwhile
        return real_write(folder_, name, table)

    lake_module._write_synced = write_while_another_compacts
    try:
        assert lake.compact(min_files=2, idle_s=0) == 1
    finally:
        lake_module._write_synced = real_write
    assert inner == [0]
    assert _rows(tmp_path / "lake") == (100, 100)
    assert len(list(folder.glob("part-*.parquet"))) == 1 and _leftovers(folder) == []


def test_temporary_files_of_a_live_writer_are_kept(tmp_path):
    folder = _small_files(tmp_path / "lake", n=1)
    mine = folder / f".part-1-abc.parquet.{socket.gethostname()}-{os.getpid()}.tmp"
    mine.write_bytes(b"being written")
    assert Lake(tmp_path / "lake").recover() == 0 and mine.exists()


def test_a_forged_marker_never_deletes_outside_its_folder(tmp_path):
    folder = _small_files(tmp_path / "lake", n=2)
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    merged = sorted(folder.glob("part-*.parquet"))[0].name
    (folder / COMPACTING_MARKER).write_text(json.dumps(
        {"owner": "gone-host-1", "phase": "swapping", "merged": merged, "sources": ["../../../../../victim.txt", "/etc/hostname"]}))
    os.utime(folder / COMPACTING_MARKER, (0, 0))  # stale
    Lake(tmp_path / "lake").recover()
    assert victim.read_text() == "keep me" and not (folder / COMPACTING_MARKER).exists()
