"""Prefect flow ``optimize-prompt``: beam search over a prompt resource with textual gradients (APO).

round 0: score the starting prompt (the serving version) on a sample of training tasks
round r: for each prompt in the beam: failures (SQL) -> critique -> edited prompts;
         score the beam and the new candidates on round r's tasks; keep the best beam_width
end:     promote the best prompt to serving; score start and best on the held-out tasks

Every candidate evaluation is an epoch of the run ``<run>.apo`` (its ``policy_version`` names the
prompt version and round), so a search cut off anywhere resumes: finished evaluations are reused,
an evaluation's missing rollouts run, and candidates already written for a round are not asked
for again.
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
from lightning_core.apo.critic import CallSite, Critic, make_critic
from lightning_core.apo.prompts import PromptVersion
from lightning_core.epoch import bookkeeping as ep
from lightning_core.epoch import reports, stages
from lightning_core.epoch.context import RunContext
from tasks import epoch as t


def evaluate_candidate(ctx: RunContext, *, name: str, version: PromptVersion, round: int,
                       tasks: list[dict[str, Any]]) -> tuple[float | None, int, int]:
    """Run ``version`` of prompt ``name`` on the round's tasks (or reuse that evaluation); return (score, rollouts, epoch)."""
    config, catalog = ctx.config, ctx.catalog
    po, run_id = config.prompt_optimization, apo.run_id(config)
    epoch = reports.eval_epoch(catalog, run_id=run_id, label=f"{version.version} r{round}")
    done = ep.epoch_status(catalog, run_id=run_id, epoch=epoch) == "completed"
    if not done:
        ep.plan_tasks(catalog, run_id=run_id, epoch=epoch, mode="apo", tasks=tasks, group_size=po.samples_per_task)
        settings = stages.runner_settings(ctx, mode="apo", prompt_texts={name: version}, temperature=po.temperature)
        run_round(ctx, run_id=run_id, epoch=epoch, mode="apo", settings=settings)
    mean, n = apo.score(catalog, run_id=run_id, epoch=epoch)
    if not done:
        ep.set_epoch_status(catalog, run_id=run_id, epoch=epoch, status="completed",
                            stats={"prompt_version": version.version, "round": round, "score": mean, "rollouts": n})
    prompts.set_score(catalog, version.version, score=mean, tasks=n)
    return mean, n, epoch


def expand(ctx: RunContext, critic: Critic, *, name: str, parent: PromptVersion, round: int,
           parent_epoch: int, report: dict[str, Any]) -> list[PromptVersion]:
    """The children of ``parent`` in ``round``: those written before (a resumed search), else the critic's new ones."""
    config, catalog = ctx.config, ctx.catalog
    po, run_id = config.prompt_optimization, apo.run_id(config)
    logger = get_run_logger()
    children = [v for v in prompts.versions(catalog, name, run_id=run_id)
                if v.parent_version == parent.version and v.round == round]
    missing = po.branch_factor - len(children)
    if missing <= 0:
        return children
    shown = apo.failures(catalog, run_id=run_id, epoch=parent_epoch, success=config.trainer.success_reward, limit=po.failures)
    if not shown:
        logger.info("round %d: %s failed no task of its evaluation; nothing for the critic to fix", round, parent.version)
        return children
    where = CallSite(run_id=run_id, epoch=parent_epoch, parent_version=parent.version, round=round)
    for proposal in critic.propose(parent.text, shown, missing, where=where):
        report["proposals"] += 1
        text = apo.clean_prompt(proposal.text, max_chars=po.max_prompt_chars)
        why = apo.usable(text, parent.text)
        if why is not None:
            report["rejected"].append({"parent": parent.version, "why": why, "critique": proposal.critique[:300],
                                       "text": (proposal.text or "")[:300]})
            logger.info("round %d: a proposal for %s was not used (%s): %r", round, parent.version, why, (proposal.text or "")[:120])
            continue
        child, new = prompts.add_candidate(catalog, name=name, text=text, parent=parent.version, made_by=critic.made_by,
                                           critique=proposal.critique or None, run_id=run_id, round=round)
        if not new:
            report["rejected"].append({"parent": parent.version, "why": f"same text as {child.version}",
                                       "critique": proposal.critique[:300], "text": text[:300]})
        children.append(child)
    return children


def run_search(ctx: RunContext) -> dict[str, Any]:
    """Run (or resume) the beam search; promote and evaluate the best prompt; return the summary."""
    logger = get_run_logger()
    started = time.monotonic()
    config, catalog, stack = ctx.config, ctx.catalog, ctx.services
    po, run_id = config.prompt_optimization, apo.run_id(config)
    name = apo.target_prompt(config)
    t.redeploy(ctx)  # prompts are scored against the policy that serves now
    serving = prompts.resolve(catalog, config)[name]
    begun = apo.started_from(catalog, run_id=run_id)  # a resumed search keeps its start, even after promoting
    start = prompts.get(catalog, begun) if begun else serving
    gateway = stack.gateway_client(config)
    try:
        critic = make_critic(config, gateway_client=gateway, collector_url=stack.collector.url,
                                 collector_token=config.collector.token)
        beam, epochs, rounds = [start], {}, []
        for rnd in range(po.rounds + 1):
            tasks = apo.draw_tasks(config, rnd)
            report: dict[str, Any] = {"round": rnd, "proposals": 0, "rejected": []}
            pool = list(beam)
            if rnd > 0:
                for parent in beam:
                    for child in expand(ctx, critic, name=name, parent=parent, round=rnd,
                                        parent_epoch=epochs[parent.version], report=report):
                        if child.version not in {v.version for v in pool}:
                            pool.append(child)
            needed = sum(len(tasks) * po.samples_per_task for v in pool
                         if not apo.evaluated(catalog, run_id=run_id, label=f"{v.version} r{rnd}"))
            used = apo.rollouts_used(catalog, run_id=run_id)
            if po.max_rollouts is not None and used + needed > po.max_rollouts:
                logger.warning("round %d needs %d more rollouts and %d of the budget of %d are used: stopping the search",
                               rnd, needed, used, po.max_rollouts)
                break
            scores = {}
            for version in pool:
                mean, n, epoch = evaluate_candidate(ctx, name=name, version=version, round=rnd, tasks=tasks)
                scores[version.version], epochs[version.version] = mean, epoch
                logger.info("round %d: %s scored %.3f on %d rollouts", rnd, version.version, mean or 0.0, n)
            beam = sorted(pool, key=lambda v: (-(scores[v.version] or 0.0), v.number))[: po.beam_width]
            report.update({"candidates": len(pool), "new": sum(1 for v in pool if v.round == rnd and v.run_id == run_id),
                           "scores": scores, "best": beam[0].version, "best_score": scores[beam[0].version],
                           "rollouts": apo.rollouts_used(catalog, run_id=run_id)})
            rounds.append(report)
            logger.info("round %d: best %s (%.3f); beam %s", rnd, beam[0].version, scores[beam[0].version] or 0.0,
                        ", ".join(v.version for v in beam))
    finally:
        gateway.close()
    best = prompts.get(catalog, beam[0].version)
    promoted = po.promote and best.version != prompts.serving_version(catalog, name).version
    if promoted:
        prompts.promote(catalog, best.version)
        logger.info("prompt %s now serves %s (was %s)", name, best.version, start.version)
    search_s = time.monotonic() - started
    held_out = {}
    if po.held_out and config.rollouts.eval_dataset is not None:
        for version in dict.fromkeys([start.version, best.version]):
            held_out[version] = run_evaluation(ctx, prompt_versions=[version])
    summary = {
        "algorithm": "beam", "prompt": name, "run_id": run_id, "start": start.version, "best": best.version,
        "best_versions": {name: best.version}, "promoted": promoted,
        "start_score": rounds[0]["best_score"] if rounds else None, "best_score": rounds[-1]["best_score"] if rounds else None,
        "rounds": rounds, "rollouts": apo.rollouts_used(catalog, run_id=run_id),
        "critic_calls": getattr(critic, "calls", 0), "search_s": search_s, "wall_s": time.monotonic() - started,
        "held_out": {v: {k: r[k] for k in ("label", "tasks", "reward_mean", "success_rate")} for v, r in held_out.items()},
    }
    candidates = [vars(v) for v in prompts.versions(catalog, name)]
    create_table_artifact(
        [{k: c[k] for k in ("version", "parent_version", "made_by", "round", "score", "score_tasks", "serving")} for c in candidates],
        key=t.artifact_key(run_id, "prompt-candidates"), description=f"Prompt versions of {name!r} after the search")
    tracking.log_prompt_search(config, summary, candidates, lake=catalog.lake_id())
    return summary


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
    """Optimise the project's prompts by beam search or GEPA with a critic; promote the best version (resumable)."""
    config = load(config_path, overrides)
    _prepare(config)
    with running(config) as ctx:
        return run_gepa(ctx) if config.prompt_optimization.algorithm == "gepa" else run_search(ctx)
