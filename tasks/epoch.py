"""Prefect tasks: a few lines around each ``lightning_core`` stage (retries, timeouts, artifacts).

Each takes the run's context (``RunContext``: config, catalog, services), built once by the flow.
"""

from __future__ import annotations

import re
import threading
from typing import Any

from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE

from lightning_core import tracking
from lightning_core.common.services import ServiceError
from lightning_core.epoch import bookkeeping as ep
from lightning_core.epoch import deploy, failures, reports, stages, traces, validation
from lightning_core.epoch.context import RunContext
from lightning_core.rollouts.runner import RolloutOutcome, RolloutSpec, RunnerSettings

_slots: dict[int, threading.BoundedSemaphore] = {}
_slots_guard = threading.Lock()


def artifact_key(*parts: Any) -> str:
    """Return a Prefect artifact key (lowercase letters, digits, dashes) built from ``parts``."""
    return re.sub(r"[^a-z0-9-]+", "-", "-".join(str(p) for p in parts).lower()).strip("-")


def _slot(concurrency: int) -> threading.BoundedSemaphore:
    with _slots_guard:
        return _slots.setdefault(concurrency, threading.BoundedSemaphore(concurrency))


@task(name="plan", cache_policy=NO_CACHE, retries=2, retry_delay_seconds=2)
def plan(ctx: RunContext, *, run_id: str, epoch: int, mode: str = "train", eval_tasks: int | None = None
         ) -> list[RolloutSpec]:
    """Plan the epoch's rollouts (idempotent) and return those still to run."""
    ep.plan_epoch(ctx.config, ctx.catalog, run_id=run_id, epoch=epoch, mode=mode, eval_tasks=eval_tasks)
    return ep.pending_rollouts(ctx.catalog, run_id=run_id, epoch=epoch, mode=mode)


@task(name="plan-more", cache_policy=NO_CACHE, retries=2, retry_delay_seconds=2)
def plan_more(ctx: RunContext, *, run_id: str, epoch: int, count: int) -> list[RolloutSpec]:
    """Dynamic sampling: add ``count`` tasks the epoch has not drawn; return their rollouts."""
    return ep.plan_more_tasks(ctx.config, ctx.catalog, run_id=run_id, epoch=epoch, count=count)


@task(name="rollouts", cache_policy=NO_CACHE, task_run_name="rollouts-{specs[0].group_id}")
def rollouts(
    specs: list[RolloutSpec], *, settings: RunnerSettings, first_attempts: dict[str, int], concurrency: int,
) -> list[RolloutOutcome]:
    """Run a batch of rollouts (whole GRPO groups), at most ``concurrency`` at once in this process; return outcomes.

    One task per group rather than per rollout: a rollout's own work is a process and a few HTTP
    calls, and per-rollout task runs plus catalog writes cost the flow about as much CPU again.
    It needs only ``settings`` (the gateway's and collector's URLs and tokens), so it runs on a Dask
    or Ray worker as well; the flow records the outcomes in the catalog. The engine never runs one batch twice under
    the same attempt numbers (``failures.refuse_a_second_run``).
    """
    failures.refuse_a_second_run()
    return stages.run_rollout_batch(settings, specs, first_attempts=first_attempts, slot=_slot(concurrency))


def _worth_retrying(task, task_run, state) -> bool:
    """Retry a stage that failed by chance, not one that said what is wrong (a collector that cannot store spans)."""
    try:
        state.result()
    except (ServiceError, failures.RunStopped):
        return False
    except Exception:
        return True
    return True


@task(name="ingest-barrier", cache_policy=NO_CACHE, retries=2, retry_delay_seconds=5, timeout_seconds=300,
      retry_condition_fn=_worth_retrying)
def ingest(ctx: RunContext, *, run_id: str, epoch: int, mode: str = "train") -> dict[str, int]:
    """Wait until every span of the epoch is in the lake; fail the rollouts whose spans say they failed."""
    return stages.ingest_barrier(ctx, run_id=run_id, epoch=epoch, mode=mode)


@task(name="triplets", cache_policy=NO_CACHE, retries=1, timeout_seconds=1800)
def triplets(ctx: RunContext, *, run_id: str, epoch: int) -> dict[str, Any]:
    """Repair spans and materialize triplets with advantages; publish counts as an artifact."""
    report = stages.materialize(ctx, run_id=run_id, epoch=epoch)
    rows = [
        {"policy": p.policy, "agent_match": p.agent_match or "(all)", "triplets": p.triplets, "rollouts": p.rollouts,
         "groups": p.groups, "zero_adv_groups": len(p.zero_advantage_groups), "missing_token_ids": p.missing_token_ids,
         "no_reward": p.no_reward, "groups_left_out_infra": p.infra_dropped_groups}
        for p in report.policies
    ]
    for p in report.policies:
        if p.infra_dropped_groups:
            get_run_logger().warning("policy %s, epoch %s: %d groups left out: our services failed one of their rollouts "
                                     "every time it ran", p.policy, epoch, p.infra_dropped_groups)
    create_table_artifact(rows, key=artifact_key(run_id, "triplets", epoch), description=f"Triplets of epoch {epoch}")
    agents = [{**vars(a), "policy": a.policy or "frozen"} for a in report.agent_epochs]
    ep.record_agent_epochs(ctx.catalog, run_id=run_id, epoch=epoch, rows=report.agent_epochs)
    create_table_artifact(agents, key=artifact_key(run_id, "agents", epoch),
                          description=f"Agents of epoch {epoch}: calls, triplets, reward and success of their rollouts")
    silences = [s.message(missing_reward=ctx.config.pipeline.missing_reward) for s in report.silences]
    for message in silences:  # rollouts whose spans gave no call or no reward: loud, in the flow's log
        get_run_logger().warning(message)
    return {"spans": report.spans, "llm_calls": report.llm_calls, "policies": rows, "seconds": report.seconds,
            "silences": silences, "informative_groups": report.informative_groups, "span_versions": report.span_versions,
            "output_versions": report.output_versions, "span_files": report.span_files,
            "agents": agents, "signals": [row for p in report.policies for row in p.signals]}


# log_prints off: the trainer's libraries print to a stdout they capture themselves (dill disassembles a function
# to find its globals while datasets fingerprints SFT's preprocessing), and Prefect's print patch sent those 180
# lines of bytecode to the run's log instead (and dill found no globals)
@task(name="train", cache_policy=NO_CACHE, timeout_seconds=4 * 3600, log_prints=False)
def train(ctx: RunContext, *, run_id: str, epoch: int, abandon: threading.Event | None = None) -> list[dict[str, Any]]:
    """Train each policy on its triplets; return one summary per policy. ``abandon``: stop before the next micro-batch
    once set (the flow left while this task ran beside the next epoch's rollouts)."""
    results = stages.train(ctx, run_id=run_id, epoch=epoch, abandon=abandon)
    return [
        {"policy": r.policy, "version": r.version, "parent_version": r.parent_version, "message": r.message,
         **{k: r.metrics.get(k) for k in ("reward/mean", "loss", "kl", "clip_ratio", "grad_norm", "tokens_per_s",
                                          "staleness/max", "train_time_s", "entropy", "logprob_gap/epoch_start_mean",
                                          "logprob_gap/epoch_start_max", "clip_ratio/epoch_start",
                                          "clip_ratio/epoch_start_ppo_equivalent",
                                          "behaviour_weight/epoch_start_capped", "behaviour_weight/epoch_start_mean",
                                          "behaviour_correction", "kl_reference", "kl_reference_version")}}
        for r in results
    ]


@task(name="redeploy", cache_policy=NO_CACHE, retries=2, retry_delay_seconds=5, timeout_seconds=600)
def redeploy(ctx: RunContext, *, result: bool = False) -> list[dict[str, Any]]:
    """Serve the newest version of every policy; the old one stays loaded for rollback. ``result``: serve the run's
    result instead, its best validated versions (``rollouts.validate_every``; the newest when validation is off)."""
    versions = validation.result_versions(ctx) if result else None
    return [vars(d) for d in deploy.deploy_latest(ctx, versions=versions)]


@task(name="publish-traces", cache_policy=NO_CACHE)  # bounded by tracking.traces_timeout_s, its own deadline
def publish_traces(ctx: RunContext, *, run_id: str, epoch: int, mode: str = "train", label: str | None = None
                   ) -> dict[str, Any]:
    """Publish the epoch's rollouts as MLflow traces (bounded by tracking.traces_timeout_s, not retried: what is left
    ``arclight traces`` publishes later); a failure is in the result, never a failed epoch. The flow logs the result's
    ``summary`` (a line of a task run would read "Task run 'publish-traces-...'" on a worker's output)."""
    report = traces.publish_epoch(ctx.config, run_id=run_id, epoch=epoch, mode=mode, catalog=ctx.catalog, label=label)
    result = {"published": report.published, "already": report.already, "left": report.left, "chosen": report.chosen,
              "rollouts": report.rollouts, "seconds": report.seconds, "error": report.error, "mode": report.mode}
    ep.record_traces(ctx.catalog, run_id=run_id, epoch=epoch, traces=result)
    return {**result, "summary": report.summary()}


def log_traces(result: dict[str, Any] | None) -> None:
    """The flow's line of what publishing an epoch's traces did: a warning when some are missing."""
    if result:
        (get_run_logger().warning if result["error"] or result["left"] else get_run_logger().info)(result["summary"])


@task(name="log-eval-curve", cache_policy=NO_CACHE, retries=1)
def log_eval_curve(ctx: RunContext) -> list[dict[str, Any]]:
    """Log the held-out learning curve to MLflow (metrics and a plot); return it."""
    curve = reports.eval_curve(ctx)
    tracking.log_eval_curve(ctx.config, curve, reports.summary_rows(ctx), lake=ctx.catalog.lake_id())
    return curve


def log_validation(ctx: RunContext) -> list[dict[str, Any]]:
    """Log the newest validation score (``validation_reward``) and the best validated version to MLflow; return the
    run's validations."""
    rows = validation.curve(ctx)
    tracking.log_validation(ctx.config, rows, validation.best(rows), lake=ctx.catalog.lake_id())
    return rows


def publish_epoch_report(ctx: RunContext, *, run_id: str, epoch: int) -> None:
    """Publish the run's per-epoch summary table and a markdown report with the reward curve."""
    config = ctx.config
    rows = reports.summary_rows(ctx)
    create_table_artifact(rows, key=artifact_key(run_id, "epochs"), description=f"Run {run_id}: one row per epoch")
    lines = [f"# Run `{run_id}` after epoch {epoch}", "",
             "| epoch | reward | succeeded | failed | timed out | ours: retried/left out | served | trained |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        reward = "" if r["reward_mean"] is None else f"{r['reward_mean']:.3f}"
        lines.append(f"| {r['epoch']} | {reward} {_bar(r['reward_mean'])} | {r['succeeded']} | {r['failed']} | "
                     f"{r['timed_out']} | {r['infra_retried']}/{r['infra_left_out']} | {r['policy_version'] or ''} | "
                     f"{r['new_version'] or ''} |")
    incidents = [(r["epoch"], failures.describe_incidents(r["incidents"])) for r in rows if r["incidents"]]
    if incidents:
        lines += ["", "Our services (rollouts they failed never train):", ""]
        lines += [f"- epoch {e}: {text}" for e, text in incidents]
    agents = ep.agent_epochs(ctx.catalog, run_id=run_id)
    current = [a for a in agents if a["epoch"] == epoch]
    if current:
        lines += ["", f"Agents in epoch {epoch}:", "", "| agent | trained by | calls | triplets | reward of its rollouts | success |",
                  "|---|---|---|---|---|---|"]
        for a in current:
            reward = "" if a["reward_mean"] is None else f"{a['reward_mean']:.3f}"
            success = "" if a["success_rate"] is None else f"{a['success_rate']:.0%}"
            lines.append(f"| {a['agent_name'] or '(no agent)'} | {a['policy'] or 'frozen'} | {a['calls']} | {a['triplets']} "
                         f"| {reward} | {success} |")
    tracking.log_agent_epochs(config, agents, epoch=epoch, lake=ctx.catalog.lake_id())
    signals = next((r["signals"] for r in rows if r["epoch"] == epoch), [])
    tracking.log_epoch_signals(config, signals, epoch=epoch, lake=ctx.catalog.lake_id())
    lines += ["", f"MLflow: `{config.mlflow_uri}` · lake: `{config.lake.path}` · state tables: `{ctx.catalog.state_root}`"]
    create_markdown_artifact("\n".join(lines), key=artifact_key(run_id, "report"), description="Reward per epoch")


def _bar(value: float | None, width: int = 20) -> str:
    if value is None:
        return ""
    filled = max(0, min(width, round(value * width)))
    return "`" + "█" * filled + "·" * (width - filled) + "`"
