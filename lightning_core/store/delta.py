"""Delta mechanics every table writer shares: a durable commit that recovers when other writers moved the table,
the log kept short, tables opened, created and kept up to date, and the properties of a table that takes many commits.

Every writer (the span tables, the state tables, the pipeline's outputs, the compactor) commits through
``commit_durably`` / ``recovering``; readers keep their tables up to date with ``refreshed``.
"""

from __future__ import annotations

import json
import logging
import os
import socket
from pathlib import Path
from typing import Any, Callable, TypeVar
from urllib.parse import quote

import pyarrow as pa
from deltalake import DeltaTable, PostCommitHookProperties
from deltalake.exceptions import DeltaError
from deltalake.transaction import AddAction

from lightning_core.common.durable import fsync_dir, fsync_file

log = logging.getLogger("arclight.lake")


T = TypeVar("T")


# How long a table that takes many commits (the span tables, the state tables) keeps the log entries of
# versions before its last checkpoint. delta-rs 1.6.6 lists the whole _delta_log folder about 15 times
# per commit (12 in create_write_transaction, 3 in update_incremental): with Delta's default of 30 days
# the folder only grows, and one request's commit took 17 ms at first, 39 ms after 1,500 commits and
# 52 ms after 2,500, against 28 and 31 ms with the log kept to 10 s (benchmarks/README.md). Time travel
# by version reaches back this far; an epoch's spans stay reachable through the files its pipeline run
# recorded (``analyst.connect(at_epoch=...)``).
LOG_RETENTION, DEFAULT_LOG_RETENTION_S = "delta.logRetentionDuration", 10


# Commits checkpoint but never clean the log up themselves: a cleanup in one writer's commit deleted log
# entries another writer's commit was reading in the same moment (FileNotFoundError, tests/test_lake_delta.py).
# The one compactor per table cleans it (``clean_log``); readers that lose the race read again (``update``).
COMMIT_HOOKS = PostCommitHookProperties(create_checkpoint=True, cleanup_expired_logs=False)


LOG_READ_ATTEMPTS = 5


class LakeFormatError(RuntimeError):
    """A lake folder that is not (yet) in the table format this Arclight writes."""


def add_action(root: Path, path: Path, values: dict[str, str], rows: int) -> AddAction:
    """The Delta add action of a data file written (and fsynced) under the table folder ``root``."""
    stat = path.stat()
    return AddAction(quote(path.relative_to(root).as_posix(), safe="/="), stat.st_size, values,
                     int(stat.st_mtime * 1000), True, json.dumps({"numRecords": rows}))


def commit_durably(table: DeltaTable, root: Path, actions: list[AddAction], **transaction: Any) -> None:
    """Commit ``actions`` to the local table at ``root`` (``create_write_transaction``'s arguments), bring the table
    up to date and fsync the log entries since its version before: ours, and any other process's made meanwhile
    (delta-rs does not fsync local files). A table object left behind by other writers is read again and the commit
    made once more (``recovering``).

    An error raised after our log entry landed (delta-rs reads the log again after it commits, and an entry it
    lists may be cleaned up meanwhile) is no failed commit: the entry is found in the log, a warning logged, and
    the commit counts as made. Raising would make the caller write the same rows again (the collector writes a
    failed group commit's requests one by one, and a sender resends a request that failed): stored twice.
    """
    before = table.version()
    try:
        recovering(table, lambda: table.create_write_transaction(actions, post_commithook_properties=COMMIT_HOOKS,
                                                                 **transaction))
    except Exception as exc:
        version = _landed_at(root, before, actions)
        if version is None:
            raise
        log.warning("a commit to %s reported an error (%s), but its log entry is there (version %d): it counts as made",
                    root, str(exc).splitlines()[0] if str(exc) else type(exc).__name__, version)
    try:
        update(table)
        newest = table.version()
    except (DeltaError, FileNotFoundError) as exc:  # the commit landed; the next commit reads the table again
        log.warning("could not read %s again after a commit (%s); the next commit will", root, exc)
        newest = max(_log_versions(root / "_delta_log"), default=before)  # still fsync what landed, ours included
    for version in range(before + 1, newest + 1):
        try:
            fsync_file(root / "_delta_log" / f"{version:020d}.json")
        except FileNotFoundError:  # another writer's, already cleaned up: a later checkpoint holds it
            pass
    fsync_dir(root / "_delta_log")


def _log_versions(log_dir: Path) -> list[int]:
    """The versions whose commit entries (``<version>.json``) are in ``log_dir``, in order."""
    try:
        return sorted(int(name[:20]) for name in os.listdir(log_dir) if name.endswith(".json") and name[:20].isdigit())
    except FileNotFoundError:
        return []


def committed_with(table: DeltaTable, token: str, *, recent: int = 50) -> int | None:
    """The version of the commit among the table's ``recent`` newest whose ``arclight.commit`` metadata is ``token``
    (None when none is): how a writer on object storage, whose files' names delta-rs chooses, finds a commit that
    landed before an error."""
    try:
        update(table)
        history = table.history(recent)
    except (DeltaError, FileNotFoundError):
        return None
    return next((entry["version"] for entry in history if entry.get("arclight.commit") == token), None)


def _landed_at(root: Path, after: int, actions: list[AddAction]) -> int | None:
    """The version after ``after`` whose log entry adds the first of ``actions``' files (each file is added once, by
    the commit that wrote it), or None when no entry does."""
    if not actions:
        return None
    path = actions[0].path
    log_dir = root / "_delta_log"
    for version in (v for v in _log_versions(log_dir) if v > after):
        try:
            with open(log_dir / f"{version:020d}.json") as fh:
                if any(json.loads(line).get("add", {}).get("path") == path for line in fh if line.strip()):
                    return version
        except FileNotFoundError:  # cleaned up: older than the log retention, so not a commit made just now
            continue
    return None


# How delta-rs 1.6.6 refuses a commit made from a table object that other writers left behind:
# - "Invalid table version: N": the log entries up to N (the object's version) were cleaned up behind a newer
#   checkpoint (``clean_log`` after another writer's commit -- a compaction -- landed on a checkpoint version);
# - "Metadata changed since last commit": another writer changed the table's metadata (its properties: a
#   collector of another version or with another log retention opening the table, ``ensure_properties``).
# The object never moves by itself, so every later commit through it fails the same way, forever.
_LEFT_BEHIND = ("Invalid table version", "Metadata changed since last commit")


def left_behind(exc: BaseException) -> bool:
    """True when ``exc`` is delta-rs refusing a commit because the table object is behind the log (``_LEFT_BEHIND``)."""
    return isinstance(exc, DeltaError) and any(reason in str(exc) for reason in _LEFT_BEHIND)


def recovering(table: DeltaTable, commit: Callable[[], T]) -> T:
    """``commit()`` -- a commit through ``table`` --, made once more after reading the table again when delta-rs refused
    it because ``table`` was left behind by other writers (``left_behind``).

    Every writer that keeps a ``DeltaTable`` across commits goes through here: the collector's span writer (which,
    for speed, reads the log only after its own commits), the state tables, the pipeline's outputs and the
    compactor. The retry happens once per commit: a second refusal is a real error and is raised. A refused commit
    committed nothing, so the retry neither loses nor repeats rows.
    """
    try:
        return commit()
    except DeltaError as exc:
        if not left_behind(exc):
            raise
        behind = table.version()
        update(table)
        log.warning("a commit to %s was refused because this writer's view of the table (version %d) was behind its "
                    "log (%s); read the table again at version %d and committed once more",
                    table.table_uri, behind, str(exc).splitlines()[0], table.version())
        return commit()


def clean_log(table: DeltaTable) -> None:
    """Delete the table's log entries before its last checkpoint that are older than its log retention
    (``delta.logRetentionDuration``); a failure is logged, and the next pass tries again."""
    try:
        table.cleanup_metadata()
    except (DeltaError, OSError) as exc:
        log.warning("could not clean up the log of %s: %s", table.table_uri, exc)


def update(table: DeltaTable) -> None:
    """Bring ``table`` up to date (``update_incremental``, read again when its log was cleaned meanwhile)."""
    reread(table.update_incremental)


def reread(read):
    """``read()`` (a table open or update), again when a log entry it listed was cleaned up before it read it: the
    cleanup follows a newer checkpoint, which the next listing finds."""
    for attempt in range(LOG_READ_ATTEMPTS):
        try:
            return read()
        except FileNotFoundError:
            if attempt == LOG_READ_ATTEMPTS - 1:
                raise


def refreshed(cache: dict[str, DeltaTable], key: str, open_=None) -> DeltaTable | None:
    """The table ``cache`` holds under ``key`` brought up to date (reading only the new commits), or opened afresh
    by ``open_()`` (default: the local table at the path ``key``); None when there is none. The caller holds the
    cache's lock."""
    table = cache.get(key)
    if table is not None:
        try:
            update(table)
            return table
        except DeltaError:  # the folder was replaced (a migration, a test's fresh lake)
            del cache[key]
    table = reread(open_ if open_ is not None else lambda: DeltaTable(key) if DeltaTable.is_deltatable(key) else None)
    if table is not None:
        cache[key] = table
    return table


def create_table(uri: str, schema: pa.Schema, *, partition_by: list[str] | None = None,
                 storage_options: dict[str, str] | None = None, properties: dict[str, str] | None = None) -> DeltaTable:
    """Create the Delta table at ``uri`` with ``properties`` (default: a checkpoint every ``CHECKPOINT_EVERY``
    commits) and return it; when another process creates it at the same time, return theirs."""
    try:
        return DeltaTable.create(uri, schema, mode="ignore", partition_by=partition_by, storage_options=storage_options,
                                 configuration=properties or {CHECKPOINT_INTERVAL: str(CHECKPOINT_EVERY)})
    except DeltaError:  # another process created it first
        if DeltaTable.is_deltatable(uri, storage_options=storage_options):
            return DeltaTable(uri, storage_options=storage_options)
        raise


def ensure_properties(table: DeltaTable, properties: dict[str, str]) -> None:
    """Set ``properties`` on ``table`` where they differ (a table of an older Arclight)."""
    configuration = table.metadata().configuration
    if any(configuration.get(key) != value for key, value in properties.items()):
        try:
            recovering(table, lambda: table.alter.set_table_properties(properties))
        except DeltaError:  # another writer opening the table set them at the same moment
            update(table)


def table_properties(log_retention_s: int, *, checkpoint_interval: int | None = None) -> dict[str, str]:
    """The properties of a table that takes many commits: a checkpoint every ``checkpoint_interval`` commits
    (default ``CHECKPOINT_EVERY``), a log retention of ``log_retention_s`` seconds (what ``clean_log`` keeps before the
    last checkpoint), and no column statistics in the log (``STATS_COLUMNS``)."""
    return {CHECKPOINT_INTERVAL: str(checkpoint_interval or CHECKPOINT_EVERY),
            LOG_RETENTION: f"interval {int(log_retention_s)} seconds",
            STATS_COLUMNS: "0"}


# A checkpoint every CHECKPOINT_EVERY commits. Without one, every commit of delta-rs 1.6.6 reads the log
# entries since the last checkpoint again: with the default of 100, a commit took 5 ms at version 50 and
# 28-44 ms at version 250 of a table (docs/measurement-log.md); every 10 it stays at 4-6 ms.
CHECKPOINT_INTERVAL, CHECKPOINT_EVERY = "delta.checkpointInterval", 10


# No per-column min/max/null statistics in the Delta log. delta-rs 1.6.6 parses every file's statistics against
# the table's stats schema (the first 32 columns by default) at each commit and each table update, whether a
# file has any or not: a one-request commit to a span table of 300-600 files cost 15-16 ms of CPU with it and
# 12.5-13.5 without (benchmarks/README.md). Our writers record only row counts, the readers filter on partition
# values, and every Parquet file keeps its own column statistics for DuckDB and Polars.
STATS_COLUMNS = "delta.dataSkippingNumIndexedCols"


def owner() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"
