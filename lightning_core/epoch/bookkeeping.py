"""Epoch bookkeeping: tasks, the rollout plan, outcomes and stage status in the catalog.

Every function here is idempotent for a (run, epoch): planning twice returns the same plan,
recording an outcome replaces it, and ``pending_rollouts`` lists only what has not finished,
so an epoch interrupted at any stage resumes where it stopped.
"""

from __future__ import annotations

import datetime as dt
import json
from typing import Any, Iterable

from lightning_core import names
from lightning_core.common.redact import redacted
from lightning_core.epoch import draw
from lightning_core.rollouts.dataset import DatasetError, load_tasks
from lightning_core.store.catalog import Catalog
from lightning_core.config import ArclightConfig
from lightning_core.rollouts.runner import INTERRUPTED, RolloutOutcome, RolloutSpec

# Stage order of an epoch; an epoch's status is the last stage it completed.
STAGES = ("planned", "rollouts_done", "ingested", "triplets_done", "trained", "completed")


def plan_epoch(config: ArclightConfig, catalog: Catalog, *, run_id: str, epoch: int, mode: str = "train",
               eval_tasks: int | None = None) -> list[RolloutSpec]:
    """Return the epoch's rollouts, planning them (seeded by epoch) on the first call only.

    ``eval_tasks`` caps the held-out tasks of an eval epoch (default ``rollouts.eval_tasks``).
    """
    existing = planned_rollouts(catalog, run_id=run_id, epoch=epoch, mode=mode)
    if existing:
        return existing
    r = config.rollouts
    if mode == "train":
        tasks = draw.epoch_tasks(config, epoch=epoch)
        group_size = r.group_size
    elif mode == "eval":
        if r.eval_dataset is None:
            raise DatasetError("rollouts.eval_dataset is not set: point it at a JSONL file of held-out tasks")
        tasks = load_tasks(r.eval_dataset)[: (eval_tasks or r.eval_tasks) or None]
        group_size = 1
    else:
        raise ValueError(f"epoch {epoch} of run {run_id} has no {mode!r} rollouts planned: plan them with plan_tasks first")
    _insert_plan(catalog, run_id=run_id, epoch=epoch, mode=mode, tasks=tasks, group_size=group_size, sampling_round=0)
    return planned_rollouts(catalog, run_id=run_id, epoch=epoch, mode=mode)


def plan_more_tasks(config: ArclightConfig, catalog: Catalog, *, run_id: str, epoch: int, count: int) -> list[RolloutSpec]:
    """Add ``count`` training tasks not yet drawn in this epoch (a new sampling round); return their rollouts.

    Dynamic sampling calls this when too few of the epoch's groups are informative. The draw is
    seeded by (seed, epoch, round), so a resumed epoch draws the same tasks. Returns [] once the
    dataset has no task left that the epoch has not drawn.
    """
    r = config.rollouts
    with catalog.read(spans=False) as con:
        drawn, rounds = con.execute(
            "SELECT list(DISTINCT task_id), coalesce(max(sampling_round), 0) + 1 FROM rollouts "
            "WHERE run_id = ? AND epoch = ? AND mode = 'train'", [run_id, epoch]).fetchall()[0]
    drawn = set(drawn or [])
    remaining = [t for t in draw.training_pool(config) if t["id"] not in drawn]
    picked = draw.draw(remaining, count=count, rng=draw.round_rng(config, epoch=epoch, sampling_round=rounds),
                       balance_by=r.balance_by)
    if not picked:
        return []
    _insert_plan(catalog, run_id=run_id, epoch=epoch, mode="train", tasks=picked, group_size=r.group_size,
                 sampling_round=rounds)
    ids = {t["id"] for t in picked}
    return [s for s in pending_rollouts(catalog, run_id=run_id, epoch=epoch) if s.task_id in ids]


def plan_tasks(catalog: Catalog, *, run_id: str, epoch: int, mode: str, tasks: list[dict[str, Any]], group_size: int
               ) -> list[RolloutSpec]:
    """Plan ``group_size`` rollouts of each of ``tasks`` for (run, epoch) in ``mode`` (idempotent); return the plan."""
    _insert_plan(catalog, run_id=run_id, epoch=epoch, mode=mode, tasks=tasks, group_size=group_size, sampling_round=0)
    return planned_rollouts(catalog, run_id=run_id, epoch=epoch, mode=mode)


def _insert_plan(catalog: Catalog, *, run_id: str, epoch: int, mode: str, tasks: list[dict[str, Any]], group_size: int,
                 sampling_round: int) -> None:
    specs = [
        RolloutSpec(run_id, epoch, rollout_id(run_id=run_id, epoch=epoch, mode=mode, task_id=task["id"], sample=k),
                    task["id"], task["id"], k, task)
        for task in tasks
        for k in range(group_size)
    ]
    ids: dict[str, str] = {}
    for s in specs:
        if ids.setdefault(s.rollout_id, s.task_id) != s.task_id:
            raise DatasetError(f"task ids {ids[s.rollout_id]!r} and {s.task_id!r} make the same rollout id "
                               f"{s.rollout_id!r}: rename one of them in the dataset")
    with catalog.write() as con:
        con.executemany(
            "INSERT INTO rollouts (run_id, epoch, rollout_id, task_id, group_id, sample_index, attempt, status, task, "
            "mode, sampling_round) VALUES (?, ?, ?, ?, ?, ?, 0, 'planned', ?, ?, ?) ON CONFLICT DO NOTHING",
            [(s.run_id, s.epoch, s.rollout_id, s.task_id, s.group_id, s.sample_index, json.dumps(s.task), mode,
              sampling_round) for s in specs],
        )


def rollout_id(*, run_id: str, epoch: int, mode: str, task_id: str, sample: int) -> str:
    """The id of sample ``sample`` of task ``task_id`` in (run, epoch, mode): a URL path segment the gateway
    accepts, whatever characters the task id holds (``names.rollout_id_part``)."""
    prefix = {"train": "e", "eval": "eval"}.get(mode, mode)
    return names.check_rollout_id(f"{run_id}-{prefix}{epoch}-{names.rollout_id_part(task_id)}-{sample}")


def record_prompt_versions(catalog: Catalog, *, run_id: str, epoch: int, mode: str, versions: dict[str, str]) -> None:
    """Note on the epoch's rollouts that have not run yet which prompt versions they run with."""
    if not versions:
        return
    with catalog.write() as con:
        con.execute("UPDATE rollouts SET prompt_versions = ? WHERE run_id = ? AND epoch = ? AND mode = ? AND status = 'planned'",
                    [json.dumps(versions, sort_keys=True), run_id, epoch, mode])


def record_sampling(catalog: Catalog, *, run_id: str, epoch: int, informative_groups: int) -> dict[str, int]:
    """Store the epoch's sampling counts (tasks drawn, informative and skipped groups, rounds); return them."""
    with catalog.write() as con:
        tasks, rounds = con.execute(
            "SELECT count(DISTINCT task_id), count(DISTINCT coalesce(sampling_round, 0)) FROM rollouts "
            "WHERE run_id = ? AND epoch = ? AND mode = 'train'", [run_id, epoch]).fetchall()[0]
        counts = {"tasks_sampled": tasks, "informative_groups": informative_groups,
                  "skipped_groups": max(tasks - informative_groups, 0), "sampling_rounds": rounds}
        con.execute("INSERT INTO epochs (run_id, epoch, status) VALUES (?, ?, 'planned') ON CONFLICT DO NOTHING",
                    [run_id, epoch])
        con.execute("UPDATE epochs SET tasks_sampled = ?, informative_groups = ?, skipped_groups = ?, sampling_rounds = ? "
                    "WHERE run_id = ? AND epoch = ?", [*counts.values(), run_id, epoch])
    return counts


AGENT_EPOCH_COLUMNS = ("epoch", "agent_name", "policy", "calls", "rollouts", "triplets", "reward_mean", "success_rate")


def record_agent_epochs(catalog: Catalog, *, run_id: str, epoch: int, rows: list[Any]) -> None:
    """Replace the epoch's per-agent rows (``pipeline.AgentEpoch``s) in ``agent_epochs``."""
    with catalog.write() as con:
        con.execute("DELETE FROM agent_epochs WHERE run_id = ? AND epoch = ?", [run_id, epoch])
        if rows:
            con.executemany(
                f"INSERT INTO agent_epochs (run_id, {', '.join(AGENT_EPOCH_COLUMNS)}) VALUES (?, {', '.join('?' * len(AGENT_EPOCH_COLUMNS))})",
                [(run_id, *(getattr(r, c) for c in AGENT_EPOCH_COLUMNS)) for r in rows if r.epoch == epoch])


def agent_epochs(catalog: Catalog, *, run_id: str) -> list[dict[str, Any]]:
    """Return the run's per-agent rows, by epoch then agent (agentless calls last)."""
    with catalog.read(spans=False) as con:
        cursor = con.execute(f"SELECT {', '.join(AGENT_EPOCH_COLUMNS)} FROM agent_epochs WHERE run_id = ? "
                             "ORDER BY epoch, agent_name NULLS LAST", [run_id])
        return [dict(zip(AGENT_EPOCH_COLUMNS, row)) for row in cursor.fetchall()]


def sampling_round(catalog: Catalog, *, run_id: str, epoch: int) -> int:
    """Return the newest sampling round of a training epoch (0 before dynamic sampling drew more tasks)."""
    with catalog.read(spans=False) as con:
        return con.execute("SELECT coalesce(max(sampling_round), 0) FROM rollouts WHERE run_id = ? AND epoch = ? "
                           "AND mode = 'train'", [run_id, epoch]).fetchall()[0][0]


def sampling_counts(catalog: Catalog, *, run_id: str, epoch: int) -> dict[str, int]:
    """Return the epoch's recorded sampling counts ({} before its triplets were made)."""
    with catalog.read(spans=False) as con:
        rows = con.execute("SELECT tasks_sampled, informative_groups, skipped_groups, sampling_rounds FROM epochs "
                           "WHERE run_id = ? AND epoch = ? AND tasks_sampled IS NOT NULL", [run_id, epoch]).fetchall()
    if not rows:
        return {}
    return dict(zip(("tasks_sampled", "informative_groups", "skipped_groups", "sampling_rounds"), rows[0]))


def planned_rollouts(catalog: Catalog, *, run_id: str, epoch: int, mode: str = "train", only_pending: bool = False) -> list[RolloutSpec]:
    """Return the rollouts planned for (run, epoch), optionally only those not finished yet."""
    condition = "AND status = 'planned'" if only_pending else ""
    with catalog.read(spans=False) as con:
        rows = con.execute(
            f"SELECT run_id, epoch, rollout_id, task_id, group_id, sample_index, task FROM rollouts "
            f"WHERE run_id = ? AND epoch = ? AND mode = ? {condition} ORDER BY task_id, sample_index",
            [run_id, epoch, mode],
        ).fetchall()
    return [RolloutSpec(r[0], r[1], r[2], r[3], r[4], r[5], json.loads(r[6]) if r[6] else {}) for r in rows]


def pending_rollouts(catalog: Catalog, *, run_id: str, epoch: int, mode: str = "train") -> list[RolloutSpec]:
    """Return the planned rollouts that have no recorded outcome yet."""
    return planned_rollouts(catalog, run_id=run_id, epoch=epoch, mode=mode, only_pending=True)


def record_outcomes(catalog: Catalog, outcomes: list[RolloutOutcome]) -> None:
    """Store rollouts' outcomes (status, whose failure, attempt, reward, error, times, the model-call spans the gateway
    recorded) in the catalog, in one write.
    Interrupted ones are not stored: they stay planned and run again."""
    outcomes = [o for o in outcomes if o.status != INTERRUPTED]
    if not outcomes:
        return
    with catalog.write() as con:
        con.executemany(
            "UPDATE rollouts SET status = ?, error_kind = ?, attempt = ?, reward = ?, error = ?, started_at = ?, "
            "finished_at = ?, gateway_spans = ? WHERE rollout_id = ?",
            [[o.status, o.error_kind, o.attempt, o.reward, o.error, _ts(o.started_at), _ts(o.finished_at),
              o.gateway_spans, o.rollout_id] for o in outcomes],
        )


def record_outcome(catalog: Catalog, outcome: RolloutOutcome) -> None:
    """Store one rollout's outcome in the catalog."""
    record_outcomes(catalog, [outcome])


def _ts(seconds: float) -> dt.datetime:
    return dt.datetime.fromtimestamp(seconds, tz=dt.timezone.utc)


def rollout_counts(catalog: Catalog, *, run_id: str, epoch: int, mode: str = "train") -> dict[str, int]:
    """Return how many rollouts of (run, epoch) are in each status."""
    with catalog.read(spans=False) as con:
        rows = con.execute(
            "SELECT status, count(*) FROM rollouts WHERE run_id = ? AND epoch = ? AND mode = ? GROUP BY status",
            [run_id, epoch, mode],
        ).fetchall()
    return {status: n for status, n in rows}


def ensure_run(catalog: Catalog, config: ArclightConfig) -> None:
    """Record the run and its config once (tokens and storage options hidden: analysts read and share the table)."""
    with catalog.write() as con:
        con.execute(
            "INSERT INTO runs (run_id, project, config) VALUES (?, ?, ?) ON CONFLICT DO NOTHING",
            [config.run_name, config.name, json.dumps(redacted(config.model_dump(mode="json")))],
        )


def epoch_status(catalog: Catalog, *, run_id: str, epoch: int) -> str | None:
    """Return the last completed stage of an epoch, or None when it has not started."""
    with catalog.read(spans=False) as con:
        row = con.execute("SELECT status FROM epochs WHERE run_id = ? AND epoch = ?", [run_id, epoch]).fetchall()
    return row[0][0] if row else None


def reached(status: str | None, stage: str) -> bool:
    """True when an epoch with ``status`` has completed ``stage``."""
    return status is not None and status in STAGES and STAGES.index(status) >= STAGES.index(stage)


def set_epoch_status(catalog: Catalog, *, run_id: str, epoch: int, status: str, **fields: Any) -> None:
    """Advance an epoch's status (and set fields such as policy_version, new_version, stats)."""
    if status not in STAGES and status != "failed":
        raise ValueError(f"epoch status {status!r} must be one of {STAGES + ('failed',)}")
    updates = {"status": status, **{k: (json.dumps(v) if k == "stats" else v) for k, v in fields.items()}}
    if status == "completed":
        updates["finished_at"] = dt.datetime.now(dt.timezone.utc)
    with catalog.write() as con:
        con.execute("INSERT INTO epochs (run_id, epoch, status) VALUES (?, ?, ?) ON CONFLICT DO NOTHING", [run_id, epoch, status])
        assignments = ", ".join(f"{key} = ?" for key in updates)
        con.execute(f"UPDATE epochs SET {assignments} WHERE run_id = ? AND epoch = ?", [*updates.values(), run_id, epoch])


def record_traces(catalog: Catalog, *, run_id: str, epoch: int, traces: dict[str, Any]) -> None:
    """Record what publishing the epoch's traces to MLflow did (``epoch/traces.py``), whatever the epoch's status."""
    with catalog.write() as con:
        con.execute("UPDATE epochs SET traces = ? WHERE run_id = ? AND epoch = ?", [json.dumps(traces), run_id, epoch])


def next_epoch(catalog: Catalog, *, run_id: str) -> int:
    """Return the epoch to run next: an unfinished one if there is one, else the last completed + 1."""
    with catalog.read(spans=False) as con:
        rows = con.execute("SELECT epoch, status FROM epochs WHERE run_id = ? ORDER BY epoch", [run_id]).fetchall()
    for epoch, status in rows:
        if status != "completed":
            return epoch
    return rows[-1][0] + 1 if rows else 0


def epoch_rewards(catalog: Catalog, *, run_id: str, mode: str = "train") -> list[tuple[int, float | None, int, int]]:
    """Return (epoch, mean reward, succeeded rollouts, all rollouts) per epoch of a run."""
    with catalog.read(spans=False) as con:
        return con.execute(
            "SELECT epoch, avg(reward) FILTER (WHERE status = 'succeeded'), count(*) FILTER (WHERE status = 'succeeded'), count(*) "
            "FROM rollouts WHERE run_id = ? AND mode = ? GROUP BY epoch ORDER BY epoch",
            [run_id, mode],
        ).fetchall()


def chunks(items: list, size: int) -> Iterable[list]:
    """Yield consecutive slices of ``items`` of at most ``size``."""
    for start in range(0, len(items), size):
        yield items[start:start + size]
