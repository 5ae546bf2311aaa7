"""Prefect flow ``optimize-prompt``: GEPA (the gepa library) over the project's prompt resources (APO).

start:  score the serving prompts on the validation split (tasks_per_eval training tasks)
repeat: GEPA picks a candidate, runs it on a minibatch of training tasks, reads the trajectories from the lake
        (SQL), asks the critic for an edit, scores the edit on the minibatch and, when better, on the validation split
end:    promote the best candidate on the validation split; score start and best on the held-out tasks

Every evaluation GEPA asks for is an epoch of the run ``<run>.apo`` (its ``policy_version`` names the prompt
versions and the tasks), and GEPA keeps its own state in the lake's state folder, so a search cut off anywhere
resumes: finished evaluations are reused and an evaluation's missing rollouts run. (Our beam search was
replaced by GEPA, issue 73.)
"""

from __future__ import annotations

import time
from typing import Any

from prefect import flow, get_run_logger
from prefect.artifacts import create_table_artifact
from prefect.task_runners import ThreadPoolTaskRunner

from flows.train import TASK_THREADS, _prepare, load, run_evaluation, run_round, running
from lightning_core import tracking
from lightning_core.apo import prompts
from lightning_core.apo import search as apo
from lightning_core.apo.critic import make_critic
from lightning_core.apo.prompts import PromptVersion
from lightning_core.epoch import bookkeeping as ep
from lightning_core.epoch import reports, stages
from lightning_core.epoch.context import RunContext
from tasks import epoch as t


def evaluate_versions(ctx: RunContext, chosen: dict[str, PromptVersion], tasks: list[dict[str, Any]]) -> tuple[int, dict[str, float]]:
    """GEPA's evaluation: run the chosen prompt versions on ``tasks`` (or reuse that evaluation); return (epoch, task scores)."""
    from lightning_core.apo import gepa_adapter

    config, catalog = ctx.config, ctx.catalog
    po, run_id = config.prompt_optimization, apo.run_id(config)
    epoch = reports.eval_epoch(catalog, run_id=run_id, label=gepa_adapter.label(chosen, tasks))
    done = ep.epoch_status(catalog, run_id=run_id, epoch=epoch) == "completed"
    if not done:
        ep.plan_tasks(catalog, run_id=run_id, epoch=epoch, mode="apo", tasks=tasks, group_size=po.samples_per_task)
        settings = stages.runner_settings(ctx, mode="apo", prompt_texts=chosen, temperature=po.temperature)
        run_round(ctx, run_id=run_id, epoch=epoch, mode="apo", settings=settings)
        mean, n = apo.score(catalog, run_id=run_id, epoch=epoch)
        ep.set_epoch_status(catalog, run_id=run_id, epoch=epoch, status="completed",
                            stats={"prompt_versions": prompts.version_ids(chosen), "score": mean, "rollouts": n})
        get_run_logger().info("gepa: %s scored %.3f on %d rollouts", "+".join(prompts.version_ids(chosen).values()),
                              mean or 0.0, n)
    return epoch, gepa_adapter.task_scores(catalog, run_id=run_id, epoch=epoch)


class _GepaLog:
    """GEPA's logger: its lines go to the flow run's log."""

    def log(self, message: str) -> None:
        get_run_logger().info("gepa: %s", message)


def run_gepa(ctx: RunContext) -> dict[str, Any]:
    """Run (or resume) GEPA over the named prompts; promote and evaluate the best candidate; return the summary."""
    import gepa

    from lightning_core.apo import gepa_adapter

    logger = get_run_logger()
    started = time.monotonic()
    config, catalog, stack = ctx.config, ctx.catalog, ctx.services
    po, run_id = config.prompt_optimization, apo.run_id(config)
    names, budget = apo.target_prompts(config), apo.gepa_budget(config)
    t.redeploy(ctx)  # prompts are scored against the policy that serves now
    serving = prompts.resolve(catalog, config)
    start = {name: serving[name] for name in names}
    run_dir = catalog.state_root / "gepa" / run_id  # GEPA's own state: a second run resumes from it
    train, val = gepa_adapter.split_tasks(config)
    gateway = stack.gateway_client(config)
    try:
        critic = make_critic(config, gateway_client=gateway, collector_url=stack.collector.url,
                             collector_token=config.collector.token)
        adapter = gepa_adapter.ArclightAdapter(
            catalog=catalog, run_id=run_id, start=start, critic=critic, val_ids=[t["id"] for t in val],
            evaluate_fn=lambda chosen, tasks: evaluate_versions(ctx, chosen, tasks),
            success=config.trainer.success_reward, max_prompt_chars=po.max_prompt_chars, journal=run_dir / "reflections.jsonl")
        result = gepa.optimize(
            seed_candidate={name: v.text for name, v in start.items()}, trainset=train, valset=val, adapter=adapter,
            reflection_minibatch_size=po.minibatch_size, max_metric_calls=budget, seed=po.seed,
            perfect_score=config.trainer.success_reward, run_dir=str(run_dir), logger=_GepaLog(), raise_on_exception=True)
    finally:
        gateway.close()
    if adapter.errors:  # GEPA logged these and went on without a proposal: say so rather than report a quiet search
        raise apo.ApoError(f"{len(adapter.errors)} GEPA iterations failed in the reflective dataset or the critic (its state "
                           f"is kept in {run_dir}; a second run resumes there); the first: {adapter.errors[0]!r}") \
            from adapter.errors[0]
    versions = [adapter.versions_of(c) for c in result.candidates]
    joined = ["+".join(v.version for v in chosen.values()) for chosen in versions]
    best_versions = versions[result.best_idx]
    for chosen, score in zip(versions, result.val_aggregate_scores):
        for v in chosen.values():
            prompts.set_score(catalog, v.version, score=score, tasks=len(val))
    promoted = False
    for name, version in best_versions.items():
        if po.promote and version.version != prompts.serving_version(catalog, name).version:
            prompts.promote(catalog, version.version)
            promoted = True
            logger.info("prompt %s now serves %s (was %s)", name, version.version, start[name].version)
    search_s = time.monotonic() - started
    start_label, best_label = "+".join(v.version for v in start.values()), joined[result.best_idx]
    held_out = {}
    if po.held_out and config.rollouts.eval_dataset is not None:
        for label, chosen in {start_label: start, best_label: best_versions}.items():
            held_out[label] = run_evaluation(ctx, prompt_versions=[v.version for v in chosen.values()])
    rollouts = apo.rollouts_used(catalog, run_id=run_id)
    rounds = []
    for i, score in enumerate(result.val_aggregate_scores):  # one row per candidate GEPA kept, in the order found
        best_so_far = max(range(i + 1), key=lambda j: (result.val_aggregate_scores[j], -j))
        rounds.append({"round": i, "candidates": i + 1, "new": int(i > 0), "scores": {joined[i]: score},
                       "parents": [joined[p] for p in result.parents[i] if p is not None],
                       "best": joined[best_so_far], "best_score": result.val_aggregate_scores[best_so_far],
                       "rollouts": result.discovery_eval_counts[i] * po.samples_per_task, "proposals": 0, "rejected": []})
    if rounds:
        rounds[-1].update({"proposals": adapter.proposals, "rejected": adapter.rejected, "rollouts": rollouts})
    summary = {
        "algorithm": "gepa", "prompt": "+".join(names), "run_id": run_id, "start": start_label, "best": best_label,
        "best_versions": prompts.version_ids(best_versions), "promoted": promoted,
        "start_score": result.val_aggregate_scores[0], "best_score": result.val_aggregate_scores[result.best_idx],
        "rounds": rounds, "rollouts": rollouts, "metric_calls": result.total_metric_calls, "max_metric_calls": budget,
        "critic_calls": getattr(critic, "calls", 0), "search_s": search_s, "wall_s": time.monotonic() - started,
        "held_out": {v: {k: r[k] for k in ("label", "tasks", "reward_mean", "success_rate")} for v, r in held_out.items()},
    }
    candidates = [vars(v) for name in names for v in prompts.versions(catalog, name)]
    create_table_artifact(
        [{k: c[k] for k in ("version", "parent_version", "made_by", "round", "score", "score_tasks", "serving")} for c in candidates],
        key=t.artifact_key(run_id, "prompt-candidates"), description=f"Prompt versions of {', '.join(names)} after GEPA")
    tracking.log_prompt_search(config, summary, candidates, lake=catalog.lake_id())
    return summary


@flow(name="optimize-prompt", task_runner=ThreadPoolTaskRunner(max_workers=TASK_THREADS), log_prints=True)
def optimize_prompt(config_path: str | None = None, overrides: list[str] | None = None) -> dict[str, Any]:
    """Optimise the project's prompts by GEPA with a critic; promote the best version (resumable)."""
    config = load(config_path, overrides)
    _prepare(config)
    with running(config) as ctx:
        return run_gepa(ctx)
