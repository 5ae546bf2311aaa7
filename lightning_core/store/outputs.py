"""The SQL pipeline's outputs: four Delta Lake tables in the lake folder, replaced one partition at a time.

Layout under the lake root (``R`` is ``_production`` for production traces, epoch 0)::

    triplets/_delta_log/...                                   (the table's commits)
    triplets/run_id=R/epoch=E/policy=P/part-<uuid>.zstd.parquet
    llm_calls/run_id=R/epoch=E/part-...      rewards/...      rollout_summary/...
    _schema/outputs/<output>/...                              (empty typed files: views bind before any run)

Re-running a (run, epoch[, policy]) replaces only that partition, in one Delta commit that removes
its old files and adds the new ones (an overwrite with partition filters): a reader of any table
version sees exactly one generation of every partition, and the replaced files stay on disk for
the lake's retention window (``vacuum``), so a query that listed them still reads them. Partition
values live in the folder names (and the Delta log), not in the files. The outputs always live in
the lake folder, also when the spans are on object storage: one pipeline process writes them.
"""

from __future__ import annotations

import os
import random
import shutil
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from importlib import resources
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from deltalake import CommitProperties, DeltaTable
from deltalake.exceptions import CommitFailedError

from lightning_core import names
from lightning_core.common.durable import fsync_dir, fsync_file
from lightning_core.store.delta import LakeFormatError, add_action, commit_durably, create_table, refreshed, update

PRODUCTION_RUN = "_production"
SCHEMA_RUN = "_schema"
OUTPUTS = ("llm_calls", "rewards", "rollout_summary")
TABLES = ("triplets", *OUTPUTS)  # every output table, in the order the views are made
# Columns of an output that its lake files leave out: the partition values (folder names) and, for
# llm_calls, the token arrays -- the triplets and the spans' typed columns hold those, so the
# stored calls keep counts (prompt_tokens, response_tokens) and messages only.
NOT_STORED = {"llm_calls": "run_id, epoch, prompt_token_ids, response_token_ids, response_logprobs"}
# the analyst views over the output tables: sql/views.sql, package data (lightning_core.sql) that a wheel finds
VIEWS_SQL = resources.files("lightning_core.sql") / "views.sql"

# The row contract the trainer reads (load_triplets). Extra columns may follow, never fewer.
TRIPLET_SCHEMA = pa.schema(
    [
        ("run_id", pa.string()),
        ("epoch", pa.int64()),
        ("policy", pa.string()),
        ("rollout_id", pa.string()),
        ("task_id", pa.string()),
        ("group_id", pa.string()),
        ("attempt", pa.int64()),
        ("agent_name", pa.string()),
        ("turn_index", pa.int64()),
        ("trace_id", pa.string()),
        ("span_id", pa.string()),
        ("start_ns", pa.int64()),
        ("prompt_token_ids", pa.list_(pa.int32())),
        ("response_token_ids", pa.list_(pa.int32())),
        ("response_logprobs", pa.list_(pa.float64())),
        ("prompt_messages", pa.string()),
        ("response_text", pa.string()),
        ("reward", pa.float64()),
        ("advantage", pa.float64()),
        ("policy_version", pa.string()),
        ("model", pa.string()),
        ("flags", pa.list_(pa.string())),
        ("rollout_return", pa.float64()),
        ("end_ns", pa.int64()),
        ("response_id", pa.string()),
        ("rollout_advantage", pa.float64()),  # the group-normalised outcome advantage (sql/advantages.sql)
        ("turn_advantage", pa.float64()),  # pipeline.advantage = turn: the call's own term; NULL under rollout
    ]
)
# Contract columns a later version added: triplets written before them read them as NULL.
ADDED_TRIPLET_COLUMNS = ("rollout_advantage", "turn_advantage")
PARTITION_COLUMNS = ("run_id", "epoch", "policy")




def partition_columns(output: str) -> tuple[str, ...]:
    """The output table's partition columns (the triplets add the policy)."""
    return PARTITION_COLUMNS if output == "triplets" else PARTITION_COLUMNS[:2]


PARTITION_TYPES = {"run_id": pa.string(), "epoch": pa.int64(), "policy": pa.string()}


def run_folder(run_id: str | None) -> str:
    """Return the run_id folder value (production traces have none)."""
    return PRODUCTION_RUN if run_id is None else run_id


def partition_values(output: str, *, run_id: str | None, epoch: int | None, policy: str | None = None) -> dict[str, str]:
    """The partition's values as stored (folder names, Delta partition values); invalid names raise ``InvalidName``."""
    if output not in TABLES:
        raise ValueError(f"unknown output {output!r}: the lake has {list(TABLES)}")
    epoch = 0 if epoch is None else epoch
    if (run_id, epoch) != (SCHEMA_RUN, -1):  # the one reserved partition: the empty typed files of the views
        run_id = None if run_id is None else names.check_run_id(run_id)
        epoch = names.check_epoch(epoch)
        policy = None if policy is None else names.check_policy_name(policy)
    values = {"run_id": run_folder(run_id), "epoch": str(epoch)}
    if output == "triplets":
        if policy is None:
            raise ValueError("a triplets partition names its policy")
        values["policy"] = policy
    return values


def output_dir(lake_root: Path, output: str, *, run_id: str | None, epoch: int | None, policy: str | None = None) -> Path:
    """Return the folder of one output partition; names that are not valid folder names raise ``InvalidName``."""
    values = partition_values(output, run_id=run_id, epoch=epoch, policy=policy)
    folder = table_path(lake_root, output).joinpath(*(f"{c}={v}" for c, v in values.items()))
    return names.inside(table_path(lake_root, output), folder, what="output folder")


def table_path(lake_root: Path, output: str) -> Path:
    """The folder of one output's Delta table."""
    return Path(lake_root).resolve() / output


def schema_file(lake_root: Path, output: str) -> Path:
    """The empty typed file of an output's columns, outside its table, so its view binds before any run."""
    folder = Path(lake_root).resolve() / "_schema" / "outputs" / output / "run_id=_schema" / "epoch=-1"
    return (folder / "policy=_schema" if output == "triplets" else folder) / "part-0-schema.parquet"


def write_schema_file(lake_root: Path, output: str, table: pa.Table) -> None:
    """Place the empty typed file of ``table``'s columns (its rows are not stored)."""
    target = schema_file(lake_root, output)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    pq.write_table(drop_partition_columns(table.schema.empty_table()), tmp)
    os.replace(tmp, target)


# Tables kept open per process (each brought up to date by reading only the new commits): readers share
# one set, under a lock held from the update to the listing of files; writers have their own.
_readers: dict[str, DeltaTable] = {}
_writers: dict[str, DeltaTable] = {}
_readers_lock, _writers_lock = threading.RLock(), threading.Lock()


def open_output(lake_root: Path, output: str, *, version: int | None = None) -> DeltaTable | None:
    """The output's Delta table, newest (kept open per process) or at ``version``; None when it does not
    exist yet. A folder of the Parquet outputs of an older Arclight raises ``LakeFormatError``."""
    if version is not None:
        return DeltaTable(str(table_path(lake_root, output)), version=version)
    with _readers_lock:
        return _current(_readers, lake_root, output)


def _current(cache: dict[str, DeltaTable], lake_root: Path, output: str) -> DeltaTable | None:
    """The output's table from ``cache`` brought up to date (the caller holds the cache's lock)."""
    path = table_path(lake_root, output)
    return refreshed(cache, str(path), lambda: _open_new(lake_root, path))


def _open_new(lake_root: Path, path: Path) -> DeltaTable | None:
    if DeltaTable.is_deltatable(str(path)):
        return DeltaTable(str(path))
    if path.is_dir() and any(path.rglob("part-*.parquet")):
        raise LakeFormatError(
            f"{path} holds the Parquet outputs of Arclight before the Delta store: convert them once with "
            f"`arclight migrate-lake --lake {Path(lake_root)}` (or delete the folder: "
            "`arclight triplets` makes them again from the spans)")
    return None


def _table_schema(output: str, data: pa.Schema) -> pa.Schema:
    """The Delta schema of an output whose files have ``data``'s columns: those, then the partition columns."""
    schema = drop_partition_columns(data.empty_table()).schema.remove_metadata()
    for column in partition_columns(output):
        schema = schema.append(pa.field(column, PARTITION_TYPES[column]))
    return schema


def replace_partition(lake_root: Path, output: str, table: pa.Table, *, run_id: str | None, epoch: int | None,
                      policy: str | None = None, parts: int = 1) -> list[Path]:
    """Make ``table`` the only rows of one output partition, in one Delta commit; return the files written.

    The new files are written and made durable first; the commit then removes the partition's
    old files from the table and adds them (``vacuum`` deletes the old ones after the retention
    window). ``parts`` > 1 splits the rows (in order) into that many files, encoded in parallel
    threads: pyarrow encodes one file on one core, and the triplets of a large epoch take seconds.
    Columns the table does not have yet are added to its schema (an upgrade that adds a column).
    """
    values = partition_values(output, run_id=run_id, epoch=epoch, policy=policy)
    folder = output_dir(lake_root, output, run_id=run_id, epoch=epoch, policy=policy)
    table = drop_partition_columns(table)
    with _writers_lock:  # one commit at a time through this process's table objects
        return _replace(lake_root, output, table, values, folder, parts)


def _replace(lake_root: Path, output: str, table: pa.Table, values: dict[str, str], folder: Path, parts: int) -> list[Path]:
    delta = _current(_writers, lake_root, output)
    if delta is None:
        create_table(str(table_path(lake_root, output)), _table_schema(output, table.schema),
                     partition_by=list(partition_columns(output)))
        delta = _current(_writers, lake_root, output)
    _merged_schema(delta, output, table.schema)  # columns that cannot fit fail before any file is written
    folder.mkdir(parents=True, exist_ok=True)
    parts = max(1, min(parts, table.num_rows))
    size = -(-table.num_rows // parts) if table.num_rows else 0
    files = [folder / f"part-{i:05d}-{uuid.uuid4()}-c000.zstd.parquet" for i in range(parts)] if table.num_rows else []

    def write(i: int) -> None:
        pq.write_table(table.slice(i * size, size) if parts > 1 else table, files[i], compression="zstd",
                       write_statistics=_statistics_columns(table.schema),
                       use_dictionary=_dictionary_columns(table.schema))
        fsync_file(files[i])

    if len(files) == 1:
        write(0)
    elif files:
        with ThreadPoolExecutor(parts, thread_name_prefix="arclight-write") as pool:
            list(pool.map(write, range(parts)))  # re-raises the first error
    fsync_dir(folder)
    root = table_path(lake_root, output)
    actions = [add_action(root, path, values, min(size, table.num_rows - i * size)) for i, path in enumerate(files)]
    for attempt in range(COMMIT_ATTEMPTS):
        try:
            commit_durably(delta, root, actions, mode="overwrite", schema=_merged_schema(delta, output, table.schema),
                           partition_by=list(partition_columns(output)),
                           partition_filters=[(c, "=", v) for c, v in values.items()],
                           commit_properties=CommitProperties(custom_metadata={"arclight.output": output}))
            break
        except CommitFailedError:
            # Another process committed to the table meanwhile (delta-rs 1.6 refuses an overwrite after any
            # concurrent removal, even of another partition). The files are written: commit them again on
            # the new version; of two replaces of one partition, the later commit wins.
            if attempt == COMMIT_ATTEMPTS - 1:
                raise
            time.sleep(random.uniform(0.005, 0.02) * (attempt + 1))
            update(delta)
    return files


COMMIT_ATTEMPTS = 20


def _merged_schema(delta: DeltaTable, output: str, data: pa.Schema):
    """The table's schema, with the columns of ``data`` it lacks added; ``LakeFormatError`` if they cannot fit."""
    schema = delta.schema().to_arrow()
    wanted = _table_schema(output, data)
    if set(wanted.names) <= set(schema.names):
        return schema
    try:
        return pa.unify_schemas([pa.schema(schema), wanted])
    except (pa.ArrowTypeError, pa.ArrowInvalid) as exc:
        raise LakeFormatError(
            f"{output}: the new rows' columns do not fit the table's ({exc}); convert or delete "
            f"{delta.table_uri} (`arclight triplets` makes it again from the spans)") from None


def vacuum(lake_root: Path, *, retention_hours: int) -> dict[str, list[str]]:
    """Delete the output files that left their table more than ``retention_hours`` ago (and orphans of
    commits that never happened, once as old); return them per output."""
    removed = {}
    for output in TABLES:
        delta = open_output(lake_root, output)
        if delta is not None:
            removed[output] = delta.vacuum(retention_hours=retention_hours, dry_run=False,
                                           enforce_retention_duration=False, full=True)
    return removed


def snapshot(lake_root: Path, versions: dict[str, int] | None = None) -> dict[str, tuple[int, list[str]]]:
    """Each output's table version and data files: the newest, or those of ``versions`` (per output; -1 is before
    the table existed). An output with no table yet is at version -1 with no files."""
    versions = versions or {}
    unknown = set(versions) - set(TABLES)
    if unknown:
        raise ValueError(f"unknown output tables {sorted(unknown)}: the lake has {list(TABLES)}")
    result = {}
    for output in TABLES:
        with _readers_lock:  # no other thread moves the table between its version and its files
            current = open_output(lake_root, output)
            newest = current.version() if current is not None else -1
            version = versions.get(output, newest)
            if version == newest:
                result[output] = (version, current.file_uris() if current is not None else [])
                continue
        if not -1 <= version < newest:
            raise ValueError(f"{output} has versions 0..{newest}, not {version}")
        result[output] = (version, open_output(lake_root, output, version=version).file_uris() if version >= 0 else [])
    return result


def migrate(lake_root: Path) -> dict[str, int]:
    """Convert the Parquet outputs of an older Arclight into the output tables; return rows per output.

    Each partition folder's files become that partition of a new table built beside the lake
    (``.migrate-outputs``); then the old folder moves aside to ``<output>.parquet-<timestamp>``
    (delete it once you have checked) and the table takes its place. An output that is already a
    Delta table, or that has no folder, is left alone.
    """
    lake_root = Path(lake_root).resolve()
    staging = lake_root / ".migrate-outputs"
    moved: dict[str, int] = {}
    for output in TABLES:
        path = table_path(lake_root, output)
        if DeltaTable.is_deltatable(str(path)) or not path.is_dir():
            continue
        folders: dict[Path, list[Path]] = {}
        for file in sorted(path.rglob("part-*.parquet")):
            if not any(p.startswith(".") for p in file.relative_to(path).parts):  # not a half-written file
                folders.setdefault(file.parent, []).append(file)
        if (staging / output).exists():
            shutil.rmtree(staging / output)  # a migration that stopped half-way
        count = 0
        for folder, files in folders.items():
            values = dict(part.split("=", 1) for part in folder.relative_to(path).parts)
            if values.get("run_id") == SCHEMA_RUN:
                continue  # the old empty files of the views (now in _schema/outputs)
            rows = pa.concat_tables([drop_partition_columns(pq.read_table(f)) for f in files], promote_options="permissive")
            run_id = None if values["run_id"] == PRODUCTION_RUN else values["run_id"]
            replace_partition(staging, output, rows, run_id=run_id, epoch=int(values["epoch"]), policy=values.get("policy"))
            count += rows.num_rows
        os.replace(path, path.with_name(f"{output}.parquet-{time.strftime('%Y%m%d-%H%M%S')}"))
        if (staging / output).exists():  # else it held no rows: the table is made by the next pipeline run
            os.replace(staging / output, path)
        moved[output] = count
    if staging.exists():
        shutil.rmtree(staging)
    return moved


def _partition_files(delta: DeltaTable, folder: Path) -> list[str]:
    """The table version's files of one partition (the writer puts them in the partition's folder)."""
    prefix = str(folder) + os.sep
    return sorted(f for f in delta.file_uris() if f.startswith(prefix))


def _statistics_columns(schema: pa.Schema) -> list[str]:
    """Columns that get min/max statistics: the scalar ones readers filter on, not token lists or long text."""
    return [f.name for f in schema
            if not pa.types.is_list(f.type) and f.name not in ("prompt_messages", "response_text", "attributes")]


def _dictionary_columns(schema: pa.Schema) -> list[str]:
    """Columns that get dictionary encoding: not numeric lists (token ids, logprobs), which zstd packs
    about as well at half the encoding time."""
    return [f.name for f in schema
            if not (pa.types.is_list(f.type) and (pa.types.is_integer(f.type.value_type) or pa.types.is_floating(f.type.value_type)))]


def drop_partition_columns(table: pa.Table) -> pa.Table:
    """Remove the columns that the folder names carry."""
    return table.drop_columns([c for c in PARTITION_COLUMNS if c in table.column_names])


def conform_triplets(table: pa.Table) -> pa.Table:
    """Cast a triplet table to ``TRIPLET_SCHEMA`` (column order and types of the contract; the columns a later
    version added, ``ADDED_TRIPLET_COLUMNS``, are NULL where the table lacks them)."""
    for name in ADDED_TRIPLET_COLUMNS:
        if name not in table.column_names:
            table = table.append_column(name, pa.nulls(table.num_rows, TRIPLET_SCHEMA.field(name).type))
    missing = [f.name for f in TRIPLET_SCHEMA if f.name not in table.column_names]
    if missing:
        raise ValueError(f"triplet table lacks contract columns {missing}; found {table.column_names}")
    return table.select(TRIPLET_SCHEMA.names).cast(TRIPLET_SCHEMA)


def load_triplets(config, *, run_id: str | None, epoch: int | None, policy: str) -> pa.Table:
    """Return the triplets of one (run, epoch, policy) with ``TRIPLET_SCHEMA``; empty when none were made."""
    folder = output_dir(config.lake.path, "triplets", run_id=run_id, epoch=epoch, policy=policy)
    delta = open_output(config.lake.path, "triplets")
    files = _partition_files(delta, folder) if delta is not None else []
    if not files:
        return TRIPLET_SCHEMA.empty_table()
    body = pa.concat_tables([drop_partition_columns(pq.read_table(f)) for f in files], promote_options="permissive")
    n = body.num_rows
    table = body.append_column("run_id", pa.array([run_id] * n, pa.string()))
    table = table.append_column("epoch", pa.array([epoch] * n, pa.int64()))
    table = table.append_column("policy", pa.array([policy] * n, pa.string()))
    return conform_triplets(table)


def _file_list(paths) -> str:
    return "[" + ", ".join("'" + str(p).replace("'", "''") + "'" for p in paths) + "]"


def views_sql(lake_root: Path, versions: dict[str, int] | None = None) -> str:
    """Return the DDL of the analyst views (``sql/views.sql``) over one snapshot of the output tables (the newest,
    or ``versions``); empty before the outputs' schema files exist (``pipeline.ensure_views`` places them)."""
    if not all(schema_file(lake_root, output).exists() for output in TABLES):
        return ""
    text = VIEWS_SQL.read_text()
    for output, (_, files) in snapshot(lake_root, versions).items():
        text = text.replace("{" + output + "}", _file_list([schema_file(lake_root, output), *files]))
    return text
