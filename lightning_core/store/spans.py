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
the file (``span_schema.SPAN_SCHEMA``; ``ingest.span_rows`` makes requests into rows).
"""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import threading
import time
import uuid
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from deltalake import CommitProperties, DeltaTable, WriterProperties, write_deltalake
from deltalake.exceptions import DeltaError

from lightning_core import names
from lightning_core.common.durable import fsync_dir, fsync_file
from lightning_core.store.delta import (CHECKPOINT_EVERY, COMMIT_HOOKS, DEFAULT_LOG_RETENTION_S, LakeFormatError,
                                        add_action, clean_log, commit_durably, committed_with, create_table, ensure_properties, owner,
                                        recovering, reread, refreshed, table_properties, update)
from lightning_core.store.location import arrow_filesystem, location, readable_files, remove_mirror_once
from lightning_core.store.span_schema import (LANES, SPAN_SCHEMA, Partition, ensure_schema_files, lane_of,
                                              partition_fields, table_schema, with_partition_columns)

log = logging.getLogger("arclight.lake")

DEFAULT_RETENTION_HOURS = 24
VACUUM_EVERY_S = 600.0


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
        token = uuid.uuid4().hex
        commit = CommitProperties(custom_metadata={"arclight.writer": owner(), "arclight.commit": token})
        if self.location.uri:  # object storage: delta-rs uploads the files; the PUTs that returned are durable
            data = pa.concat_tables([with_partition_columns(t, p) for p, t in parts.items()])
            try:
                recovering(table, lambda: write_deltalake(
                    table, data, mode="append", partition_by=list(LANES[lane]), writer_properties=_WRITER,
                    post_commithook_properties=COMMIT_HOOKS, commit_properties=commit))
            except DeltaError as exc:  # raised after the commit landed (its checkpoint failed): made, not to be made again
                version = committed_with(table, token)
                if version is None:
                    raise
                log.warning("a commit to %s reported an error (%s), but it is in the table's history (version %d): it "
                            "counts as made", self.table_path(lane), str(exc).splitlines()[0], version)
            return [f"{lane}@{table.version()}"]
        # A local table: each partition's file written by pyarrow and fsynced, then one commit of their add
        # actions. (delta-rs's own writer took 17 ms a commit at version 50 of a table and 37-73 ms at 300,
        # growing with the table; this took 13-20 ms up to version 300: docs/measurement-log.md.)
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
            values = {column: str(value) for column, value in partition_fields(partition).items()}
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
                write_deltalake(str(staging), with_partition_columns(table, partition), mode="append",
                                partition_by=list(columns), writer_properties=_WRITER)
                count += table.num_rows
        os.replace(path, path.with_name(f"{lane}.parquet-{time.strftime('%Y%m%d-%H%M%S')}"))
        os.replace(staging, path)
        moved[lane] = count
    return moved


_cache: dict[str, DeltaTable] = {}
_cache_lock = threading.Lock()


def snapshot(root: str | os.PathLike[str]) -> Snapshot:
    """The current version and data files of both span tables of the lake at ``root``.

    The tables are kept open per process and brought up to date incrementally (reading only the
    commits since the last call), so a snapshot costs about a millisecond. Files on object
    storage are listed by their ``s3://`` URIs, which a connection reads after ``attach_store``.
    """
    versions, files = {}, {}
    where = location(root)
    for lane in LANES:
        uri = where.table_uri(root, lane)
        with _cache_lock:
            table = refreshed(_cache, uri, lambda: open_table(root, lane, create=False))
            versions[lane] = table.version() if table is not None else -1
            files[lane] = readable_files(root, lane, table, where) if table is not None else []
    if where.uri:
        remove_mirror_once(root)  # the read copies an older Arclight kept
    return Snapshot(versions, files)


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
        out_versions[lane], files[lane] = version, readable_files(root, lane, table, where)
    return Snapshot(out_versions, files)


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
    paths relative to the lake root (a lake on object storage: their ``s3://`` URIs); {} for production traces.
    Recorded with an epoch, they reach its spans when the log of the version it read is gone (``LOG_RETENTION``);
    the files stay until vacuumed."""
    if run_id is None:
        return {}
    lane, _ = span_scope_filter(run_id, epoch)
    marker = f"/run_id={run_id}/" + ("" if epoch is None else f"epoch={epoch}/")
    base = Path(root).resolve()
    return {lane: [f if "://" in f else os.path.relpath(f, base) for f in snap.files[lane] if marker in f]}


def files_snapshot(root: str | os.PathLike[str], versions: dict[str, int], files: dict[str, list[str]]) -> Snapshot:
    """The snapshot of recorded files (``scope_files``): those lanes hold only these files, the others none. A file
    an older Arclight recorded as its read copy (``_mirror/<lane>/...``) is read from the store again."""
    base, where = Path(root).resolve(), location(root)

    def stored(lane: str, f: str) -> str:
        if "://" in f:
            return f
        if where.uri and f.startswith(f"_mirror/{lane}/"):
            return where.table_uri(root, lane).rstrip("/") + "/" + f[len(f"_mirror/{lane}/"):]
        return str(base / f)

    out = {lane: [stored(lane, f) for f in files.get(lane, [])] for lane in LANES}
    every = [f for lane_files in out.values() for f in lane_files]
    remote = [f for f in every if "://" in f]
    gone = [f for f in every if "://" not in f and not os.path.exists(f)]
    if remote:
        import pyarrow.fs as pafs

        fs, _ = arrow_filesystem(where)
        gone += [info.path for info in fs.get_file_info([f.split("://", 1)[1] for f in remote])
                 if info.type == pafs.FileType.NotFound]
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

