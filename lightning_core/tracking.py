"""MLflow tracking of training: one MLflow run per (Arclight run, policy), resumed every epoch.

Per-step metrics (``loss``, ``kl``, ``clip_ratio``, ``entropy``, ``grad_norm``, ``tokens_per_s``)
use the global optimizer step; per-epoch metrics (``reward/mean``, ``reward/std``,
``success_rate``, ``triplets``, ``zero_adv_groups``, ``entropy/epoch_mean`` and the collapse signals of
``log_epoch_signals``) use the epoch as step, so the MLflow UI draws the reward curve; so do the per-agent
metrics ``agent/<name>/{calls,triplets,reward_mean,success_rate}`` (every agent, frozen ones too, logged to every
policy's run). Each epoch adds a reward-curve plot, a per-agent plot (``plots/agents.png``), a table of sample
trajectories and the checkpoint; each new version is registered as ``<project>-<policy>`` with an alias.

MLflow is not the lake's alone: a store outlives ``rm -rf .arclight`` (``mlflow.db`` sits beside it), and one tracking
server may serve several users of one project. So each run, model version and trace Arclight makes carries the lake's
id (``LAKE``, the catalog's ``Catalog.lake_id()``), and only what carries this lake's id is resumed, replaced or
counted as already there.
"""

from __future__ import annotations

import logging
import math
import os
import time
from pathlib import Path
from typing import Any, Callable

import mlflow
from mlflow.entities import Metric
from mlflow.tracking import MlflowClient

log = logging.getLogger(__name__)

EPOCH_METRICS = ("reward/mean", "reward/std", "success_rate", "triplets", "zero_adv_groups")
LAKE = "arclight.lake"  # the tag naming the lake a run, model version or trace belongs to


def experiment_id(config) -> str:
    """Point MLflow at the config's store and return the project's experiment (created if missing)."""
    mlflow.set_tracking_uri(config.mlflow_uri)
    name = config.tracking.experiment or config.name
    client = MlflowClient()
    existing = client.get_experiment_by_name(name)
    if existing is not None:
        return existing.experiment_id
    location = None
    if config.mlflow_uri.startswith("sqlite:"):  # keep artifacts next to the database, not in the cwd
        location = (Path(config.project_dir).resolve() / "mlartifacts").as_uri()
    return client.create_experiment(name, artifact_location=location)


def start_run(config, *, run_id: str, policy: str, params: dict[str, Any], lake: str) -> mlflow.ActiveRun:
    """Start (or resume) the MLflow run of ``run_id``/``policy`` in the lake ``lake`` (its id); log params it does not
    have yet. Another lake's run of the same names is left alone."""
    exp = experiment_id(config)
    client = MlflowClient()
    found = client.search_runs(
        [exp], filter_string=f"tags.`arclight.run_id` = '{run_id}' and tags.`arclight.policy` = '{policy}' "
                             f"and tags.`{LAKE}` = '{lake}'",
        max_results=1,
    )
    if found:
        active = mlflow.start_run(run_id=found[0].info.run_id)
        have = found[0].data.params
    else:
        active = mlflow.start_run(experiment_id=exp, run_name=f"{run_id}/{policy}",
                                  tags={"arclight.run_id": run_id, "arclight.policy": policy, LAKE: lake})
        have = {}
    _log_new_params(params, have=have)
    return active


def log_params(params: dict[str, Any]) -> None:
    """Log to the active run the params it does not have yet (a changed one as a tag, as ``start_run``)."""
    _log_new_params(params, have=MlflowClient().get_run(mlflow.active_run().info.run_id).data.params)


def _log_new_params(params: dict[str, Any], *, have: dict[str, str]) -> None:
    new = {k: _param(v) for k, v in params.items() if k not in have}
    changed = {k: _param(v) for k, v in params.items() if k in have and have[k] != _param(v)}
    if new:
        mlflow.log_params(new)
    if changed:  # MLflow params are immutable; record the change as a tag
        log.warning("params changed since the run started (kept as tags): %s", sorted(changed))
        mlflow.set_tags({f"param_changed.{k}": v for k, v in changed.items()})


def traces_url(config, *, ui: str = "http://127.0.0.1:5000") -> str:
    """The project's traces page in the MLflow UI (``mlflow ui`` on the tracking store; a tracking server's own URL)."""
    base = config.mlflow_uri.rstrip("/") if config.mlflow_uri.startswith(("http://", "https://")) else ui
    return f"{base}/#/experiments/{experiment_id(config)}/traces"


def runs_of(config, *, run_id: str, lake: str) -> list[str]:
    """The MLflow runs of an Arclight run of the lake ``lake``, one per policy that has trained (in the config's order
    of policies)."""
    exp = experiment_id(config)
    found = MlflowClient().search_runs(
        [exp], filter_string=f"tags.`arclight.run_id` = '{run_id}' and tags.`{LAKE}` = '{lake}'", max_results=100)
    by_policy = {r.data.tags.get("arclight.policy"): r.info.run_id for r in found}
    return [by_policy[p.name] for p in config.policies if p.name in by_policy]


def next_step(run_id: str) -> int:
    """Return the first unused global step of a run (steps continue across epochs)."""
    history = MlflowClient().get_metric_history(run_id, "loss")
    return max((m.step for m in history), default=-1) + 1


def log_metrics(metrics: dict[str, float], *, step: int) -> None:
    """Log the finite values of ``metrics`` at ``step``."""
    finite = {k: float(v) for k, v in metrics.items() if v is not None and math.isfinite(float(v))}
    if finite:
        mlflow.log_metrics(finite, step=step)


def log_reward_curve(run_id: str, *, epoch: int) -> str:
    """Plot the run's reward/mean (± reward/std) and success_rate per epoch; log it as an artifact."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    client = MlflowClient()
    mean = {m.step: m.value for m in client.get_metric_history(run_id, "reward/mean")}
    std = {m.step: m.value for m in client.get_metric_history(run_id, "reward/std")}
    success = {m.step: m.value for m in client.get_metric_history(run_id, "success_rate")}
    epochs = sorted(mean)
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ys = [mean[e] for e in epochs]
    ax.plot(epochs, ys, marker="o", label="reward/mean")
    if epochs and all(e in std for e in epochs):
        ax.fill_between(epochs, [mean[e] - std[e] for e in epochs], [mean[e] + std[e] for e in epochs], alpha=0.2)
    if success:
        ax.plot(sorted(success), [success[e] for e in sorted(success)], marker="s", label="success_rate")
    ax.set_xlabel("epoch")
    ax.set_ylabel("reward")
    ax.set_title("Reward per epoch")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    artifact = "plots/reward_curve.png"
    mlflow.log_figure(fig, artifact)
    plt.close(fig)
    return artifact


def log_eval_curve(config, curve: list[dict[str, Any]], train_rows: list[dict[str, Any]], *, lake: str) -> None:
    """Log the newest held-out evaluation (``eval/success_rate``, ``eval/reward_mean`` at step = epochs trained)
    and the learning-curve plot to every policy's MLflow run (of the lake ``lake``)."""
    if not curve:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    latest = curve[-1]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot([c["after_epochs"] for c in curve], [c["success_rate"] for c in curve], marker="o",
            label=f"held-out success ({latest['tasks']} tasks, greedy)")
    trained = [r for r in train_rows if r.get("reward_mean") is not None]
    if trained:  # epoch e's rollouts sampled the policy trained for e epochs
        ax.plot([r["epoch"] for r in trained], [r["reward_mean"] for r in trained], marker=".", alpha=0.6,
                label="train reward (sampled)")
    ax.set_xlabel("epochs trained")
    ax.set_ylim(0, 1.02)
    ax.set_title("Learning curve")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    fig.tight_layout()
    for policy in config.policies:
        with start_run(config, run_id=config.run_name, policy=policy.name, params={}, lake=lake) as run:
            step = int(latest["after_epochs"])
            logged = mlflow.MlflowClient().get_metric_history(run.info.run_id, "eval/success_rate")
            if all(m.step != step for m in logged):  # an evaluation reused by `arclight evaluate` is logged once
                log_metrics({"eval/success_rate": latest["success_rate"], "eval/reward_mean": latest["reward_mean"]},
                            step=step)
            mlflow.log_figure(fig, "plots/eval_curve.png")
    plt.close(fig)


def log_validation(config, rows: list[dict[str, Any]], best: dict[str, Any] | None, *, lake: str) -> None:
    """Log the newest validation (``validation_reward``, ``validation_success_rate`` at step = epochs trained) and the
    best validated version (tag ``validation_best_version``, metric ``validation_best_reward``: the run's result) to
    every policy's MLflow run (of the lake ``lake``)."""
    if not rows:
        return
    latest = rows[-1]
    step = int(latest["after_epochs"])
    for policy in config.policies:
        with start_run(config, run_id=config.run_name, policy=policy.name, params={}, lake=lake) as run:
            logged = mlflow.MlflowClient().get_metric_history(run.info.run_id, "validation_reward")
            if all(m.step != step for m in logged):  # a validation reused on resume is logged once
                log_metrics({"validation_reward": latest["reward_mean"],
                             "validation_success_rate": latest["success_rate"]}, step=step)
            if best is not None:
                mlflow.set_tags({"validation_best_version": best["label"],
                                 "validation_best_after_epochs": str(best["after_epochs"])})
                log_metrics({"validation_best_reward": best["reward_mean"]}, step=step)


NO_AGENT = "no_agent"  # the metrics of calls that no agent span owns (plain client code, agents in other languages)


def agent_metric_name(agent: str | None, metric: str) -> str:
    """``agent/<name>/<metric>`` (``agent/no_agent/<metric>`` for calls owned by no agent), the name cut to the
    characters MLflow accepts in a metric key (letters, digits, ``_-. /``; a slash inside a name becomes ``_``)."""
    import re

    name = re.sub(r"[^\w\-. ]", "_", agent) if agent is not None else NO_AGENT
    return f"agent/{name}/{metric}"


def log_agent_epochs(config, rows: list[dict[str, Any]], *, epoch: int, lake: str) -> None:
    """Log the per-agent metrics of ``epoch`` (``agent/<name>/{calls,triplets,reward_mean,success_rate}``,
    step = epoch) and a plot of every agent across the run's epochs, frozen agents dashed, to every
    policy's MLflow run (of the lake ``lake``). ``rows`` are the run's ``agent_epochs`` rows
    (``epoch.agent_epochs``)."""
    if not rows:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    agents = list(dict.fromkeys(r["agent_name"] for r in rows))
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(6.5, 5.5), sharex=True)
    for agent in agents:
        mine = [r for r in rows if r["agent_name"] == agent]
        policy = mine[-1]["policy"]
        label = f"{agent or '(no agent)'} ({'trained: ' + policy if policy else 'frozen'})"
        style = "-" if policy else "--"
        epochs = [r["epoch"] for r in mine]
        top.plot(epochs, [r["success_rate"] for r in mine], style, marker="o", label=label)
        bottom.plot(epochs, [r["triplets"] for r in mine], style, marker=".", label=label)
    top.set_ylabel("success of its rollouts")
    top.set_ylim(-0.02, 1.02)
    top.set_title("Per agent: success and training samples per epoch")
    top.grid(alpha=0.3)
    top.legend(fontsize="small", loc="best")
    bottom.set_ylabel("triplets")
    bottom.set_xlabel("epoch")
    bottom.grid(alpha=0.3)
    fig.tight_layout()
    current = [r for r in rows if r["epoch"] == epoch]
    for policy in config.policies:
        with start_run(config, run_id=config.run_name, policy=policy.name, params={}, lake=lake) as run:
            logged = MlflowClient().get_metric_history(run.info.run_id, agent_metric_name(current[0]["agent_name"], "calls")) if current else []
            if all(m.step != epoch for m in logged):  # a resumed epoch publishes its report again
                log_metrics({agent_metric_name(r["agent_name"], k): r[k] for r in current
                             for k in ("calls", "triplets", "reward_mean", "success_rate") if r[k] is not None}, step=epoch)
            mlflow.log_figure(fig, "plots/agents.png")
    plt.close(fig)


SIGNALS = ("zero_variance_groups", "reward_spread", "tool_calls_per_rollout")  # sql/epoch_signals.sql's columns


def signal_metrics(rows: list[dict[str, Any]], *, policy: str) -> dict[str, float]:
    """A policy's collapse signals of one epoch (``sql/epoch_signals.sql``'s rows) as MLflow metrics: ``SIGNALS`` over
    all its rollouts, and per value of ``rollouts.metrics_by`` the same and ``reward/mean`` under
    ``<metric>/<field>_<value>`` (``tool_calls_per_rollout/hops_2``: MLflow keys take no '=')."""
    import re

    metrics: dict[str, float] = {}
    for row in (r for r in rows if r["policy"] == policy):
        if row["slice"] == "all":
            metrics.update({name: row[name] for name in SIGNALS})
        else:
            key = re.sub(r"[^\w\-. ]", "_", row["slice"])
            metrics.update({f"{name}/{key}": row[name] for name in SIGNALS})
            metrics[f"reward/mean/{key}"] = row["reward_mean"]
    return metrics


def log_epoch_signals(config, rows: list[dict[str, Any]], *, epoch: int, lake: str) -> None:
    """Log each policy's collapse signals of ``epoch`` (``signal_metrics``, step = epoch) to its MLflow run (of the
    lake ``lake``)."""
    for policy in config.policies:
        metrics = signal_metrics(rows, policy=policy.name)
        if not metrics:
            continue
        with start_run(config, run_id=config.run_name, policy=policy.name, params={}, lake=lake) as run:
            logged = MlflowClient().get_metric_history(run.info.run_id, "zero_variance_groups")
            if all(m.step != epoch for m in logged):  # a resumed epoch publishes its report again
                log_metrics(metrics, step=epoch)


def log_prompt_search(config, summary: dict[str, Any], candidates: list[dict[str, Any]], *, lake: str) -> None:
    """Log a prompt search (GEPA) to its own MLflow run (``<run>.apo`` / ``prompt:<name>``, of the lake ``lake``): the best
    validation score as each candidate is kept (metric and plot), every candidate with score, parent and critique (a
    table), held-out scores."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    po = config.prompt_optimization
    params = {"apo.prompt": summary["prompt"], "apo.algorithm": summary["algorithm"],
              "apo.max_metric_calls": summary.get("max_metric_calls"), "apo.metric_calls": summary.get("metric_calls"),
              "apo.minibatch_size": po.minibatch_size, "apo.tasks_per_eval": po.tasks_per_eval,
              "apo.samples_per_task": po.samples_per_task, "apo.critic": po.critic.kind,
              "apo.critic_model": po.critic.function or po.critic.model or config.model.served_name}
    with start_run(config, run_id=summary["run_id"], policy=f"prompt:{summary['prompt']}", params=params, lake=lake):
        for r in summary["rounds"]:
            log_metrics({"apo/best_score": r["best_score"], "apo/candidates": r["candidates"], "apo/rollouts": r["rollouts"],
                         "apo/proposals": r["proposals"], "apo/rejected": len(r["rejected"])}, step=r["round"])
        for label, version in (("start", summary["start"]), ("best", summary["best"])):
            result = summary["held_out"].get(version)
            if result:
                log_metrics({f"apo/held_out_{label}_reward": result["reward_mean"],
                             f"apo/held_out_{label}_success": result["success_rate"]}, step=len(summary["rounds"]))
        log_metrics({"apo/wall_s": summary["wall_s"], "apo/search_s": summary["search_s"]}, step=len(summary["rounds"]))
        mlflow.set_tags({"apo.best": summary["best"], "apo.start": summary["start"], "apo.promoted": str(summary["promoted"])})
        columns = ("version", "parent_version", "made_by", "round", "score", "score_tasks", "serving", "critique", "text")
        mlflow.log_table(data={k: [_cell(c.get(k)) for c in candidates] for k in columns},
                         artifact_file="apo/candidates.json")
        fig, ax = plt.subplots(figsize=(6, 3.5))
        rounds = [r["round"] for r in summary["rounds"]]
        ax.plot(rounds, [r["best_score"] for r in summary["rounds"]], marker="o", label="best so far")
        for r in summary["rounds"]:
            ax.scatter([r["round"]] * len(r["scores"]), [v or 0.0 for v in r["scores"].values()], color="gray", alpha=0.5, s=12)
        ax.set_xlabel("candidate kept (0 = starting prompt)")
        ax.set_ylabel(f"mean reward ({po.tasks_per_eval} tasks)")
        ax.set_title(f"Prompt search: {summary['prompt']}")
        ax.grid(alpha=0.3)
        ax.legend(loc="lower right")
        fig.tight_layout()
        mlflow.log_figure(fig, "plots/apo_best_score.png")
        plt.close(fig)


def log_samples(rows: list[dict[str, Any]], *, epoch: int, limit: int) -> str | None:
    """Log up to ``limit`` trajectories (prompt, response, reward, advantage) as an MLflow table."""
    if limit <= 0 or not rows:
        return None
    picked = sorted(rows, key=lambda r: (str(r.get("group_id")), -float(r.get("reward") or 0.0)))[:limit]
    table = {
        key: [_cell(r.get(key)) for r in picked]
        for key in ("rollout_id", "group_id", "turn_index", "agent_name", "reward", "advantage",
                    "prompt_messages", "response_text")
    }
    artifact = f"samples/epoch_{epoch}.json"
    mlflow.log_table(data=table, artifact_file=artifact)
    return artifact


def log_checkpoint(path: Path, *, version: str) -> str:
    """Log a checkpoint folder as ``checkpoints/<version>``; return its artifact URI."""
    mlflow.log_artifacts(str(path), artifact_path=f"checkpoints/{version}")
    return mlflow.get_artifact_uri(f"checkpoints/{version}")


def step_logger(config, *, mlflow_run_id: str, first_step: int) -> Callable[[int, dict[str, float]], None]:
    """``on_step(i, metrics)`` for a process with no active run (a train host): log step ``i``'s finite metrics to the
    run ``mlflow_run_id`` on the tracking server, at the run's global step ``first_step + i``."""
    client = MlflowClient(tracking_uri=config.mlflow_uri)

    def on_step(i: int, metrics: dict[str, float]) -> None:
        now = int(time.time() * 1000)
        finite = [Metric(k, float(v), now, first_step + i) for k, v in metrics.items()
                  if v is not None and math.isfinite(float(v))]
        if finite:
            client.log_batch(mlflow_run_id, metrics=finite)

    return on_step


def log_checkpoint_to(config, path: Path, *, mlflow_run_id: str, version: str) -> str:
    """Log a checkpoint folder to the run ``mlflow_run_id`` on the tracking server as ``checkpoints/<version>`` (from a
    process with no active run: a train host); return its artifact URI (the registered version's source)."""
    client = MlflowClient(tracking_uri=config.mlflow_uri)
    client.log_artifacts(mlflow_run_id, str(path), artifact_path=f"checkpoints/{version}")
    return f"{client.get_run(mlflow_run_id).info.artifact_uri.rstrip('/')}/checkpoints/{version}"


def registered_model_name(config, policy: str) -> str:
    """Return the registry name of a policy: ``<project>-<policy>``."""
    return f"{config.name}-{policy}"


def register_version(config, *, policy: str, source: str, mlflow_run_id: str, version: str, alias: str,
                     lake: str) -> str:
    """Register a checkpoint as a model version of the lake ``lake``, alias it, and return the registry version
    number."""
    client = MlflowClient()
    name = registered_model_name(config, policy)
    if not client.search_registered_models(filter_string=f"name = '{name}'"):
        client.create_registered_model(name, tags={"arclight.policy": policy})
    # a model version of this id from this lake is an interrupted training's (registered, never recorded in the
    # catalog, which numbers versions): it points at weights nothing serves, so it goes before the version is
    # registered again. Another lake's version of the same id (the lake made again, another user) is that lake's.
    for orphan in client.search_model_versions(
            f"name = '{name}' AND tags.`arclight.version` = '{version}' AND tags.`{LAKE}` = '{lake}'"):
        client.delete_model_version(name, orphan.version)
    # register_model() of a plain artifact folder fails in MLflow 3.17 (no MLmodel); this does not.
    mv = client.create_model_version(name, source=source, run_id=mlflow_run_id,
                                     tags={"arclight.version": version, "arclight.policy": policy, LAKE: lake})
    set_alias(config, policy=policy, registry_version=str(mv.version), alias=alias)
    return str(mv.version)


def set_alias(config, *, policy: str, registry_version: str, alias: str) -> None:
    """Point ``alias`` of the policy's registered model at ``registry_version`` (serving, rollback)."""
    mlflow.set_tracking_uri(config.mlflow_uri)
    MlflowClient().set_registered_model_alias(registered_model_name(config, policy), alias, registry_version)


def _param(value: Any) -> str:
    text = str(value)
    return text if len(text) <= 6000 else text[:6000]


def _cell(value: Any) -> Any:
    if value is None or isinstance(value, (int, float, str)):
        return value
    return str(value)


os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
