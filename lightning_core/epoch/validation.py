"""Keep the best version: scores on a validation split of the training tasks (``rollouts.validation_tasks``, held out of
every epoch's draw: ``draw.validation_split``), taken greedily every ``rollouts.validate_every`` epochs, since a run's
scores can peak and then collapse. The best validated version is the run's result; training goes on from the newest.

Validation rollouts go to a run of their own, ``<run>.validation``, one epoch per validated set of versions, whose
``stats`` say what was scored (the training file and its sha256, the split's size, seed and balance, the versions, the
epochs trained): a validation is never taken for an evaluation on ``rollouts.eval_dataset`` (``<run>.eval``).
"""

from __future__ import annotations

import json
from typing import Any

from lightning_core.config import ArclightConfig
from lightning_core.epoch import draw
from lightning_core.epoch.context import RunContext

IDENTITY = ("dataset", "dataset_sha256", "validation_tasks", "seed", "balance_by")


def run_id(config: ArclightConfig) -> str:
    """The run that holds a project's validation rollouts."""
    return f"{config.run_name}.validation"


def due(config: ArclightConfig, *, completed: int, target: int) -> bool:
    """Whether the version after ``completed`` epochs is validated: every ``validate_every``-th and after the last
    (``target``). The version a ``train`` call starts from is validated too (``flows.train.train``)."""
    every = config.rollouts.validate_every
    return bool(every) and (completed == 0 or completed % every == 0 or completed == target)


def curve(ctx: RunContext) -> list[dict[str, Any]]:
    """The run's completed validations on its split, in training order: epochs trained, label, versions, tasks,
    reward (the agent's failures count 0; rollouts our services failed every time are not scored) and success."""
    config = ctx.config
    identity = draw.dataset_identity(config)
    with ctx.catalog.read(spans=False) as con:
        rows = con.execute(
            """
            SELECT e.stats, e.policy_version AS label, e.epoch AS eval_epoch, count(r.rollout_id) AS tasks,
                   avg(coalesce(r.reward, 0)) AS reward_mean,
                   count(*) FILTER (WHERE r.reward >= $success) / count(r.rollout_id) AS success_rate
            FROM epochs e JOIN rollouts r ON r.run_id = e.run_id AND r.epoch = e.epoch AND r.mode = 'eval'
                 AND coalesce(r.error_kind, '') <> 'infrastructure'
            WHERE e.run_id = $run AND e.status = 'completed'
            GROUP BY ALL ORDER BY eval_epoch
            """,
            {"success": config.trainer.success_reward, "run": run_id(config)},
        ).fetchall()
    found = []
    for stats, label, eval_epoch, tasks, reward, success in rows:
        kept = json.loads(stats) if stats else {}
        if "after_epochs" in kept and all(kept.get(k) == identity[k] for k in IDENTITY):
            found.append({"after_epochs": kept["after_epochs"], "label": label, "versions": kept.get("versions") or {},
                          "eval_epoch": eval_epoch, "tasks": tasks, "reward_mean": reward, "success_rate": success})
    return sorted(found, key=lambda c: (c["after_epochs"], c["eval_epoch"]))


def best(rows: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The validation with the highest mean reward; the earliest of equal ones (a later one must do better)."""
    scored = [r for r in rows if r["reward_mean"] is not None]
    return max(scored, key=lambda r: (r["reward_mean"], -r["after_epochs"]), default=None)


def result_versions(ctx: RunContext) -> dict[str, str] | None:
    """The versions the run gives as its result: the best validated ones (policy -> version id, or 'base' for the
    starting model); None with validation off or not yet scored, when the newest versions are the result."""
    if not ctx.config.rollouts.validate_every:
        return None
    chosen = best(curve(ctx))
    return dict(chosen["versions"]) if chosen and chosen["versions"] else None


def describe(rows: list[dict[str, Any]], *, config: ArclightConfig, newest: str | None = None) -> str:
    """One line for the summary: the scores, then the best version, which is the run's result."""
    if not rows:
        return ""
    points = " -> ".join(f"{r['reward_mean']:.3f} ({r['label']}, {r['after_epochs']} epochs)" for r in rows)
    chosen = best(rows)
    line = f"validation ({config.rollouts.validation_tasks} training tasks held out, greedy, reward): {points}"
    if chosen is not None:
        line += (f"; best: {chosen['label']} after {chosen['after_epochs']} epochs ({chosen['reward_mean']:.3f}), "
                 "the run's result, served at its end and by `arclight evaluate`")
        if newest and newest != chosen["label"]:
            line += f" (training continues from {newest})"
    return line
