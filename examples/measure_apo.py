"""Measure prompt optimisation (APO, GEPA) on an example: search, then held-out reward of the start and the best prompt.

    .venv/bin/python examples/measure_apo.py examples/calc/config.apo.yaml
    .venv/bin/python examples/measure_apo.py examples/calc/config.apo.yaml \\
        --set prompt_optimization.critic.kind=scripted --set prompt_optimization.critic.function=prompt_rules:critic
    .venv/bin/python examples/measure_apo.py examples/calc/config.apo.yaml --then-train 4   # APO, then GRPO

Like ``measure.py``: a fresh project in ``<example>/.arclight/measure/<stamp>/`` (its own lake,
catalog and MLflow store), services started once, and a markdown table (with the command, the
machine and its load) printed and appended to the example's part of ``docs/measurement-log.md``. ``--then-train N`` trains
N GRPO epochs afterwards with the promoted prompt and evaluates again: prompt and weights together.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from examples.measure import fresh_project, machine, record  # noqa: E402
from lightning_core.apo import prompts  # noqa: E402
from lightning_core.epoch import stack as services  # noqa: E402
from lightning_core.store.catalog import Catalog  # noqa: E402
from lightning_core.config import load_config  # noqa: E402
from lightning_core.common.stopping import on_signals  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", type=Path)
    parser.add_argument("--seed", type=int, default=0, help="seeds the task samples (and the trainer with --then-train)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="config override KEY=VALUE (repeatable)")
    parser.add_argument("--then-train", type=int, default=0, help="GRPO epochs to train afterwards with the promoted prompt")
    parser.add_argument("--out", type=Path, default=None, help="markdown file to append to (default: the example's part of docs/measurement-log.md)")
    args = parser.parse_args()

    from flows.optimize_prompt import optimize_prompt
    from flows.train import evaluate, train

    config_path = args.config.resolve()
    stamp, overrides = fresh_project(config_path, seed=args.seed,
                                     overrides=[f"prompt_optimization.seed={args.seed}", *args.overrides])
    cfg = load_config(config_path, overrides=overrides)

    started = time.perf_counter()
    trained = None
    with on_signals():
        services.up(cfg)
        try:
            up_s = time.perf_counter() - started
            load_before = os.getloadavg()
            t0 = time.perf_counter()
            summary = optimize_prompt(config_path=str(config_path), overrides=overrides)
            apo_s = time.perf_counter() - t0
            if args.then_train:
                t1 = time.perf_counter()
                rows = train(config_path=str(config_path), overrides=overrides, epochs=args.then_train)
                after = evaluate(config_path=str(config_path), overrides=overrides)
                trained = {"epochs": args.then_train, "after": after, "seconds": time.perf_counter() - t1,
                           "version": rows[-1]["new_version"] or rows[-1]["policy_version"] if rows else "-"}
            load_after = os.getloadavg()
            catalog = Catalog.from_config(cfg)
        finally:
            services.down(cfg)
    total_s = time.perf_counter() - started

    command = " ".join(shlex.quote(a) for a in [".venv/bin/python", "examples/measure_apo.py",
                                                str(config_path.relative_to(REPO)), *sys.argv[2:]])
    timing = (f"{total_s / 60:.1f} min (services up {up_s:.0f} s; search and held-out {apo_s / 60:.1f} min) "
              f"| {load_before[0]:.2f} / {load_after[0]:.2f}")
    table = report(cfg, summary, catalog, title=str(config_path.relative_to(REPO)), seed=args.seed, stamp=stamp,
                   command=command, timing=timing, machine=machine(), trained=trained)
    print(table)
    record(table, example=config_path.parent.name, out=args.out)


def searched(catalog: Catalog, summary: dict) -> dict[str, list[prompts.PromptVersion]]:
    """Every version of each prompt the search edited, by name (GEPA edits several at once: ``best_versions`` names them)."""
    return {name: prompts.versions(catalog, name) for name in summary["best_versions"]}


def settings(cfg, summary: dict) -> str:
    """What the search ran with: GEPA's budget and minibatch, its validation split."""
    po = cfg.prompt_optimization
    return (f"GEPA, max_metric_calls {summary['max_metric_calls']} ({summary['metric_calls']} used), minibatch "
            f"{po.minibatch_size} tasks, validation {po.tasks_per_eval} tasks, {po.samples_per_task} rollout(s) per task")


def report(cfg, summary: dict, catalog: Catalog, *, title: str, seed: int, stamp: str, command: str, timing: str,
           machine: str, trained: dict | None = None) -> str:
    """The markdown table of one measurement: held-out start and best, the search's cost and settings, the best texts."""
    po = cfg.prompt_optimization
    found = searched(catalog, summary)
    critic = po.critic.function if po.critic.kind == "scripted" else (po.critic.model or f"{cfg.model.served_name} (local)")
    start, best = summary["held_out"].get(summary["start"]), summary["held_out"].get(summary["best"])
    curve = ", ".join(f"{r['round']}: {r['best_score']:.2f}" for r in summary["rounds"])
    made = sum(1 for versions in found.values() for v in versions if v.run_id == summary["run_id"])
    rejected = sum(len(r["rejected"]) for r in summary["rounds"])
    lines = [
        f"### {title}: prompt optimisation ({summary['algorithm']}), {po.critic.kind} critic, seed {seed} ({stamp})",
        "",
        f"`{command}`",
        "",
        "| held-out reward, start prompt | best prompt | held-out tasks | best validation score per candidate kept "
        "| candidates made (proposals not usable) | rollouts | critic calls | search wall time | total wall time | load (1-min avg, start/end) | machine |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
        f"| {_pct(start)} ({summary['start']}) | {_pct(best)} ({summary['best']}) | {(best or start or {}).get('tasks', '-')} "
        f"| {curve} | {made} ({rejected}) | {summary['rollouts']} | {summary['critic_calls']} | {summary['search_s'] / 60:.1f} min "
        f"| {timing} | {machine} |",
        "",
        f"Critic: {critic}; {settings(cfg, summary)}.",
        "",
    ]
    for name, version in summary["best_versions"].items():
        text = next(v.text for v in found[name] if v.version == version)
        lines += [f"Best prompt {name!r} ({version}):", "", "```text", text, "```", ""]
    if trained:
        lines += [f"Then GRPO with the promoted prompt: {trained['epochs']} epochs ({trained['seconds'] / 60:.1f} min, "
                  f"{trained['version']}): held-out {_pct(best)} -> {_pct(trained['after'])}.", ""]
    return "\n".join(lines)


def _pct(result: dict | None) -> str:
    return "-" if not result else f"{result['reward_mean']:.2f} reward, {result['success_rate']:.0%} success"


if __name__ == "__main__":
    main()
