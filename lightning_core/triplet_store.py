"""Where the SQL pipeline's outputs live in the lake, how they are replaced, and how they are read.

Layout under the lake root (``R`` is ``_production`` for production traces, epoch 0)::

    triplets/run_id=R/epoch=E/policy=P/part-<ns>-<uuid>.parquet
    llm_calls/run_id=R/epoch=E/part-...      rewards/...      rollout_summary/...

Re-running a (run, epoch[, policy]) replaces only that folder: the new files are renamed into place
before the old files are removed, so a reader never finds the folder empty (in that instant it
may see both). Partition values live in the folder names, not in the files.
"""

from __future__ import annotations

import os
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from lightning_core import names
from lightning_core.durable import fsync_dir

PRODUCTION_RUN = "_production"
SCHEMA_RUN = "_schema"
OUTPUTS = ("llm_calls", "rewards", "rollout_summary")
# Columns of an output that its lake files leave out: the partition values (folder names) and, for
# llm_calls, the token arrays -- the triplets and the spans' typed columns hold those, so the
# stored calls keep counts (prompt_tokens, response_tokens) and messages only.
NOT_STORED = {"llm_calls": "run_id, epoch, prompt_token_ids, response_token_ids, response_logprobs"}
SQL_DIR = Path(__file__).resolve().parents[1] / "sql"

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
    ]
)
PARTITION_COLUMNS = ("run_id", "epoch", "policy")


def run_folder(run_id: str | None) -> str:
    """Return the run_id folder value (production traces have none)."""
    return PRODUCTION_RUN if run_id is None else run_id


def output_dir(lake_root: Path, output: str, *, run_id: str | None, epoch: int | None, policy: str | None = None) -> Path:
    """Return the folder of one output partition; names that are not valid folder names raise ``InvalidName``."""
    epoch = 0 if epoch is None else epoch
    if (run_id, epoch) != (SCHEMA_RUN, -1):  # the one reserved partition: empty typed files for the views
        run_id = None if run_id is None else names.check_run_id(run_id)
        epoch = names.check_epoch(epoch)
        policy = None if policy is None else names.check_policy_name(policy)
    folder = Path(lake_root) / output / f"run_id={run_folder(run_id)}" / f"epoch={epoch}"
    folder = folder / f"policy={policy}" if policy is not None else folder
    return names.inside(Path(lake_root) / output, folder, what="output folder")


def replace_partition(folder: Path, table: pa.Table, *, parts: int = 1) -> list[Path]:
    """Write ``table`` as the only files of ``folder``: new files durable first, then old files removed.

    ``parts`` > 1 splits the rows (in order) into that many files, encoded in parallel threads:
    pyarrow encodes one file on one core, and the triplets of a large epoch take seconds to encode.
    """
    folder.mkdir(parents=True, exist_ok=True)
    old = sorted(folder.glob("part-*.parquet"))
    parts = max(1, min(parts, table.num_rows))
    size = -(-table.num_rows // parts) if table.num_rows else 0
    stamp = time.time_ns()
    names = [f"part-{stamp}-{i:03d}-{uuid.uuid4().hex[:12]}.parquet" for i in range(parts)]

    def write(i: int) -> None:
        tmp = folder / f".{names[i]}.tmp"
        with open(tmp, "wb") as fh:
            pq.write_table(table.slice(i * size, size) if parts > 1 else table, fh, compression="zstd",
                           write_statistics=_statistics_columns(table.schema),
                           use_dictionary=_dictionary_columns(table.schema))
            fh.flush()
            os.fsync(fh.fileno())

    if parts == 1:
        write(0)
    else:
        with ThreadPoolExecutor(parts, thread_name_prefix="arclight-write") as pool:
            list(pool.map(write, range(parts)))  # re-raises the first error
    written = []
    for name in names:
        os.replace(folder / f".{name}.tmp", folder / name)
        written.append(folder / name)
    for path in old:
        path.unlink(missing_ok=True)
    fsync_dir(folder)
    return written


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
    """Cast a triplet table to ``TRIPLET_SCHEMA`` (column order and types of the contract)."""
    missing = [f.name for f in TRIPLET_SCHEMA if f.name not in table.column_names]
    if missing:
        raise ValueError(f"triplet table lacks contract columns {missing}; found {table.column_names}")
    return table.select(TRIPLET_SCHEMA.names).cast(TRIPLET_SCHEMA)


def load_triplets(config, *, run_id: str | None, epoch: int | None, policy: str) -> pa.Table:
    """Return the triplets of one (run, epoch, policy) with ``TRIPLET_SCHEMA``; empty when none were made."""
    folder = output_dir(config.lake.path, "triplets", run_id=run_id, epoch=epoch, policy=policy)
    files = sorted(folder.glob("part-*.parquet"))
    if not files:
        return TRIPLET_SCHEMA.empty_table()
    body = pa.concat_tables([pq.read_table(f) for f in files], promote_options="permissive")
    n = body.num_rows
    table = body.append_column("run_id", pa.array([run_id] * n, pa.string()))
    table = table.append_column("epoch", pa.array([epoch] * n, pa.int64()))
    table = table.append_column("policy", pa.array([policy] * n, pa.string()))
    return conform_triplets(table)


def lake_glob(lake_root: Path, output: str) -> str:
    """Return the glob of one output's files, as a quoted SQL literal."""
    depth = "*/*/*/*.parquet" if output == "triplets" else "*/*/*.parquet"
    text = str(Path(lake_root).resolve() / output / depth)
    return "'" + text.replace("'", "''") + "'"


def views_sql(lake_root: Path) -> str:
    """Return the DDL of the analyst views (sql/views.sql) for a lake."""
    text = (SQL_DIR / "views.sql").read_text()
    for output in ("triplets", *OUTPUTS):
        text = text.replace("{" + output + "}", lake_glob(lake_root, output))
    return text
