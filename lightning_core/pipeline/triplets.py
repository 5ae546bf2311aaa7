"""The SQL pipeline: spans of one (run, epoch) -> repaired tree -> calls, rewards -> triplets.

Each stage is one file in ``sql/`` ending in one SELECT; this module binds its parameters and
keeps its result as a temporary table named after the stage, which the next stage reads:

    span_nodes -> repairs (view repaired_spans) -> agent_owners (view span_agents) -> llm_spans
    -> calls (view llm_calls) -> rewards, rollout_summary

Tables stay narrow; views join the columns people and later stages read, so wide data (token
ids, messages) is copied once, from the lake into llm_spans.
    per policy: credit -> triplets (triplet_rows) -> advantages -> lake

It runs in its own in-memory DuckDB (memory limit and threads from ``lake``), reading the lake
directly, so analysts keep their catalog while it works. Outputs go to the lake
(``store.outputs``) and appear in the catalog's views (``triplets``, ``llm_calls``, ...).
"""

from __future__ import annotations

import re
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import duckdb
import pyarrow as pa
import pyarrow.compute as pc

from lightning_core.store import outputs as store
from lightning_core.store.catalog import Catalog, span_views, state_sql, vacuum_state
from lightning_core.store.spans import Snapshot, scope_files, span_scope_filter
from lightning_core.store.spans import snapshot as lake_snapshot
from lightning_core.config import ArclightConfig, PolicyConfig
from lightning_core.pipeline.silence import Silence, find_silences
from lightning_core.pipeline.steps import PipelineError, run_stage, validate_pattern

SHARED_STAGES = (
    ("span_nodes", "span_nodes"),
    ("repair", "repairs"),
    ("repaired_spans", "repaired_spans"),  # a view: span_nodes + repairs
    ("agents", "agent_owners"),
    ("span_agents", "span_agents"),  # a view: repaired_spans + agent_owners (for people)
    ("span_owners", "span_owners"),  # a view: span_nodes + repairs + agent_owners (for the next stages)
    ("llm_spans", "llm_spans"),
    ("calls", "calls"),
    ("llm_calls", "llm_calls"),  # a view: calls + their wide fields
    ("rewards", "rewards"),
    ("rollout_summary", "rollout_summary"),
)
POLICY_STAGES = (("credit", "credit"), ("triplets", "triplet_rows"))
TRIPLETS_PER_FILE = 100_000  # below this a triplet partition is one file


@dataclass
class PolicyReport:
    """What one policy's triplets hold."""

    policy: str
    agent_match: str | None
    triplets: int = 0
    rollouts: int = 0
    groups: int = 0
    zero_advantage_groups: list[str] = field(default_factory=list)
    informative_groups: list[str] = field(default_factory=list)  # groups with a non-zero advantage: they train
    missing_token_ids: int = 0
    retokenized: int = 0
    dropped: int = 0
    no_reward: int = 0
    infra_dropped_groups: int = 0  # groups left out: our services failed one of their rollouts every time it ran
    path: str | None = None
    signals: list[dict[str, Any]] = field(default_factory=list)  # sql/epoch_signals.sql's rows (runs only)


@dataclass
class AgentEpoch:
    """One agent in one epoch: its calls, the rollouts it took part in and how they ended, who trains it."""

    epoch: int | None
    agent_name: str | None
    policy: str | None  # the policies whose agent_match selects it (comma-separated); None = frozen: its calls train nothing
    calls: int
    rollouts: int
    triplets: int
    reward_mean: float | None
    success_rate: float | None


@dataclass
class TripletReport:
    """Counts of one pipeline run over a (run, epoch) or the production traces."""

    run_id: str | None
    epoch: int | None
    spans: int = 0
    repaired_spans: int = 0
    llm_calls: int = 0
    judge_calls: int = 0
    rewards: int = 0
    missing_rewards: int = 0
    tool_failures: int = 0
    rollouts: int = 0
    agents: dict[str, int] = field(default_factory=dict)
    silences: list[Silence] = field(default_factory=list)  # rollouts whose spans gave no call, or no reward
    policies: list[PolicyReport] = field(default_factory=list)
    agent_epochs: list[AgentEpoch] = field(default_factory=list)
    stage_seconds: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0
    span_versions: dict[str, int] = field(default_factory=dict)  # the span tables' versions it read (analyst.connect(at_version=...))
    output_versions: dict[str, int] = field(default_factory=dict)  # the output tables' versions once it wrote (the same)
    span_files: dict[str, list[str]] = field(default_factory=dict)  # the scope's span files it read (analyst at_epoch)

    @property
    def informative_groups(self) -> int:
        """Groups in which some policy has a non-zero advantage (what dynamic sampling counts)."""
        return len({g for p in self.policies for g in p.informative_groups})


def shared_parameters(config: ArclightConfig, *, run_id: str | None, epoch: int | None) -> dict[str, Any]:
    """Return the parameters the shared stages (span_nodes .. rollout_summary) bind."""
    pipeline = config.pipeline
    return {"run_id": run_id, "epoch": epoch, "tool_failure_penalty": pipeline.tool_failure_penalty,
            "llm_call_match": pipeline.llm_call_match, "repair": pipeline.repair}


def select_policies(config: ArclightConfig, policy: str | None) -> list[PolicyConfig]:
    """Return the configured policies to materialize (one by name, or all)."""
    if policy is None:
        return list(config.policies)
    chosen = [p for p in config.policies if p.name == policy]
    if not chosen:
        raise PipelineError(f"policy {policy!r} is not configured; known: {[p.name for p in config.policies]}")
    return chosen


def connect(config: ArclightConfig, snapshot: Snapshot | None = None, *, catalog: Catalog | None = None) -> duckdb.DuckDBPyConnection:
    """Open the pipeline's in-memory DuckDB with span views over ``snapshot`` (default: the current one)."""
    lake_root = Path(config.lake.path).resolve()
    lake_root.mkdir(parents=True, exist_ok=True)
    from lightning_core.store.span_schema import ensure_schema_files

    ensure_schema_files(lake_root)
    tmp = lake_root / ".duckdb_tmp"
    tmp.mkdir(exist_ok=True)
    con = duckdb.connect(config={
        "memory_limit": config.lake.duckdb_memory_limit,
        "threads": str(config.lake.duckdb_threads),
        "temp_directory": str(tmp),
        "preserve_insertion_order": "false",
    })
    span_views(con, lake_root, snapshot)
    # the rollouts as the flow recorded them (sql/triplets.sql leaves out the groups our services failed)
    con.execute(state_sql((catalog or Catalog.from_config(config)).state_root, names=("rollouts",)))
    return con


def materialize_triplets(
    config: ArclightConfig,
    *,
    run_id: str | None,
    epoch: int | None,
    policy: str | None = None,
    agent_match: str | None = None,
    out: str | Path | None = None,
    catalog: Catalog | None = None,
) -> TripletReport:
    """Turn the spans of (run_id, epoch) -- production traces when run_id is None -- into triplets.

    Writes triplets per policy, and the run's llm_calls, rewards and rollout_summary, to the lake
    (replacing earlier output of the same partition); ``agent_match`` overrides the policy's
    pattern (with one policy); ``out`` also writes every policy's triplets to one Parquet file.
    """
    started = time.perf_counter()
    pipeline = config.pipeline
    policies = select_policies(config, policy)
    if agent_match is not None:
        if len(policies) != 1:
            raise PipelineError(f"agent_match overrides one policy's pattern; {len(policies)} policies selected, name one")
        policies = [policies[0].model_copy(update={"agent_match": agent_match})]
    for p in policies:
        validate_pattern(p.agent_match, what=f"policy {p.name!r} agent_match")
    validate_pattern(pipeline.reward_agent_match, what="pipeline.reward_agent_match")
    validate_pattern(pipeline.llm_call_match, what="pipeline.llm_call_match")
    if run_id is None and epoch is not None:
        raise PipelineError(f"production traces have no epoch: pass epoch=None with run_id=None, not {epoch}")
    span_scope_filter(run_id, epoch)  # a run id or epoch that names no partition is refused (names.InvalidName)

    lake_root = Path(config.lake.path).resolve()
    report = TripletReport(run_id=run_id, epoch=epoch)
    # one snapshot of the span tables for every stage: llm_spans re-reads rows by file and row
    # number, and compaction keeps a snapshot's files for the lake's retention window
    snapshot = lake_snapshot(lake_root)
    report.span_versions = dict(snapshot.versions)
    report.span_files = scope_files(lake_root, snapshot, run_id, epoch)
    con = connect(config, snapshot, catalog=catalog)
    try:
        base = shared_parameters(config, run_id=run_id, epoch=epoch)
        for stage, table in SHARED_STAGES:
            tick = time.perf_counter()
            try:
                run_stage(con, stage, params=base, table=table)
            except duckdb.ConversionException as exc:
                if stage != "llm_spans":  # the one stage that casts stored values (token ids to INTEGER[])
                    raise
                raise PipelineError(
                    f"stage 'llm_spans' found a stored value it cannot convert ({str(exc).splitlines()[0]}). "
                    "Token ids must be integers in [0, 2^31), as ingest (ingest.span_rows.promoted_columns) stores them: "
                    "re-ingest those spans through the collector") from None
            report.stage_seconds[stage] = round(time.perf_counter() - tick, 3)
        _count_shared(con, report)
        report.silences = find_silences(con, run_id=run_id, epoch=epoch)
        if run_id is not None and epoch is None:
            epochs = [e for (e,) in con.execute("SELECT DISTINCT epoch FROM span_nodes ORDER BY 1").fetchall()]
        else:
            epochs = [epoch]
        collected = []
        # the outputs are encoded to Parquet in a thread while DuckDB computes the triplets
        with ThreadPoolExecutor(1, thread_name_prefix="arclight-outputs") as writer:
            pending = []
            for output in store.OUTPUTS:
                for e in epochs:
                    rows = con.sql(f"SELECT * EXCLUDE ({store.NOT_STORED.get(output, 'run_id, epoch')}) FROM {output} "
                                   "WHERE epoch IS NOT DISTINCT FROM $e", params={"e": e}).to_arrow_table()
                    pending.append(writer.submit(store.replace_partition, lake_root, output, rows, run_id=run_id, epoch=e))
            report.stage_seconds["outputs"] = round(time.perf_counter() - started - sum(report.stage_seconds.values()), 3)
            for p in policies:
                tick = time.perf_counter()
                table, policy_report = _policy_triplets(con, config, p, run_id=run_id, epochs=epochs, lake_root=lake_root)
                report.policies.append(policy_report)
                report.stage_seconds[f"policy:{p.name}"] = round(time.perf_counter() - tick, 3)
                collected.append(table)
            report.agent_epochs = _agent_epochs(con, config, policies, collected)
            tick = time.perf_counter()
            for done in pending:
                done.result()  # a failed write fails the run
            report.stage_seconds["outputs_wait"] = round(time.perf_counter() - tick, 3)
        report.output_versions = {output: version for output, (version, _) in store.snapshot(lake_root).items()}
        if out is not None:
            import pyarrow.parquet as pq

            Path(out).parent.mkdir(parents=True, exist_ok=True)
            pq.write_table(pa.concat_tables(collected) if collected else store.TRIPLET_SCHEMA.empty_table(), str(out))
    finally:
        con.close()
    ensure_views(config, catalog=catalog)
    report.seconds = round(time.perf_counter() - started, 3)
    return report


def _policy_triplets(con, config: ArclightConfig, policy: PolicyConfig, *, run_id, epochs, lake_root):
    pipeline = config.pipeline
    params = {
        "agent_match": policy.agent_match,
        "reward_agent_match": pipeline.reward_agent_match,
        "reward_policy": pipeline.reward_policy,
        "gamma": pipeline.gamma,
        "missing_reward": pipeline.missing_reward,
        "exclude_llm_call_in_reward": pipeline.exclude_llm_call_in_reward,
        "missing_token_ids": pipeline.missing_token_ids,
        "policy": policy.name,
        "normalize_std": pipeline.normalize_advantage_std,
        "advantage": pipeline.advantage,
        "turn_advantage_weight": pipeline.turn_advantage_weight,
    }
    for stage, table in POLICY_STAGES:
        run_stage(con, stage, params=params, table=table)
    report = PolicyReport(policy=policy.name, agent_match=policy.agent_match)
    report.dropped = con.execute(
        "SELECT count(*) FROM credit WHERE list_contains(flags, 'missing_token_ids')").fetchall()[0][0] if pipeline.missing_token_ids == "drop" else 0
    report.infra_dropped_groups = con.execute(  # the groups sql/triplets.sql leaves out (infrastructure_failed)
        "SELECT count(DISTINCT (r.run_id, r.epoch, r.group_id)) FROM credit c JOIN rollouts r ON r.rollout_id = c.rollout_id "
        "SEMI JOIN rollouts f ON f.run_id = r.run_id AND f.epoch = r.epoch AND f.group_id = r.group_id "
        "AND f.error_kind = 'infrastructure' AND f.status IN ('failed', 'timed_out')").fetchall()[0][0]
    table = run_stage(con, "advantages", params=params).to_arrow_table()
    if pipeline.missing_token_ids == "retokenize" and "missing_token_ids" in pc.unique(pc.list_flatten(table["flags"])).to_pylist():
        from lightning_core.pipeline.retokenize import retokenize_missing

        table, report.retokenized = retokenize_missing(table, tokenizer_path=_tokenizer_path(config))
    table = store.conform_triplets(table)
    _count_policy(con, table, report)
    if run_id is not None:
        report.signals = _signals(con, table, run_id=run_id, policy=policy.name, by=config.rollouts.metrics_by)
    for e in epochs:
        part = table if len(epochs) == 1 else table.filter(
            pc.is_null(table["epoch"]) if e is None else pc.equal(table["epoch"], e))
        # large epochs are written as one file per DuckDB thread, encoded in parallel
        parts = min(config.lake.duckdb_threads, -(-part.num_rows // TRIPLETS_PER_FILE))
        store.replace_partition(lake_root, "triplets", part, run_id=run_id, epoch=e, policy=policy.name, parts=parts)
        report.path = str(store.output_dir(lake_root, "triplets", run_id=run_id, epoch=e, policy=policy.name))
    return table, report


def _tokenizer_path(config: ArclightConfig) -> Path:
    """Return the folder whose tokenizer retokenizes: pipeline.tokenizer_path, else model.path, else the base model."""
    from lightning_core.common import model
    from lightning_core.config import is_hub_id

    if config.pipeline.tokenizer_path is None and config.model.path and is_hub_id(config.model.path):
        try:  # the same snapshot vLLM serves and the trainer loads
            return model.resolve_model(config)
        except model.ModelError as exc:
            raise PipelineError(f"pipeline.missing_token_ids=retokenize needs the model's tokenizer: {exc}") from None
    path = Path(config.pipeline.tokenizer_path or config.model.path or model.DEFAULT_MODEL_DIR)
    path = path if path.is_absolute() else Path(config.project_dir) / path
    if not (path / "tokenizer_config.json").is_file():
        raise PipelineError(
            f"pipeline.missing_token_ids=retokenize needs a tokenizer: expected tokenizer_config.json in {path} "
            "(pipeline.tokenizer_path, else model.path, else the base model); found none. Run `arclight model "
            "prepare` or set pipeline.tokenizer_path to a model folder")
    return path


def _count_shared(con, report: TripletReport) -> None:
    report.spans, report.repaired_spans = con.execute(
        "SELECT count(*), count(*) FILTER (WHERE repair_reason IS NOT NULL AND parent_node IS NOT NULL) FROM repairs"
    ).fetchall()[0]
    report.llm_calls, report.judge_calls = con.execute(
        "SELECT count(*) FILTER (WHERE NOT in_reward), count(*) FILTER (WHERE in_reward) FROM calls").fetchall()[0]
    report.rewards, report.missing_rewards, report.tool_failures = con.execute(
        "SELECT count(*) FILTER (WHERE kind = 'reward' AND value IS NOT NULL), "
        "count(*) FILTER (WHERE kind = 'reward' AND value IS NULL), count(*) FILTER (WHERE kind = 'tool_failure') "
        "FROM rewards").fetchall()[0]
    report.rollouts = con.execute("SELECT count(*) FROM rollout_summary").fetchall()[0][0]
    report.agents = dict(con.execute(
        "SELECT coalesce(agent_name, '<none>'), count(*) FROM calls WHERE NOT in_reward GROUP BY 1 ORDER BY 1").fetchall())


def _agent_epochs(con, config: ArclightConfig, policies: list[PolicyConfig], triplet_tables: list[pa.Table]) -> list[AgentEpoch]:
    """Per (epoch, agent): calls, rollouts, their reward and success, and which policy trains it (sql/agent_epochs.sql)."""
    triplets: dict[tuple, int] = {}
    for table in triplet_tables:
        for row in table.group_by(["epoch", "agent_name"]).aggregate([([], "count_all")]).to_pylist():
            key = (row["epoch"], row["agent_name"])
            triplets[key] = triplets.get(key, 0) + row["count_all"]
    rows = run_stage(con, "agent_epochs", params={"success_reward": config.trainer.success_reward}).fetchall()
    result = []
    for epoch, agent, calls, rollouts, reward_mean, success_rate in rows:
        # as sql/credit.sql selects calls: no agent_match takes every call; an agentless one matches as ''
        trained_by = [p.name for p in policies if p.agent_match is None or re.search(p.agent_match, agent or "")]
        result.append(AgentEpoch(epoch=epoch, agent_name=agent, policy=",".join(trained_by) or None, calls=calls,
                                 rollouts=rollouts,
                                 triplets=triplets.get((epoch, agent), 0), reward_mean=reward_mean,
                                 success_rate=success_rate))
    return result


def _count_policy(con, table: pa.Table, report: PolicyReport) -> None:
    # counted on the pipeline's connection: opening a second DuckDB instance would make DuckDB
    # purge its allocator's cached memory process-wide, which this VM charges for in page faults
    con.register("policy_triplets", table.select(["rollout_id", "group_id", "flags"]))
    try:
        report.triplets, report.rollouts, report.groups, report.missing_token_ids, report.no_reward = con.execute(
            "SELECT count(*), count(DISTINCT rollout_id), count(DISTINCT group_id), "
            "count(*) FILTER (WHERE list_contains(flags, 'missing_token_ids')), "
            "count(*) FILTER (WHERE list_contains(flags, 'no_reward')) FROM policy_triplets").fetchall()[0]
        report.zero_advantage_groups = [g for (g,) in con.execute(
            "SELECT DISTINCT group_id FROM policy_triplets WHERE list_contains(flags, 'zero_advantage_group') "
            "ORDER BY 1").fetchall()]
        report.informative_groups = [g for (g,) in con.execute(
            "SELECT DISTINCT group_id FROM policy_triplets WHERE NOT list_contains(flags, 'zero_advantage_group') "
            "ORDER BY 1").fetchall()]
    finally:
        con.unregister("policy_triplets")


def _signals(con, table: pa.Table, *, run_id: str, policy: str, by: str | None) -> list[dict[str, Any]]:
    """The policy's collapse signals per epoch and slice (sql/epoch_signals.sql), over the triplets just made."""
    con.register("triplets", table.select(["run_id", "epoch", "policy", "group_id", "rollout_id", "rollout_return"]))
    try:
        return run_stage(con, "epoch_signals", params={"run_id": run_id, "epoch": None, "policy": policy, "by": by}
                         ).to_arrow_table().to_pylist()
    finally:
        con.unregister("triplets")


def ensure_views(config: ArclightConfig, *, catalog: Catalog | None = None) -> None:
    """Make the lake's catalog and the outputs' empty typed files, so the analyst views (triplets, llm_calls,
    rewards, agents, rollout_summary) bind before any pipeline run, and vacuum the output tables."""
    lake_root = Path(config.lake.path).resolve()
    _ensure_schema_outputs(config, lake_root)
    catalog = catalog or Catalog.from_config(config)
    catalog.ensure()
    store.vacuum(lake_root, retention_hours=config.collector.retention_hours)
    vacuum_state(catalog.state_root, retention_hours=config.collector.retention_hours)


def _ensure_schema_outputs(config: ArclightConfig, lake_root: Path) -> None:
    """Place the empty, typed file of each output (its columns as this version's SQL makes them)."""
    if all(store.schema_file(lake_root, output).exists() for output in store.TABLES):
        return
    con = connect(config)
    try:
        base = shared_parameters(config, run_id=store.SCHEMA_RUN, epoch=-1)
        for stage, table in SHARED_STAGES:
            run_stage(con, stage, params=base, table=table)
        for output in store.OUTPUTS:
            store.write_schema_file(lake_root, output, con.sql(
                f"SELECT * EXCLUDE ({store.NOT_STORED.get(output, 'run_id, epoch')}) FROM {output}").to_arrow_table())
    finally:
        con.close()
    store.write_schema_file(lake_root, "triplets", store.TRIPLET_SCHEMA.empty_table())
