"""The catalog: the pipeline's state tables as Delta tables, and the span views over lake snapshots.

The spans live in the lake's Delta tables (``lightning_core.store.spans``); ``view_sql`` makes views
over one snapshot of them, and ``outputs.views_sql`` the views of the pipeline's outputs
(also Delta tables). The state (runs, epochs, rollouts, policy_versions, prompt_versions,
agent_epochs) is one Delta table per name under ``<catalog>.state/`` (by default
``<lake>/catalog.state/``): ``Catalog.write()`` hands out an in-memory DuckDB connection over the
current state and commits the tables the block changed; ``Catalog.read()`` and analysts
(``lightning_core.analyst.connect``) load the newest committed state and hold nothing on disk,
so no reader can hold up a writer. Polars reads the tables natively
(``pl.scan_delta("<lake>/catalog.state/epochs")``).
"""

from __future__ import annotations

import contextlib
import os
import re
import threading
import time
import uuid
from pathlib import Path
from typing import Iterator

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq
from deltalake import DeltaTable

from lightning_core.common.durable import fsync_dir, fsync_file
from lightning_core.store.delta import (CHECKPOINT_EVERY, add_action, clean_log, commit_durably, create_table,
                                        ensure_properties, refreshed, table_properties)
from lightning_core.store.span_schema import SCHEMA_RUN, ensure_schema_files, schema_file
from lightning_core.store.spans import Snapshot
from lightning_core.store.location import attach_store, set_location
from lightning_core.store.spans import snapshot as lake_snapshot
from lightning_core.store.outputs import views_sql as output_views_sql


STATE_TABLE_NAMES = ("runs", "epochs", "rollouts", "policy_versions", "prompt_versions", "agent_epochs")
STATE_TABLES = """
CREATE TABLE IF NOT EXISTS runs (
    run_id      VARCHAR PRIMARY KEY,
    project     VARCHAR,
    config      JSON,
    created_at  TIMESTAMPTZ DEFAULT current_timestamp
);
CREATE TABLE IF NOT EXISTS epochs (
    run_id          VARCHAR,
    epoch           BIGINT,
    status          VARCHAR,        -- planned | rollouts_done | triplets_done | trained | completed | failed
    policy_version  VARCHAR,        -- the version that served this epoch's rollouts
    new_version     VARCHAR,        -- the version this epoch's training produced
    stats           JSON,
    started_at      TIMESTAMPTZ DEFAULT current_timestamp,
    finished_at     TIMESTAMPTZ,
    PRIMARY KEY (run_id, epoch)
);
CREATE TABLE IF NOT EXISTS rollouts (
    run_id        VARCHAR,
    epoch         BIGINT,
    rollout_id    VARCHAR PRIMARY KEY,
    task_id       VARCHAR,
    group_id      VARCHAR,
    sample_index  BIGINT,
    attempt       BIGINT DEFAULT 0,
    status        VARCHAR,          -- planned | succeeded | failed | timed_out
    error         VARCHAR,
    reward        DOUBLE,
    started_at    TIMESTAMPTZ,
    finished_at   TIMESTAMPTZ,
    task          JSON,             -- the dataset row the agent got
    mode          VARCHAR DEFAULT 'train'  -- train | eval
);
CREATE TABLE IF NOT EXISTS policy_versions (
    version         VARCHAR PRIMARY KEY,
    policy          VARCHAR DEFAULT 'default',
    parent_version  VARCHAR,
    run_id          VARCHAR,
    epoch           BIGINT,
    path            VARCHAR,
    metrics         JSON,
    created_at      TIMESTAMPTZ DEFAULT current_timestamp
);
-- Added by the trainer (issue 5); ALTERs keep catalogs made before it readable and writable.
ALTER TABLE policy_versions ADD COLUMN IF NOT EXISTS kind VARCHAR;            -- lora | full
ALTER TABLE policy_versions ADD COLUMN IF NOT EXISTS base_model VARCHAR;      -- folder of the base weights
ALTER TABLE policy_versions ADD COLUMN IF NOT EXISTS mlflow_run_id VARCHAR;
ALTER TABLE policy_versions ADD COLUMN IF NOT EXISTS registry_version VARCHAR; -- MLflow model registry version
-- Dynamic sampling (issue 14): which round drew a rollout's task, and each epoch's sampling counts.
ALTER TABLE rollouts ADD COLUMN IF NOT EXISTS sampling_round BIGINT DEFAULT 0;
ALTER TABLE epochs ADD COLUMN IF NOT EXISTS tasks_sampled BIGINT;       -- tasks (groups) drawn, all rounds
ALTER TABLE epochs ADD COLUMN IF NOT EXISTS informative_groups BIGINT;  -- groups whose rewards differ (they train)
ALTER TABLE epochs ADD COLUMN IF NOT EXISTS skipped_groups BIGINT;      -- groups with all-equal rewards (no gradient)
ALTER TABLE epochs ADD COLUMN IF NOT EXISTS sampling_rounds BIGINT;
-- Prompts as versioned resources (issue 20): every version of every named prompt, one serving each.
CREATE TABLE IF NOT EXISTS prompt_versions (
    version         VARCHAR PRIMARY KEY,  -- <name>-v<number>
    name            VARCHAR,
    number          BIGINT,
    text            VARCHAR,
    parent_version  VARCHAR,              -- the version it was edited from
    score           DOUBLE,               -- latest mean reward while prompt optimisation scored it
    score_tasks     BIGINT,               -- rollouts that score is over
    made_by         VARCHAR,              -- config | critic | scripted
    critique        VARCHAR,              -- the textual gradient it applies
    run_id          VARCHAR,              -- the optimisation run that made it
    round           BIGINT,
    serving         BOOLEAN DEFAULT false,
    created_at      TIMESTAMPTZ DEFAULT current_timestamp
);
ALTER TABLE rollouts ADD COLUMN IF NOT EXISTS prompt_versions JSON;   -- name -> version the rollout ran with
-- Whose failure it was (issue 40): agent | timeout | infrastructure. Infrastructure failures (our gateway, vLLM
-- or collector down or failing) run again once the service is back; their groups never train (sql/triplets.sql).
ALTER TABLE rollouts ADD COLUMN IF NOT EXISTS error_kind VARCHAR;
ALTER TABLE rollouts ADD COLUMN IF NOT EXISTS infra_failures BIGINT DEFAULT 0;  -- attempts our services failed
-- model-call spans the gateway recorded for the stored attempt (what the lake should hold; NULL: not known)
ALTER TABLE rollouts ADD COLUMN IF NOT EXISTS gateway_spans BIGINT;
ALTER TABLE epochs ADD COLUMN IF NOT EXISTS incidents JSON;  -- outages and restarts of our services during the epoch
-- Asynchronous epochs (issue 43): when the epoch trained, so that overlapping epochs show as they ran (the next
-- epoch's started_at falls before this one's train_finished_at), and the staleness its training saw.
ALTER TABLE epochs ADD COLUMN IF NOT EXISTS train_started_at TIMESTAMPTZ;
ALTER TABLE epochs ADD COLUMN IF NOT EXISTS train_finished_at TIMESTAMPTZ;
ALTER TABLE epochs ADD COLUMN IF NOT EXISTS staleness_max BIGINT;  -- most versions a trained triplet was behind
-- vLLM against the trainer (issue 56): at the epoch's first GRPO step, before any update, the mean and largest
-- |trainer logprob - recorded logprob| of the response tokens, and the share of tokens its first micro-batch clipped
ALTER TABLE epochs ADD COLUMN IF NOT EXISTS logprob_gap_mean DOUBLE;
ALTER TABLE epochs ADD COLUMN IF NOT EXISTS logprob_gap_max DOUBLE;
ALTER TABLE epochs ADD COLUMN IF NOT EXISTS clipped_first DOUBLE;  -- ppo only: under decoupled the ratio is 1 there
-- (issue 68) at the epoch's first step: the share of tokens plain PPO's ratio pi_theta / pi_behaviour clips (under
-- ppo: did; under decoupled: would have), and under decoupled the share whose behaviour weight pi_prox / pi_behaviour
-- reached importance_cap and the mean weight
ALTER TABLE epochs ADD COLUMN IF NOT EXISTS ppo_clipped_first DOUBLE;
ALTER TABLE epochs ADD COLUMN IF NOT EXISTS behaviour_capped_first DOUBLE;
ALTER TABLE epochs ADD COLUMN IF NOT EXISTS behaviour_weight_first DOUBLE;
ALTER TABLE epochs ADD COLUMN IF NOT EXISTS behaviour_correction VARCHAR;  -- ppo | decoupled (the versions' own)
-- Collapse signals (issue 70): the policy's mean entropy per sampled response token over the epoch's GRPO steps (the
-- lowest over its policies); the lake-side signals (sql/epoch_signals.sql) are in stats.signals
ALTER TABLE epochs ADD COLUMN IF NOT EXISTS entropy DOUBLE;
-- The epoch's rollouts as MLflow traces (issue 54): published, already there, left by the time budget, seconds, error
ALTER TABLE epochs ADD COLUMN IF NOT EXISTS traces JSON;
-- Per-agent reporting (issue 18): one row per (run, epoch, agent) of the training rollouts, replaced
-- whenever the epoch's triplets are made (sql/agent_epochs.sql plus the config's agent selection).
CREATE TABLE IF NOT EXISTS agent_epochs (
    run_id        VARCHAR,
    epoch         BIGINT,
    agent_name    VARCHAR,              -- NULL: calls owned by no agent span
    policy        VARCHAR,              -- the policies that train it (comma-separated); NULL = frozen
    calls         BIGINT,               -- model calls outside reward functions
    rollouts      BIGINT,               -- rollouts it took part in
    triplets      BIGINT,               -- of its calls, those that became training samples
    reward_mean   DOUBLE,               -- mean final reward of those rollouts
    success_rate  DOUBLE                -- share of those rollouts with reward >= trainer.success_reward
);
"""


def _quote(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def _file_list(paths) -> str:
    return "[" + ", ".join(_quote(str(p)) for p in paths) + "]"


def view_sql(lake_root: Path, snapshot: Snapshot | None = None, *, temporary: bool = False) -> str:
    """Return the DDL of the span views over one snapshot of the lake at ``lake_root`` (an absolute path).

    The views list the data files of one version of each span table (``lake.snapshot``; the
    current one by default), so every query on them sees that version, however the collector
    writes and compacts meanwhile. ``temporary`` makes them connection-local (TEMP views), which
    a read-only catalog connection can create too.
    """
    snapshot = snapshot or lake_snapshot(lake_root)
    ensure_schema_files(Path(lake_root))
    training = _file_list([schema_file(lake_root, "training"), *snapshot.files["training"]])
    production = _file_list([schema_file(lake_root, "production"), *snapshot.files["production"]])
    view = "TEMP VIEW" if temporary else "VIEW"
    return f"""
-- One row per span file row, exactly as stored (every file of a Delta table has the table's
-- columns, so no union_by_name: binding reads one footer, and a filter on the partition
-- columns skips the other files unopened); partition values from the folder names, and the
-- row's place (filename, file_row_number), which identifies one stored copy of a span; file_index
-- numbers the files one scan of one branch reads (the pipeline's span numbers are built on it).
-- The empty schema files (run _schema, date 1970-01-01) hold no rows; spans that really started
-- on 1970-01-01 (a clock at zero) share that folder and must stay visible.
CREATE OR REPLACE {view} spans_raw AS
SELECT *, file_index FROM read_parquet({training}, hive_partitioning = true,
                           filename = true, file_row_number = true,
                           hive_types = {{'run_id': VARCHAR, 'epoch': BIGINT}})
WHERE run_id <> '{SCHEMA_RUN}'
UNION ALL BY NAME
SELECT *, file_index, NULL::VARCHAR AS run_id, NULL::BIGINT AS epoch
FROM read_parquet({production}, hive_partitioning = true,
                  filename = true, file_row_number = true, hive_types = {{'date': VARCHAR}});

-- One row per span, each (trace_id, span_id) once per partition (a sender's retry or a collector's
-- restart stores a span twice in its partition; the first copy received is kept; the partition
-- columns lead the window, so a filter on run_id/epoch still prunes files): ids, name, times (ns and timestamps),
-- status, attributes/resource/events as JSON, the rollout context, the columns promoted at ingest
-- (span_kind, agent_name, response_id, reward_value; agent_name also from gen_ai.agent.name and from
-- OpenInference's graph.node.id on AGENT spans) and the gateway's token ids and logprobs
-- (stored typed, not in attributes).
CREATE OR REPLACE {view} spans AS
SELECT
    run_id, epoch, rollout_id, task_id, attempt,
    trace_id, span_id, parent_id, name, kind,
    start_ns, end_ns,
    make_timestamp_ns(start_ns) AS start_time,
    make_timestamp_ns(end_ns) AS end_time,
    (end_ns - start_ns) / 1e6 AS duration_ms,
    status_code, status_message,
    attributes::JSON AS attributes,
    events::JSON AS events,
    links::JSON AS links,
    resource::JSON AS resource,
    service_name, scope_name, scope_version,
    span_kind,
    -- agent.name (promoted at ingest), else OpenTelemetry GenAI's gen_ai.agent.name, else the name OpenInference
    -- puts on its AGENT spans (graph.node.id)
    coalesce(agent_name, json_extract_string(attributes, '$."gen_ai.agent.name"'),
             CASE WHEN json_extract_string(attributes, '$."openinference.span.kind"') = 'AGENT'
                  THEN json_extract_string(attributes, '$."graph.node.id"') END) AS agent_name,
    json_extract_string(attributes, '$."gen_ai.operation.name"') AS gen_ai_operation,
    response_id, reward_value,
    prompt_token_ids, response_token_ids, response_logprobs,
    date AS production_date,
    received_ns
FROM spans_raw
QUALIFY row_number() OVER (PARTITION BY run_id, epoch, date, trace_id, span_id
                          ORDER BY received_ns, filename, file_row_number) = 1;
"""


class WriteRefused(ValueError):
    """A statement given to a read-only command that would write (a file, a table, a setting)."""


_ANALYZE = re.compile(r"\bANALY[SZ]E\b", re.IGNORECASE)


def refuse_writes(con: duckdb.DuckDBPyConnection, sql: str) -> None:
    """Raise ``WriteRefused`` unless every statement in ``sql`` only reads.

    A read-only connection still lets ``COPY ... TO``, ``EXPORT DATABASE``, ``ATTACH`` and
    ``EXPLAIN ANALYZE COPY`` write files; only queries (SELECT, WITH, FROM, VALUES, DESCRIBE,
    SHOW, SUMMARIZE) and EXPLAIN of them pass.
    """
    for statement in con.extract_statements(sql):
        kind = statement.type.name
        if kind == "EXPLAIN" and _ANALYZE.search(statement.query):  # EXPLAIN ANALYZE runs what it explains
            inner = statement.query[_ANALYZE.search(statement.query).end():]
            try:
                kind = "SELECT" if all(s.type.name == "SELECT" for s in con.extract_statements(inner)) else "EXPLAIN ANALYZE"
            except duckdb.Error:
                kind = "EXPLAIN ANALYZE"
        if kind not in ("SELECT", "EXPLAIN"):
            raise WriteRefused(
                f"the catalog is opened read-only here: {kind} statements are refused, only queries run "
                f"(found {statement.query.strip()[:80]!r}); to export, query from DuckDB or Python yourself")


class Catalog:
    """The lake's state tables (Delta tables under ``state_root``) and the connections that read and change them.

    ``write()`` yields an in-memory DuckDB connection holding the current state (with its keys and
    defaults, ``STATE_TABLES``); when the block ends without an error, each table whose rows
    changed is replaced in one Delta commit (made durable before ``write`` returns). Writers take
    turns (a lock per process and a lock file across processes); readers never wait: ``read()``
    loads the newest committed state. ``path`` is the DuckDB catalog file of Arclight before the
    Delta state: the first use of the lake moves its rows into the tables.
    """

    def __init__(self, lake_root: str | Path, catalog_path: str | Path | None = None, *,
                 memory_limit: str | None = None, threads: int | None = None):
        self.lake_root = Path(lake_root).resolve()
        self.path = Path(catalog_path) if catalog_path else self.lake_root / "catalog.duckdb"
        self.state_root = self.path.with_suffix(".state").resolve()
        self.memory_limit = memory_limit
        self.threads = threads

    @classmethod
    def from_config(cls, config) -> "Catalog":
        """Build the catalog named by an ``ArclightConfig``."""
        lake = config.lake
        set_location(lake.path, lake.spans_uri, lake.storage_options)  # so every reader of the folder finds the spans
        return cls(lake.path, lake.catalog_path, memory_limit=lake.duckdb_memory_limit, threads=lake.duckdb_threads)

    def ensure(self) -> None:
        """Create the lake folder and the state folder, moving the state of an older catalog file in (idempotent)."""
        self.lake_root.mkdir(parents=True, exist_ok=True)
        ensure_schema_files(self.lake_root)
        self.state_root.mkdir(parents=True, exist_ok=True)
        self.lake_id()
        self.load_sql()

    def lake_id(self) -> str:
        """This lake's id: 32 hex digits made once, when its state folder is first used (a lake made before lake ids
        gets one then), and kept in it (``<state>/lake_id``). What it names in a store shared with other lakes -- MLflow
        runs, model versions and traces, tagged ``arclight.lake`` -- is this lake's: a lake made again after
        ``rm -rf .arclight``, or another user's of the same project, has its own."""
        path = self.state_root / LAKE_ID_FILE
        if not path.is_file():
            self.state_root.mkdir(parents=True, exist_ok=True)
            made = self.state_root / f".{LAKE_ID_FILE}.{os.getpid()}.{uuid.uuid4().hex}"
            made.write_text(uuid.uuid4().hex + "\n")
            fsync_file(made)
            try:
                os.link(made, path)  # the first to make one wins; the others read it back
            except FileExistsError:
                pass
            finally:
                made.unlink()
            fsync_dir(self.state_root)
        text = path.read_text().strip()
        if not re.fullmatch(r"[0-9a-f]{32}", text):
            raise ValueError(f"{path} should hold this lake's id, 32 hex digits; found {text[:80]!r}: remove the file "
                             "and a new id is made (MLflow runs, model versions and traces tagged with the old one are "
                             "then another lake's)")
        return text

    def load_sql(self) -> str:
        """SQL that makes the state tables with their newest committed rows (``state_sql``); the state of an
        older catalog file is moved in first."""
        if self.path.is_file() and not (self.state_root / MIGRATED_MARK).exists():
            with self.write():
                pass  # write() moves the file's rows in
        return state_sql(self.state_root)

    @contextlib.contextmanager
    def write(self, *, timeout_s: float = 60.0, spans: bool = False) -> Iterator[duckdb.DuckDBPyConnection]:
        """A connection over the current state; the tables it changed are committed when the block ends.

        An error in the block commits nothing. Another writer of the same state waits (up to
        ``timeout_s``); a write inside a write of the same thread shares its connection. With
        ``spans``, the connection also has the span and output views over the lake's current
        snapshot, for a statement that updates state from the spans.
        """
        key = str(self.state_root)
        local = _writing.__dict__.setdefault("open", {})
        if key in local:  # nested: the outer block commits
            con = local[key]
            if spans:
                _temporary_views(con, self.lake_root)
            yield con
            return
        self.state_root.mkdir(parents=True, exist_ok=True)
        with _process_lock(self.state_root), _file_lock(self.state_root / LOCK_FILE, timeout_s=timeout_s):
            con = duckdb.connect(config=self._config())
            try:
                con.execute(state_sql(self.state_root))
                self._migrate(con)
                before = _fingerprints(con)
                if spans:
                    _temporary_views(con, self.lake_root)
                local[key] = con
                try:
                    yield con
                finally:
                    del local[key]
                changed = [name for name, mark in _fingerprints(con).items() if mark != before[name]]
                for name in changed:
                    _commit_state(self.state_root / name, con.sql(f"SELECT * FROM {name}").to_arrow_table())
            finally:
                con.close()

    @contextlib.contextmanager
    def read(self, *, spans: bool = True) -> Iterator[duckdb.DuckDBPyConnection]:
        """A connection over the newest committed state (an in-memory copy: nothing waits on it), then closed.

        With ``spans``, the connection also has the span views (``spans``, ``spans_raw``) and the
        output views (``triplets``, ``llm_calls``, ...) over the lake's current snapshot.
        """
        con = duckdb.connect(config=self._config())
        try:
            con.execute(self.load_sql())
            if spans:
                _temporary_views(con, self.lake_root)
            yield con
        finally:
            con.close()

    def _migrate(self, con: duckdb.DuckDBPyConnection) -> None:
        """Copy the rows of the catalog file of an older Arclight into ``con`` once (they commit with the block)."""
        mark = self.state_root / MIGRATED_MARK
        if not self.path.is_file() or mark.exists():
            return
        source = duckdb.connect(str(self.path), read_only=True)
        try:
            have = {name for (name,) in source.execute("SELECT table_name FROM duckdb_tables()").fetchall()}
            for name in STATE_TABLE_NAMES:
                if name in have and not con.execute(f"SELECT count(*) FROM {name}").fetchall()[0][0]:
                    con.register("_old", source.sql(f"SELECT * FROM {name}").to_arrow_table())
                    con.execute(f"INSERT INTO {name} BY NAME SELECT * FROM _old")
                    con.unregister("_old")
        finally:
            source.close()
        for name in STATE_TABLE_NAMES:  # committed now, so the mark never stands without the rows
            _commit_state(self.state_root / name, con.sql(f"SELECT * FROM {name}").to_arrow_table())
        mark.write_text(f"the state tables were copied from {self.path} on {time.strftime('%Y-%m-%d %H:%M:%S')}\n")

    def _config(self) -> dict[str, str]:
        config: dict[str, str] = {}
        if self.memory_limit:
            config["memory_limit"] = self.memory_limit
        if self.threads:
            config["threads"] = str(self.threads)
        return config


LOCK_FILE = ".write.lock"
LAKE_ID_FILE = "lake_id"  # Catalog.lake_id
MIGRATED_MARK = "MIGRATED_FROM_CATALOG_FILE"
_writing = threading.local()  # per thread: the state folders it is writing, and their connections


def state_sql(state_root: Path, names: tuple[str, ...] = STATE_TABLE_NAMES) -> str:
    """SQL that makes the state tables (``STATE_TABLES``: keys, defaults) holding the newest version of their rows
    (of the tables in ``names``; the others are made empty)."""
    parts = [STATE_TABLES]
    for name in names:
        table = _state_table(state_root / name)
        files = table.file_uris() if table is not None else []
        if files:
            parts.append(f"INSERT INTO {name} BY NAME SELECT * FROM read_parquet({_file_list(files)}, union_by_name = true);")
    return "\n".join(parts)


_state_tables: dict[str, DeltaTable] = {}
# A state table takes 10-30 commits an epoch and nobody reads its history: its log keeps a minute (the
# span tables' reason, delta.LOG_RETENTION), so a write does not slow down as the run goes on.
STATE_PROPERTIES = table_properties(60)
_state_lock = threading.Lock()


def _state_table(path: Path) -> DeltaTable | None:
    """The state table at ``path``, brought up to date (kept open per process); None before its first commit."""
    with _state_lock:
        return refreshed(_state_tables, str(path))


def _fingerprints(con: duckdb.DuckDBPyConnection) -> dict[str, tuple]:
    """Per state table, its row count and the sum of its rows' hashes (of each row's text: DuckDB's hash of a
    row combines its fields' hashes linearly, so one change made to two rows cancelled out in an XOR of them)."""
    return {name: tuple(con.execute(f"SELECT count(*), sum(hash(t::VARCHAR)::HUGEINT) FROM {name} AS t").fetchall()[0])
            for name in STATE_TABLE_NAMES}


def _commit_state(path: Path, rows: pa.Table) -> None:
    """Make ``rows`` the whole content of the state table at ``path``: one Parquet file, fsynced, then one
    overwrite commit (the table is created on its first), fsynced. The writer holds the state's write lock."""
    rows = rows.cast(pa.schema([pa.field(f.name, pa.timestamp(f.type.unit, "UTC")) if pa.types.is_timestamp(f.type)
                                and f.type.tz else f for f in rows.schema]))  # Delta has one zone: UTC
    table = _state_table(path)
    if table is None:
        create_table(str(path), rows.schema, properties=STATE_PROPERTIES)
        table = _state_table(path)
    else:
        ensure_properties(table, STATE_PROPERTIES)
    name = f"part-00000-{uuid.uuid4()}-c000.zstd.parquet"
    pq.write_table(rows, path / name, compression="zstd")
    fsync_file(path / name)
    fsync_dir(path)
    schema = table.schema().to_arrow()
    if set(rows.schema.names) - set(pa.schema(schema).names):  # a column this version of Arclight added
        schema = pa.unify_schemas([pa.schema(schema), rows.schema])
    commit_durably(table, path, [add_action(path, path / name, {}, rows.num_rows)], mode="overwrite", schema=schema)
    if table.version() % CHECKPOINT_EVERY == 0:  # a checkpoint was just made: the entries before it may go
        clean_log(table)


def vacuum_state(state_root: Path, *, retention_hours: int) -> None:
    """Delete state files replaced more than ``retention_hours`` ago."""
    for name in STATE_TABLE_NAMES:
        table = _state_table(state_root / name)
        if table is not None:
            table.vacuum(retention_hours=retention_hours, dry_run=False, enforce_retention_duration=False, full=True)


@contextlib.contextmanager
def _file_lock(path: Path, *, timeout_s: float) -> Iterator[None]:
    """An exclusive lock on ``path`` across processes (flock), waiting up to ``timeout_s``."""
    import fcntl

    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        deadline = time.monotonic() + timeout_s
        delay = 0.005
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"another process has been writing the state tables in {path.parent} for over "
                                       f"{timeout_s:.0f} s; if none runs, remove nothing and retry: the lock dies with "
                                       "its process") from None
                time.sleep(delay)
                delay = min(delay * 2, 0.1)
        yield
    finally:
        os.close(fd)  # releases the lock


def span_views(con: duckdb.DuckDBPyConnection, lake_root: Path, snapshot: Snapshot | None = None, *,
               temporary: bool = False) -> None:
    """Make the span views (``view_sql``) on ``con``, which reads the span files where they live (``attach_store``:
    a lake on object storage is read from it, nothing copied to local disk)."""
    attach_store(con, lake_root)
    con.execute(view_sql(lake_root, snapshot, temporary=temporary))


def _temporary_views(con: duckdb.DuckDBPyConnection, lake_root: Path) -> None:
    """The span and output views over the lake's current snapshot, as TEMP views of ``con``."""
    span_views(con, lake_root, temporary=True)
    outputs = output_views_sql(lake_root)
    if outputs:
        con.execute(outputs.replace("CREATE OR REPLACE VIEW", "CREATE OR REPLACE TEMP VIEW"))


_locks: dict[str, threading.RLock] = {}
_locks_guard = threading.Lock()


def _process_lock(path: Path) -> threading.RLock:
    """One lock per state folder in this process: threads take turns writing it (processes take the lock file)."""
    key = str(path.resolve())
    with _locks_guard:
        return _locks.setdefault(key, threading.RLock())
