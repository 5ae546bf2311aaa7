"""The span store: one row per span in two Delta Lake tables, partitioned by run and epoch (or date).

Layout under the lake root::

    spans/training/_delta_log/...                                  (the table's commits)
    spans/training/run_id=<run>/epoch=<n>/part-...zstd.parquet
    spans/production/date=<YYYY-MM-DD>/part-...zstd.parquet
    _schema/<lane>/...                                             (empty files: views bind on an empty lake)

A write is one Delta commit per table (``Lake.write``), made durable before the collector
answers. Readers take a snapshot (``Lake.snapshot``: one table version and its files) and never
see a half-written commit; compaction and cleanup are Delta's ``optimize`` and ``vacuum`` with a
retention window. The partition values live in the folder names; every other column is inside
the file (``span_rows.SPAN_SCHEMA``, where requests become rows).
"""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import socket
import threading
import time
import uuid
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, TypeVar
from urllib.parse import quote, unquote

import pyarrow as pa
import pyarrow.parquet as pq
from deltalake import CommitProperties, DeltaTable, PostCommitHookProperties, WriterProperties, write_deltalake
from deltalake.exceptions import DeltaError
from deltalake.transaction import AddAction

from lightning_core import names
from lightning_core.durable import fsync_dir, fsync_file
from lightning_core.span_rows import SPAN_SCHEMA, Partition

log = logging.getLogger("arclight.lake")
T = TypeVar("T")

LANES = {"training": ("run_id", "epoch"), "production": ("date",)}  # lane -> Delta partition columns
_PARTITION_TYPES = {"run_id": pa.string(), "epoch": pa.int64(), "date": pa.string()}
DEFAULT_RETENTION_HOURS = 24
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
VACUUM_EVERY_S = 600.0


class LakeFormatError(RuntimeError):
    """A lake folder that is not (yet) in the table format this Arclight writes."""


def lane_of(partition: Partition) -> str:
    return "production" if partition.run_id is None else "training"


@dataclass(frozen=True)
class Snapshot:
    """One consistent state of the span tables: each lane's Delta version and its data files."""

    versions: dict[str, int]
    files: dict[str, list[str]]


class Lake:
    """The span store: two Delta Lake tables (delta-rs) under ``<root>/spans``.

    ``spans/training`` is partitioned by (run_id, epoch) and ``spans/production`` by date, so
    their files sit where the Parquet lake had them (``run_id=<run>/epoch=<n>/...``). Every
    write is one Delta commit per lane; readers list the files of one table version (a
    snapshot), so they never see a half-written commit, and compaction (``optimize``) and
    cleanup (``vacuum``, after a retention window) are the format's own operations.
    """

    def __init__(self, root: str | os.PathLike[str], *, retention_hours: int = DEFAULT_RETENTION_HOURS,
                 log_retention_s: int = DEFAULT_LOG_RETENTION_S, checkpoint_interval: int | None = None):
        self.root = Path(root)
        self.retention_hours, self.log_retention_s = retention_hours, log_retention_s
        self.checkpoint_interval = checkpoint_interval or CHECKPOINT_EVERY
        self.root.mkdir(parents=True, exist_ok=True)
        ensure_schema_files(self.root)
        self._tables: dict[str, DeltaTable] = {}
        self._lock = threading.Lock()  # one commit at a time through this object's tables
        self._vacuumed_at: float | None = None
        self._compacting: dict[str, DeltaTable] = {}  # the compactor's own table objects (not the writer's)
        self.location = location(self.root)

    def table_path(self, lane: str) -> Path:
        return self.root / "spans" / lane

    def table(self, lane: str) -> DeltaTable:
        """The lane's Delta table, created on first use (two processes creating it at once agree on one)."""
        if lane not in self._tables:
            self._tables[lane] = reread(lambda: open_table(self.root, lane, create=True,
                                                           log_retention_s=self.log_retention_s,
                                                           checkpoint_interval=self.checkpoint_interval))
        return self._tables[lane]

    def write(self, tables: dict[Partition, pa.Table]) -> list[str]:
        """Append the span tables: one durable Delta commit per lane; return the data files written.

        A lane's commit is all or nothing. A request that spans both lanes and fails after the
        first commit is retried by its sender; readers see each (trace_id, span_id) once anyway
        (the ``spans`` view and the pipeline de-duplicate).
        """
        by_lane: dict[str, dict[Partition, pa.Table]] = defaultdict(dict)
        for partition, table in tables.items():
            if table.num_rows:
                by_lane[lane_of(partition)][partition] = table
        written: list[str] = []
        with self._lock:
            for lane, parts in by_lane.items():
                written += self._commit(lane, parts)
        return written

    def _commit(self, lane: str, parts: dict[Partition, pa.Table]) -> list[str]:
        table = self.table(lane)
        commit = CommitProperties(custom_metadata={"arclight.writer": _owner()})
        if self.location.uri:  # object storage: delta-rs uploads the files; the PUTs that returned are durable
            data = pa.concat_tables([_with_partition_columns(t, p) for p, t in parts.items()])
            recovering(table, lambda: write_deltalake(
                table, data, mode="append", partition_by=list(LANES[lane]), writer_properties=_WRITER,
                post_commithook_properties=COMMIT_HOOKS, commit_properties=commit))
            return [f"{lane}@{table.version()}"]
        # A local table: each partition's file written by pyarrow and fsynced, then one commit of their add
        # actions. (delta-rs's own writer took 17 ms a commit at version 50 of a table and 37-73 ms at 300,
        # growing with the table; this took 13-20 ms up to version 300: benchmarks/README.md.)
        root = self.table_path(lane)
        actions, paths, folders = [], [], set()
        for partition, data in parts.items():
            folder = self.root / partition.relative_dir()
            if not folder.is_dir():
                folder.mkdir(parents=True, exist_ok=True)
                folders.update(folder.parents[: len(folder.relative_to(root).parts)])  # their entries of the new folders
            path = folder / f"part-00000-{uuid.uuid4()}-c000.zstd.parquet"
            with pa.OSFile(str(path), "wb") as sink:  # a native file: no filesystem lookup per write
                pq.write_table(data, sink, **_SPAN_FILE)
            fsync_file(path)
            folders.add(folder)
            values = {column: str(value) for column, value in _partition_fields(partition).items()}
            actions.append(add_action(root, path, values, data.num_rows))
            paths.append(path)
        for folder in folders:
            fsync_dir(folder)
        commit_durably(table, root, actions, mode="append", schema=table_schema(lane), partition_by=list(LANES[lane]),
                       commit_properties=commit)
        return [str(p) for p in paths]

    def write_table(self, partition: Partition, table: pa.Table) -> list[str]:
        """Append one partition's table (one commit)."""
        return self.write({partition: table})

    def snapshot(self) -> Snapshot:
        """The current version and data files of both lanes (a stable view for a whole query)."""
        return snapshot(self.root)

    def compact(self, *, min_files: int = 16, idle_s: float = 10.0, max_files: int | None = None,
                now: float | None = None) -> int:
        """Compact (Delta ``optimize``) the partitions that are due; return how many were compacted.

        A partition is due when it has at least ``min_files`` small files (under ``TARGET_FILE_BYTES``)
        and is idle (its newest file is older than ``idle_s`` seconds), or when it has ``max_files``
        small files even while spans keep arriving: every commit costs more with every file in the
        table, and a production day, or a long epoch, is never idle. The files it replaces stay on
        disk for ``retention_hours`` (a query that listed them still reads them), then ``vacuum``
        removes them. Appends that land meanwhile do not conflict.
        """
        now = now if now is not None else time.time()
        done = 0
        due = self._vacuumed_at is None or time.monotonic() - self._vacuumed_at > VACUUM_EVERY_S
        for lane, columns in LANES.items():
            table = self._compactor_table(lane)
            if table is None:
                continue
            actions = pa.table(table.get_add_actions(flatten=True)).to_pydict()
            groups: dict[tuple, list[int]] = defaultdict(list)  # partition -> its small files' times
            for i in range(len(actions.get("path", []))):
                if actions["size_bytes"][i] < TARGET_FILE_BYTES:
                    key = tuple(actions[f"partition.{c}"][i] for c in columns)
                    groups[key].append(actions["modification_time"][i])
            for key, times in groups.items():
                idle = now - max(times) / 1000 >= idle_s
                if len(times) < min_files or not (idle or (max_files is not None and len(times) >= max_files)):
                    continue
                filters = [(c, "=", str(v)) for c, v in zip(columns, key)]
                read_version = table.version()
                try:
                    recovering(table, lambda: table.optimize.compact(
                        partition_filters=filters, target_size=TARGET_FILE_BYTES, writer_properties=_WRITER,
                        post_commithook_properties=COMMIT_HOOKS))
                    done += 1
                except DeltaError as exc:
                    log.info("compaction of %s %s skipped: %s", lane, key, exc)
                    update(table)
                    continue
                if not self.location.uri:
                    _check_no_concurrent_compaction(self.table_path(lane), read_version, table.version(), key)
            clean_log(table)
            if due:
                self.vacuum(table)
        if due:
            self._vacuumed_at = time.monotonic()
        return done

    def clean_logs(self) -> None:
        """Delete the span tables' log entries past their log retention (``clean_log``); ``compact`` does it too."""
        for lane in LANES:
            table = self._compactor_table(lane)
            if table is not None:
                clean_log(table)

    def _compactor_table(self, lane: str) -> DeltaTable | None:
        """The compactor's own object of the lane's table, kept open (a loop reads only new commits)."""
        return refreshed(self._compacting, lane, lambda: open_table(self.root, lane, create=False))

    def vacuum(self, table: DeltaTable) -> list[str]:
        """Delete files that left the table more than ``retention_hours`` ago, and files older than that which
        no commit holds (a writer that died between its files and its commit). Delta ``vacuum`` in full mode
        lists the whole table's folder, so ``compact`` runs it at most every ``VACUUM_EVERY_S``."""
        return table.vacuum(retention_hours=self.retention_hours, dry_run=False, enforce_retention_duration=False, full=True)


_ROW_GROUP = 128 * 1024
# Compaction merges files below this size into files of about this size (delta-rs's default target).
TARGET_FILE_BYTES = 100 * 2**20
_WRITER = WriterProperties(compression="ZSTD", max_row_group_size=_ROW_GROUP)  # as the Parquet lake wrote them
# How the collector writes a span file (pyarrow). Span ids and times are nearly all distinct, so a dictionary for
# them costs time and saves nothing; start and end times are delta-encoded; and no query filters on the JSON texts
# or the lists, so they get no min/max statistics (a file of 2,100 spans of benchmarks/triplets_bench.py: 6.6 ->
# 5.9 ms of CPU, 379 -> 342 kB). Token ids and logprobs are split into byte streams (BYTE_STREAM_SPLIT): the high
# bytes of a token id are zero and a logprob's sign and exponent repeat, so zstd packs each stream as tightly as a
# dictionary would in a file this small, without its hashing (a pair of benchmark requests' file: 5.3 -> 4.1 ms,
# 35 -> 15 kB). Compaction's large files keep delta-rs's dictionaries. Numbers: benchmarks/README.md.
_BYTE_STREAMS = {"prompt_token_ids", "response_token_ids", "response_logprobs"}  # the lists
_NO_DICTIONARY = {"span_id", "parent_id", "start_ns", "end_ns", "received_ns"} | _BYTE_STREAMS
_NO_STATISTICS = {"attributes", "events", "links", "resource", "status_message"} | _BYTE_STREAMS


def _leaf(field: pa.Field) -> str:
    """The Parquet column path of a span column (a list's values are its ``.list.element``)."""
    return f"{field.name}.list.element" if pa.types.is_list(field.type) else field.name


_SPAN_FILE = dict(compression="zstd", row_group_size=_ROW_GROUP,
                  use_dictionary=[_leaf(f) for f in SPAN_SCHEMA if f.name not in _NO_DICTIONARY],
                  write_statistics=[_leaf(f) for f in SPAN_SCHEMA if f.name not in _NO_STATISTICS],
                  column_encoding={"start_ns": "DELTA_BINARY_PACKED", "end_ns": "DELTA_BINARY_PACKED",
                                   **{_leaf(f): "BYTE_STREAM_SPLIT" for f in SPAN_SCHEMA if f.name in _BYTE_STREAMS}})


def _partition_fields(partition: Partition) -> dict[str, Any]:
    """The lane's partition columns and their values (the Partition's fields of the same names)."""
    return {column: getattr(partition, column) for column in LANES[lane_of(partition)]}


def _with_partition_columns(table: pa.Table, partition: Partition) -> pa.Table:
    for column, value in _partition_fields(partition).items():
        table = table.append_column(pa.field(column, _PARTITION_TYPES[column]),
                                    pa.array([value] * table.num_rows, _PARTITION_TYPES[column]))
    return table


def table_schema(lane: str) -> pa.Schema:
    """The Delta table's schema: the span columns plus the lane's partition columns."""
    schema = SPAN_SCHEMA
    for column in LANES[lane]:
        schema = schema.append(pa.field(column, _PARTITION_TYPES[column]))
    return schema


def migrate(root: str | os.PathLike[str]) -> dict[str, int]:
    """Convert the Parquet lake of an older Arclight at ``root`` into the Delta tables; return spans per lane.

    Each partition folder's files are read with today's ``SPAN_SCHEMA`` (columns an older lake
    lacks become NULL) and appended to a new table next to the old folder; then the old folder
    moves aside to ``spans/<lane>.parquet-<timestamp>`` (delete it once you have checked the
    new one) and the table takes its place. A lane that is already a Delta table is left alone.
    """
    import pyarrow.dataset as pads

    root = Path(root)
    moved: dict[str, int] = {}
    for lane, columns in LANES.items():
        path = root / "spans" / lane
        if DeltaTable.is_deltatable(str(path)) or not path.is_dir():
            continue
        folders: dict[Path, list[Path]] = defaultdict(list)
        for file in path.rglob("part-*.parquet"):
            relative = file.relative_to(path).parts
            if file.name == "part-0-schema.parquet" or any(p.startswith(".") for p in relative):
                continue  # the old empty schema files, temporary files
            folders[file.parent].append(file)
        staging = path.with_name(f"{lane}.delta-new")
        if staging.exists():
            shutil.rmtree(staging)
        count = 0
        DeltaTable.create(str(staging), table_schema(lane), partition_by=list(columns))
        for folder, files in sorted(folders.items()):
            values = dict(part.split("=", 1) for part in folder.relative_to(path).parts)
            partition = (Partition(None, None, values["date"]) if lane == "production"
                         else Partition(values["run_id"], int(values["epoch"])))
            table = pads.dataset([str(f) for f in sorted(files)], schema=SPAN_SCHEMA, format="parquet").to_table()
            if table.num_rows:
                write_deltalake(str(staging), _with_partition_columns(table, partition), mode="append",
                                partition_by=list(columns), writer_properties=_WRITER)
                count += table.num_rows
        os.replace(path, path.with_name(f"{lane}.parquet-{time.strftime('%Y%m%d-%H%M%S')}"))
        os.replace(staging, path)
        moved[lane] = count
    return moved


LOCATION_FILE = "spans.location.json"


@dataclass(frozen=True)
class Location:
    """Where a lake's span tables live: its own folder (``uri`` None) or object storage."""

    uri: str | None = None
    options: dict[str, str] | None = None  # delta-rs storage options (no secrets: credentials come from the environment)

    def table_uri(self, root: str | os.PathLike[str], lane: str) -> str:
        return f"{self.uri.rstrip('/')}/{lane}" if self.uri else str(Path(root).resolve() / "spans" / lane)


def location(root: str | os.PathLike[str]) -> Location:
    """The span tables' location recorded in the lake folder (``set_location``), else the folder itself."""
    path = Path(root) / LOCATION_FILE
    try:
        record = json.loads(path.read_text())
    except FileNotFoundError:
        return Location()
    return Location(record["uri"], record.get("storage_options") or {})


def set_location(root: str | os.PathLike[str], uri: str | None, options: dict[str, str] | None = None) -> None:
    """Record that this lake's span tables live at ``uri`` (``lake.spans_uri``), so that every reader of the
    folder finds them; refuse to move a lake whose tables already live elsewhere."""
    if uri is None:  # the folder's own record (if any) stands: readers given only the folder find the spans
        return
    current = location(root)
    if current.uri and current.uri.rstrip("/") != uri.rstrip("/"):
        raise LakeFormatError(f"the lake at {root} keeps its spans at {current.uri}, not {uri}: set lake.spans_uri "
                              "to the first, or use another lake folder")
    if current.uri == uri and (current.options or {}) == (options or {}):
        return
    Path(root).mkdir(parents=True, exist_ok=True)
    tmp = Path(root) / f".{LOCATION_FILE}.{_owner()}.tmp"
    tmp.write_text(json.dumps({"uri": uri, "storage_options": options or {}}, indent=1))
    os.replace(tmp, Path(root) / LOCATION_FILE)


_cache: dict[str, DeltaTable] = {}
_cache_lock = threading.Lock()


def snapshot(root: str | os.PathLike[str]) -> Snapshot:
    """The current version and data files of both span tables of the lake at ``root``.

    The tables are kept open per process and brought up to date incrementally (reading only the
    commits since the last call), so a snapshot costs about a millisecond. Files on object
    storage are listed as local copies (``_mirror``: DuckDB 2.0.0 reads no S3 itself).
    """
    versions, files = {}, {}
    where = location(root)
    for lane in LANES:
        uri = where.table_uri(root, lane)
        with _cache_lock:
            table = refreshed(_cache, uri, lambda: open_table(root, lane, create=False))
            versions[lane] = table.version() if table is not None else -1
            files[lane] = _readable_files(root, lane, table, where) if table is not None else []
    if where.uri and time.monotonic() - _mirror_pruned.get(str(root), -VACUUM_EVERY_S) > VACUUM_EVERY_S:
        _mirror_pruned[str(root)] = time.monotonic()
        try:
            prune_mirror(root)
        except OSError as exc:  # a listing of the object store that failed: the next pass tries again
            log.warning("could not prune the local copies of %s: %r", where.uri, exc)
    return Snapshot(versions, files)


_mirror_pruned: dict[str, float] = {}  # lake folder -> when this process last pruned its mirror


def prune_mirror(root: str | os.PathLike[str]) -> list[Path]:
    """Delete the local copies (``_mirror``) of object-storage files that are gone from the store; return them.

    Delta's ``vacuum`` deletes a data file only ``retention_hours`` after it left the table, so a
    copy is kept exactly as long as its original: a query that listed an older snapshot still
    reads it. ``snapshot`` runs this at most every ``VACUUM_EVERY_S`` per process (one listing of
    the store per lane). Copies half-written by a process that died (``.*.tmp``) go after an hour.
    """
    where = location(root)
    if not where.uri:
        return []
    fs, _ = _arrow_filesystem(where)
    import pyarrow.fs as pafs

    removed = []
    for lane in LANES:
        mirror = Path(root).resolve() / "_mirror" / lane
        if not mirror.is_dir():
            continue
        prefix = where.table_uri(root, lane).split("://", 1)[1].rstrip("/") + "/"
        stored = {unquote(info.path[len(prefix):]) for info in fs.get_file_info(pafs.FileSelector(prefix, recursive=True))
                  if info.type == pafs.FileType.File}  # as the copies are named (``_readable_files``)
        for folder, _, names_ in os.walk(mirror):
            for name in names_:
                local = Path(folder) / name
                relative = local.relative_to(mirror).as_posix()
                if name.startswith(".") and name.endswith(".tmp"):
                    stale = time.time() - local.stat().st_mtime > 3600
                else:
                    stale = relative not in stored
                if stale:
                    local.unlink(missing_ok=True)
                    removed.append(local)
    if removed:
        log.info("removed %d local copies of files vacuumed from %s", len(removed), where.uri)
    return removed


def add_action(root: Path, path: Path, values: dict[str, str], rows: int) -> AddAction:
    """The Delta add action of a data file written (and fsynced) under the table folder ``root``."""
    stat = path.stat()
    return AddAction(quote(path.relative_to(root).as_posix(), safe="/="), stat.st_size, values,
                     int(stat.st_mtime * 1000), True, json.dumps({"numRecords": rows}))


def commit_durably(table: DeltaTable, root: Path, actions: list[AddAction], **transaction: Any) -> None:
    """Commit ``actions`` to the local table at ``root`` (``create_write_transaction``'s arguments), bring the table
    up to date and fsync the log entries since its version before: ours, and any other process's made meanwhile
    (delta-rs does not fsync local files). A table object left behind by other writers is read again and the commit
    made once more (``recovering``)."""
    before = table.version()
    recovering(table, lambda: table.create_write_transaction(actions, post_commithook_properties=COMMIT_HOOKS,
                                                             **transaction))
    update(table)
    for version in range(before + 1, table.version() + 1):
        try:
            fsync_file(root / "_delta_log" / f"{version:020d}.json")
        except FileNotFoundError:  # another writer's, already cleaned up: a later checkpoint holds it
            pass
    fsync_dir(root / "_delta_log")


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


def snapshot_at(root: str | os.PathLike[str], versions: dict[str, int] | None) -> Snapshot:
    """The snapshot of the given table versions (time travel; a lane left out is at its newest)."""
    current = snapshot(root)
    if not versions:
        return current
    unknown = set(versions) - set(LANES)
    if unknown:
        raise ValueError(f"unknown span tables {sorted(unknown)}: the lake has {list(LANES)}")
    where = location(root)
    out_versions, files = dict(current.versions), dict(current.files)
    for lane, version in versions.items():
        if version == -1:  # before the table existed: no spans
            out_versions[lane], files[lane] = -1, []
            continue
        if not 0 <= version <= current.versions[lane]:
            raise ValueError(f"spans/{lane} has versions 0..{current.versions[lane]}, not {version}")
        try:
            table = reread(lambda: DeltaTable(where.table_uri(root, lane), version=version,
                                               storage_options=where.options or None))
        except (DeltaError, FileNotFoundError) as exc:
            raise ValueError(
                f"spans/{lane} version {version} is no longer in the table's log ({exc}): the span tables keep "
                "the log of older versions for collector.log_retention_s seconds. An epoch's spans stay reachable "
                "with at_epoch (the files its pipeline run recorded)") from None
        out_versions[lane], files[lane] = version, _readable_files(root, lane, table, where)
    return Snapshot(out_versions, files)


def _readable_files(root, lane: str, table: DeltaTable, where: Location) -> list[str]:
    """The table version's data files as paths DuckDB can read: local files, or local copies of remote ones.

    Delta data files never change once written, so a copy made once serves every later snapshot.
    """
    uris = table.file_uris()
    if not where.uri:
        return uris
    prefix = where.table_uri(root, lane).rstrip("/") + "/"
    mirror = Path(root).resolve() / "_mirror" / lane
    missing = [(u, mirror / unquote(u[len(prefix):])) for u in uris if not (mirror / unquote(u[len(prefix):])).exists()]
    if missing:
        fs, _ = _arrow_filesystem(where)
        for uri, local in missing:
            local.parent.mkdir(parents=True, exist_ok=True)
            tmp = local.with_name(f".{local.name}.{_owner()}.tmp")
            with fs.open_input_stream(uri.split("://", 1)[1]) as src, open(tmp, "wb") as dst:
                while chunk := src.read(8 << 20):
                    dst.write(chunk)
            os.replace(tmp, local)
    return [str(mirror / unquote(u[len(prefix):])) for u in uris]


def _arrow_filesystem(where: Location):
    """A pyarrow S3 filesystem for the location, from its storage options and the AWS_* environment."""
    import pyarrow.fs as pafs

    options = {k.lower(): v for k, v in os.environ.items() if k.startswith("AWS_")}
    options.update({k.lower(): v for k, v in (where.options or {}).items()})
    endpoint = options.get("aws_endpoint_url") or options.get("endpoint_url") or options.get("aws_endpoint")
    kwargs = {"region": options.get("aws_region") or options.get("region") or "us-east-1"}
    if options.get("aws_access_key_id"):
        kwargs.update(access_key=options["aws_access_key_id"], secret_key=options.get("aws_secret_access_key"),
                      session_token=options.get("aws_session_token"))
    if endpoint:
        scheme, _, host = endpoint.partition("://")
        kwargs.update(endpoint_override=host or scheme, scheme=scheme if host else "https")
    return pafs.S3FileSystem(**kwargs), endpoint


def open_table(root: str | os.PathLike[str], lane: str, *, create: bool,
               log_retention_s: int | None = None, checkpoint_interval: int | None = None) -> DeltaTable | None:
    """The lane's Delta table; None when it does not exist and ``create`` is false. A writer (``create``) sets the
    table's checkpoint interval and log retention (``log_retention_s``, default ``DEFAULT_LOG_RETENTION_S``) where
    they differ, as on a table of an older Arclight."""
    where = location(root)
    uri, options = where.table_uri(root, lane), where.options or None
    if not where.uri:
        path = Path(uri)
        if path.exists() and not path.is_dir():
            raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), str(path))
        if not DeltaTable.is_deltatable(uri) and path.is_dir() and any(path.rglob("*.parquet")):
            raise LakeFormatError(
                f"{path} holds span files of the Parquet lake of Arclight before the Delta store: "
                f"convert it once with `arclight migrate-lake --lake {root}`")
    properties = table_properties(DEFAULT_LOG_RETENTION_S if log_retention_s is None else log_retention_s,
                                  checkpoint_interval=checkpoint_interval)
    if DeltaTable.is_deltatable(uri, storage_options=options):
        table = DeltaTable(uri, storage_options=options)
        if create:
            ensure_properties(table, properties)
        return table
    if not create:
        return None
    return create_table(uri, table_schema(lane), partition_by=list(LANES[lane]), storage_options=options,
                        properties=properties)


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
# 28-44 ms at version 250 of a table (benchmarks/README.md); every 10 it stays at 4-6 ms.
CHECKPOINT_INTERVAL, CHECKPOINT_EVERY = "delta.checkpointInterval", 10
# No per-column min/max/null statistics in the Delta log. delta-rs 1.6.6 parses every file's statistics against
# the table's stats schema (the first 32 columns by default) at each commit and each table update, whether a
# file has any or not: a one-request commit to a span table of 300-600 files cost 15-16 ms of CPU with it and
# 12.5-13.5 without (benchmarks/README.md). Our writers record only row counts, the readers filter on partition
# values, and every Parquet file keeps its own column statistics for DuckDB and Polars.
STATS_COLUMNS = "delta.dataSkippingNumIndexedCols"


class ConcurrentCompaction(RuntimeError):
    """Two compactions of one partition committed at once: its rows are now stored twice."""


def _log_actions(table_path: Path, version: int) -> list[dict]:
    with open(table_path / "_delta_log" / f"{version:020d}.json") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def _check_no_concurrent_compaction(table_path: Path, read: int, committed: int, key: tuple) -> None:
    """Raise when another OPTIMIZE that removed the same files committed between ``read`` and ``committed``.

    delta-rs (1.6.6) lets two compactions of the same files both commit (a remove with
    ``dataChange=false`` does not conflict), which leaves every row of the partition in two files.
    Readers still see each span once (the ``spans`` view and the pipeline de-duplicate), but the
    rows are stored twice: run one compactor per table (``docs/collector.md``).
    """
    ours = {a["remove"]["path"] for a in _log_actions(table_path, committed) if "remove" in a}
    for version in range(read + 1, committed):
        try:
            actions = _log_actions(table_path, version)
        except FileNotFoundError:  # past the log retention already (a compaction that ran that long)
            log.warning("could not check version %d of %s for a concurrent compaction: its log entry was cleaned up "
                        "(delta.logRetentionDuration)", version, table_path)
            continue
        theirs = {a["remove"]["path"] for a in actions if "remove" in a}
        if ours & theirs:
            raise ConcurrentCompaction(
                f"another compaction of partition {key} in {table_path} committed at version {version} while this "
                f"one ran (version {committed}): {len(ours & theirs)} files were compacted twice, so their rows are "
                "stored twice (the spans view and the pipeline still read each span once). Run one compactor per "
                "table: collector.workers > 1 and collectors on several hosts leave compaction to `arclight compact`")


def scope_files(root: str | os.PathLike[str], snap: Snapshot, run_id: str | None, epoch: int | None) -> dict[str, list[str]]:
    """The snapshot's data files that hold the spans of (run_id, epoch) -- the whole run when epoch is None --, as
    paths relative to the lake root; {} for production traces. Recorded with an epoch, they reach its spans when
    the log of the version it read is gone (``LOG_RETENTION``); the files stay until vacuumed."""
    if run_id is None:
        return {}
    lane, _ = span_scope_filter(run_id, epoch)
    marker = f"/run_id={run_id}/" + ("" if epoch is None else f"epoch={epoch}/")
    base = Path(root).resolve()
    return {lane: [os.path.relpath(f, base) for f in snap.files[lane] if marker in f]}


def files_snapshot(root: str | os.PathLike[str], versions: dict[str, int], files: dict[str, list[str]]) -> Snapshot:
    """The snapshot of recorded files (``scope_files``): those lanes hold only these files, the others none."""
    base = Path(root).resolve()
    out = {lane: [str(base / f) for f in files.get(lane, [])] for lane in LANES}
    gone = [f for lane_files in out.values() for f in lane_files if not os.path.exists(f)]
    if gone:
        raise ValueError(f"{len(gone)} of the recorded span files are gone (first: {gone[0]}): files that compaction "
                         "replaced stay collector.retention_hours hours, then vacuum deletes them")
    return Snapshot({lane: versions.get(lane, -1) if lane in files else -1 for lane in LANES}, out)


def span_scope_filter(run_id: str | None, epoch: int | None) -> tuple[str, list]:
    """The lane and Delta partition filters that hold the spans of (run_id, epoch), or production."""
    if run_id is None:
        return "production", []
    filters = [("run_id", "=", names.check_run_id(run_id))]
    if epoch is not None:
        filters.append(("epoch", "=", str(names.check_epoch(epoch))))
    return "training", filters


def _owner() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


SCHEMA_RUN = "_schema"


def schema_file(root: str | os.PathLike[str], lane: str) -> Path:
    """An empty file of the lane's columns, outside its table, so a view over no spans still binds."""
    folder = Path(root) / "_schema" / lane / ("run_id=_schema/epoch=-1" if lane == "training" else "date=1970-01-01")
    return folder / "part-0-schema.parquet"


def ensure_schema_files(root: Path) -> None:
    """Place an empty file of the current ``SPAN_SCHEMA`` per lane so views work on an empty lake."""
    for lane in LANES:
        target = schema_file(root, lane)
        if not target.exists() or not pq.read_schema(target).equals(SPAN_SCHEMA, check_metadata=False):
            target.parent.mkdir(parents=True, exist_ok=True)
            _write_empty(target)


def _write_empty(target: Path) -> None:
    tmp = target.with_name(f".{target.name}.{_owner()}.tmp")
    pq.write_table(SPAN_SCHEMA.empty_table(), tmp)
    os.replace(tmp, target)
