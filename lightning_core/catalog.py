"""The DuckDB catalog: the pipeline's small state tables, and the span views over lake snapshots.

The spans live in the lake's Delta tables (``lightning_core.lake``); ``view_sql`` makes views
over one snapshot of them. The catalog file holds the state (runs, epochs, rollouts,
policy_versions, prompt_versions); ``triplet_store.views_sql`` makes the views of the pipeline's
outputs (also Delta tables) over one snapshot of them. Writers open it
briefly (``Catalog.write()``); ``Catalog.read()`` opens it read-only between writes (retrying
while a writer holds the lock) with the span views added as TEMP views. Analysts never hold the
file: ``lightning_core.analyst.connect`` copies the state into memory. The file is created with
DuckDB's v1.5.0 storage format, so the PyPI ``duckdb`` CLI can open it too.
"""

from __future__ import annotations

import contextlib
import re
import threading
import time
from pathlib import Path
from typing import Iterator

import duckdb

from lightning_core.lake import SCHEMA_RUN, Snapshot, ensure_schema_files, schema_file, set_location
from lightning_core.lake import snapshot as lake_snapshot
from lightning_core.triplet_store import views_sql as output_views_sql

STORAGE_VERSION = "v1.5.0"

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
-- (span_kind, agent_name, response_id, reward_value) and the gateway's token ids and logprobs
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
    span_kind, agent_name,
    json_extract_string(attributes, '$."gen_ai.operation.name"') AS gen_ai_operation,
    response_id, reward_value,
    prompt_token_ids, response_token_ids, response_logprobs,
    date AS production_date,
    received_ns
FROM spans_raw
QUALIFY row_number() OVER (PARTITION BY run_id, epoch, date, trace_id, span_id
                          ORDER BY received_ns, filename, file_row_number) = 1;
"""


# What a connection to the catalog file itself finds under the span views' names: the spans live
# in the Delta tables, whose current files a view stored in the file could not follow.
STORED_VIEW_NOTICE = "\n".join(f"CREATE OR REPLACE VIEW {name} AS SELECT error({{msg}}) AS {name};"
                               for name in ("spans_raw", "spans", "triplets", "llm_calls", "rewards", "rollout_summary",
                                            "agents"))
NOTICE_TEXT = ("the spans and the pipeline's outputs live in the lake's Delta tables, not in this file: query them "
               "with `arclight query`, "
               "lightning_core.analyst.connect(<lake>) in Python, or the duckdb CLI started as "
               "`duckdb -init <(arclight views --lake <lake>)`")


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
    """The DuckDB catalog of one lake."""

    def __init__(self, lake_root: str | Path, catalog_path: str | Path | None = None, *,
                 memory_limit: str | None = None, threads: int | None = None):
        self.lake_root = Path(lake_root).resolve()
        self.path = Path(catalog_path) if catalog_path else self.lake_root / "catalog.duckdb"
        self.memory_limit = memory_limit
        self.threads = threads

    @classmethod
    def from_config(cls, config) -> "Catalog":
        """Build the catalog named by an ``ArclightConfig``."""
        lake = config.lake
        set_location(lake.path, lake.spans_uri, lake.storage_options)  # so every reader of the folder finds the spans
        return cls(lake.path, lake.catalog_path, memory_limit=lake.duckdb_memory_limit, threads=lake.duckdb_threads)

    def ensure(self) -> None:
        """Create the lake folders, the catalog file, its views and state tables (idempotent)."""
        self.lake_root.mkdir(parents=True, exist_ok=True)
        ensure_schema_files(self.lake_root)
        with self.write() as con:
            con.execute(STATE_TABLES)
            con.execute(STORED_VIEW_NOTICE.format(msg=_quote(NOTICE_TEXT)))

    def ensure_state(self) -> None:
        """Make sure the state tables exist (a catalog made by an older version gets the new ones), cheaply."""
        if not self.path.exists():
            self.ensure()
            return
        with self.write() as con:
            con.execute(STATE_TABLES)

    @contextlib.contextmanager
    def write(self, *, timeout_s: float = 60.0, spans: bool = False) -> Iterator[duckdb.DuckDBPyConnection]:
        """Open the catalog for writing (waiting while another process holds it), then close it.

        With ``spans``, the connection also has the span and output views over the lake's current
        snapshot (TEMP views), for a statement that updates state from the spans.
        """
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with _process_lock(self.path):
            con = _connect_retrying(self.path, read_only=False, timeout_s=timeout_s, config=self._config(create=True))
            try:
                if spans:
                    _temporary_views(con, self.lake_root)
                yield con
            finally:
                con.close()

    @contextlib.contextmanager
    def read(self, *, timeout_s: float = 60.0, spans: bool = True) -> Iterator[duckdb.DuckDBPyConnection]:
        """Open the catalog read-only (waiting while a writer holds it), then close it.

        With ``spans``, the connection also has the span views (``spans``, ``spans_raw``) and the
        output views (``triplets``, ``llm_calls``, ...) over the lake's current snapshot, as TEMP views. Hold it briefly: a writer waits while it is open
        (analysts use ``lightning_core.analyst.connect``, which holds nothing).
        """
        if not self.path.exists():
            self.ensure()
        with _process_lock(self.path):
            con = _connect_retrying(self.path, read_only=True, timeout_s=timeout_s, config=self._config(create=False))
            try:
                if spans:
                    _temporary_views(con, self.lake_root)
                yield con
            finally:
                con.close()

    def _config(self, *, create: bool) -> dict[str, str]:
        config: dict[str, str] = {}
        if create and not self.path.exists():
            config["storage_compatibility_version"] = STORAGE_VERSION
        if self.memory_limit:
            config["memory_limit"] = self.memory_limit
        if self.threads:
            config["threads"] = str(self.threads)
        return config


def _temporary_views(con: duckdb.DuckDBPyConnection, lake_root: Path) -> None:
    """The span and output views over the lake's current snapshot, as TEMP views of ``con``."""
    con.execute(view_sql(lake_root, temporary=True))
    outputs = output_views_sql(lake_root)
    if outputs:
        con.execute(outputs.replace("CREATE OR REPLACE VIEW", "CREATE OR REPLACE TEMP VIEW"))


_locks: dict[str, threading.RLock] = {}
_locks_guard = threading.Lock()


def _process_lock(path: Path) -> threading.RLock:
    """One lock per catalog file in this process: DuckDB refuses two differently configured
    connections to one file in one process, so threads take turns (processes wait on the file lock)."""
    key = str(path.resolve())
    with _locks_guard:
        return _locks.setdefault(key, threading.RLock())


def _connect_retrying(path: Path, *, read_only: bool, timeout_s: float, config: dict[str, str]) -> duckdb.DuckDBPyConnection:
    deadline = time.monotonic() + timeout_s
    delay = 0.02
    while True:
        try:
            return duckdb.connect(str(path), read_only=read_only, config=config)
        except duckdb.IOException as exc:
            if "lock" not in str(exc).lower() or time.monotonic() > deadline:
                raise
            time.sleep(delay)
            delay = min(delay * 2, 0.5)
