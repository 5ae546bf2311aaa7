"""What a run's epochs and evaluations came to, from the state tables: one row per epoch (rewards, rollouts, our
failures), the held-out evaluations and their learning curve."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from lightning_core.epoch import bookkeeping as ep
from lightning_core.store.catalog import Catalog
from lightning_core.config import ArclightConfig
from lightning_core.epoch.context import RunContext
from lightning_core.rollouts.dataset import DatasetError, file_sha256


log = logging.getLogger("arclight.reports")


def summary_rows(ctx: RunContext) -> list[dict[str, Any]]:
    """Return one row per epoch of the run: rewards, rollout outcomes, versions."""
    config = ctx.config
    catalog = ctx.catalog
    with catalog.read(spans=False) as con:
        rows = con.execute(
            """
            SELECT e.epoch, e.status, e.policy_version, e.new_version, e.tasks_sampled, e.informative_groups,
                   avg(r.reward) FILTER (WHERE r.status = 'succeeded') AS reward_mean,
                   count(*) FILTER (WHERE r.status = 'succeeded') AS succeeded,
                   count(*) FILTER (WHERE r.status = 'failed') AS failed,
                   count(*) FILTER (WHERE r.status = 'timed_out') AS timed_out,
                   count(r.rollout_id) AS rollouts,
                   count(*) FILTER (WHERE r.infra_failures > 0) AS infra_retried,
                   count(*) FILTER (WHERE r.status <> 'planned' AND r.error_kind = 'infrastructure') AS infra_left_out,
                   any_value(e.incidents) AS incidents, any_value(e.staleness_max) AS staleness_max,
                   any_value(e.logprob_gap_mean) AS logprob_gap_mean, any_value(e.logprob_gap_max) AS logprob_gap_max,
                   any_value(e.clipped_first) AS clipped_first, any_value(e.behaviour_correction) AS behaviour_correction,
                   any_value(e.ppo_clipped_first) AS ppo_clipped_first,
                   any_value(e.behaviour_capped_first) AS behaviour_capped_first,
                   any_value(e.behaviour_weight_first) AS behaviour_weight_first,
                   any_value(e.traces) AS traces, any_value(e.entropy) AS entropy,
                   any_value(json_extract(e.stats, '$.signals')) AS signals
            FROM epochs e LEFT JOIN rollouts r ON r.run_id = e.run_id AND r.epoch = e.epoch AND r.mode = 'train'
            WHERE e.run_id = ?
            GROUP BY ALL ORDER BY e.epoch
            """,
            [config.run_name],
        ).fetchall()
    keys = ("epoch", "status", "policy_version", "new_version", "tasks_sampled", "informative_groups", "reward_mean",
            "succeeded", "failed", "timed_out", "rollouts", "infra_retried", "infra_left_out", "incidents", "staleness_max",
            "logprob_gap_mean", "logprob_gap_max", "clipped_first", "behaviour_correction", "ppo_clipped_first",
            "behaviour_capped_first", "behaviour_weight_first", "traces", "entropy", "signals")
    rows = [dict(zip(keys, row)) for row in rows]
    for row in rows:
        row["incidents"] = json.loads(row["incidents"]) if row["incidents"] else {}
        row["traces"] = json.loads(row["traces"]) if row["traces"] else None
        row["signals"] = json.loads(row["signals"]) if row["signals"] else []  # sql/epoch_signals.sql's rows
    return rows


def epoch_start_columns(results: list[dict[str, Any]]) -> dict[str, Any]:
    """The epoch's vLLM-against-trainer columns from its policies' first steps, before any update (issues 56, 68):
    each the worst over the policies (the mean behaviour weight: the farthest from 1)."""
    def values(key: str) -> list[float]:
        return [r[key] for r in results if r.get(key) is not None and r[key] == r[key]]  # not NaN

    def worst(key: str) -> float | None:
        return max(values(key), default=None)

    corrections = sorted({r["behaviour_correction"] for r in results if r.get("behaviour_correction")})
    return {"logprob_gap_mean": worst("logprob_gap/epoch_start_mean"),
            "logprob_gap_max": worst("logprob_gap/epoch_start_max"),
            "clipped_first": worst("clip_ratio/epoch_start"),  # ppo's versions only (decoupled: 1 by construction)
            "ppo_clipped_first": worst("clip_ratio/epoch_start_ppo_equivalent"),
            "behaviour_capped_first": worst("behaviour_weight/epoch_start_capped"),
            "behaviour_weight_first": max(values("behaviour_weight/epoch_start_mean"), key=lambda w: abs(w - 1),
                                          default=None),
            "behaviour_correction": ",".join(corrections) or None}


def eval_run_id(config: ArclightConfig) -> str:
    """Return the run that holds a project's evaluation rollouts."""
    return f"{config.run_name}.eval"


def eval_dataset(config: ArclightConfig, *, tasks: int | None = None) -> dict[str, Any]:
    """Say what an evaluation runs on: the held-out file's path, the sha256 of its bytes and the cap on its tasks
    (``tasks``, else ``rollouts.eval_tasks``). Two evaluations of the same versions are one only when these match."""
    path = config.rollouts.eval_dataset
    if path is None:
        raise DatasetError("rollouts.eval_dataset is not set: point it at a JSONL file of held-out tasks")
    if not Path(path).is_file():
        raise DatasetError(f"held-out dataset {path} not found: set rollouts.eval_dataset to a JSONL file")
    return {"dataset": str(path), "dataset_sha256": file_sha256(path),
            "eval_tasks": tasks or config.rollouts.eval_tasks}


def eval_epoch(catalog: Catalog, *, run_id: str, label: str, dataset: dict[str, Any] | None = None) -> int:
    """Return the eval epoch of ``label`` (the versions evaluated) on ``dataset`` (``eval_dataset``): its earlier one,
    or a new one. An epoch recorded without the dataset's identity (a lake from before it was kept) matches none."""
    with catalog.read(spans=False) as con:
        rows = con.execute("SELECT epoch, policy_version, stats FROM epochs WHERE run_id = ? ORDER BY epoch",
                           [run_id]).fetchall()
    for number, evaluated, stats in rows:
        kept = json.loads(stats) if stats else {}
        if evaluated == label and all(kept.get(key) == value for key, value in (dataset or {}).items()):
            return number
    number = rows[-1][0] + 1 if rows else 0
    ep.set_epoch_status(catalog, run_id=run_id, epoch=number, status="planned", policy_version=label,
                        **({"stats": dataset} if dataset else {}))
    return number


def eval_label(config: ArclightConfig, serving: dict[str, str], *, tasks: int | None = None,
               prompt_versions: dict[str, str] | None = None) -> str:
    """Name an evaluation by the versions serving (``calc-v5``, ``base``), then the prompt versions used
    (``base system-v2``), plus ``@N`` on a task subset."""
    label = ",".join(serving.values())
    if prompt_versions:
        label += " " + ",".join(prompt_versions[name] for name in sorted(prompt_versions))
    if tasks is not None and tasks != config.rollouts.eval_tasks:
        label += f"@{tasks}"
    return label


def record_eval(ctx: RunContext, *, epoch: int, label: str, run_id: str | None = None) -> dict[str, Any]:
    """Mark an eval epoch complete, noting how many training epochs the evaluated policy had; return its result.
    ``run_id``: the run that holds it (default ``eval_run_id``; ``validation.run_id`` for a validation)."""
    config = ctx.config
    catalog = ctx.catalog
    run_id = run_id or eval_run_id(config)
    with catalog.read(spans=False) as con:
        row = con.execute("SELECT stats FROM epochs WHERE run_id = ? AND epoch = ?", [run_id, epoch]).fetchall()
    stats = json.loads(row[0][0]) if row and row[0][0] else {}
    if "after_epochs" not in stats:  # an evaluation reused later keeps the epoch count of its first run
        stats["after_epochs"] = sum(1 for r in summary_rows(ctx) if r["status"] == "completed")
    stats.setdefault("dataset", str(config.rollouts.eval_dataset))  # eval_dataset's identity put it there at planning
    ep.set_epoch_status(catalog, run_id=run_id, epoch=epoch, status="completed", stats=stats)
    return {**eval_result(ctx, epoch=epoch, label=label, run_id=run_id), "dataset": stats["dataset"],
            "after_epochs": stats["after_epochs"]}


def eval_curve(ctx: RunContext) -> list[dict[str, Any]]:
    """Return the run's completed evaluations on its eval dataset, in training order: epochs trained, label,
    tasks, success, reward."""
    config = ctx.config
    success = config.trainer.success_reward
    with ctx.catalog.read(spans=False) as con:
        rows = con.execute(
            """
            SELECT CAST(json_extract(e.stats, '$.after_epochs') AS BIGINT) AS after_epochs, e.policy_version AS label,
                   e.epoch AS eval_epoch, count(r.rollout_id) AS tasks,
                   avg(coalesce(r.reward, 0)) AS reward_mean,
                   count(*) FILTER (WHERE r.reward >= $success) / count(r.rollout_id) AS success_rate
            FROM epochs e JOIN rollouts r ON r.run_id = e.run_id AND r.epoch = e.epoch AND r.mode = 'eval'
                 AND coalesce(r.error_kind, '') <> 'infrastructure'  -- our failures score nothing (eval_result)
            WHERE e.run_id = $run AND e.status = 'completed' AND json_extract(e.stats, '$.after_epochs') IS NOT NULL
              AND coalesce(json_extract_string(e.stats, '$.dataset'), $dataset) = $dataset
            GROUP BY ALL ORDER BY after_epochs, eval_epoch
            """,
            {"success": success, "run": eval_run_id(config), "dataset": str(config.rollouts.eval_dataset)},
        ).fetchall()
    keys = ("after_epochs", "label", "eval_epoch", "tasks", "reward_mean", "success_rate")
    return [dict(zip(keys, row)) for row in rows]


def eval_result(ctx: RunContext, *, epoch: int, label: str, run_id: str | None = None) -> dict[str, Any]:
    """Return reward and success rate of one evaluation: the agent's failures count as 0; tasks our services failed
    every time (``left_out``) are not scored, since they say nothing about the policy."""
    config = ctx.config
    success = config.trainer.success_reward
    with ctx.catalog.read(spans=False) as con:
        n, reward, successes, failed, left_out = con.execute(
            "SELECT count(*) FILTER (WHERE NOT ours), avg(coalesce(reward, 0)) FILTER (WHERE NOT ours), "
            "count(*) FILTER (WHERE reward >= ? AND NOT ours), count(*) FILTER (WHERE status <> 'succeeded' AND NOT ours), "
            "count(*) FILTER (WHERE ours) "
            "FROM (SELECT *, coalesce(error_kind, '') = 'infrastructure' AS ours FROM rollouts "
            "      WHERE run_id = ? AND epoch = ? AND mode = 'eval')",
            [success, run_id or eval_run_id(config), epoch],
        ).fetchall()[0]
    return {"label": label, "eval_epoch": epoch, "tasks": n, "reward_mean": reward,
            "success_rate": (successes / n) if n else None, "failed": failed, "left_out": left_out}
