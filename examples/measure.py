"""Measure what training does for an example: evaluate, train N epochs, evaluate again; print a table.

    .venv/bin/python examples/measure.py examples/sql/config.yaml --epochs 2 --eval-tasks 16
    .venv/bin/python examples/measure.py examples/sql/config.multi.yaml --epochs 2 --set rollouts.tasks_per_epoch=4

Each measurement is a fresh project in ``<example>/.arclight/measure/<stamp>/`` (its own lake,
catalog, checkpoints and MLflow store), so earlier runs never leak in: the "before" number is
always the base model. The services (collector, vLLM, gateway) start once and serve all three
flows. The result is printed as a markdown table and recorded, with the exact command so anyone
can re-run it, at the end of the example's part of ``docs/measurement-log.md`` (the append-only
history; ``<example>/RESULTS.md`` shows only the latest figures and is edited by hand).
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import shlex
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from lightning_core.epoch.context import RunContext  # noqa: E402
from lightning_core.epoch import reports  # noqa: E402
from lightning_core.epoch import stack as services  # noqa: E402
from lightning_core.config import load_config  # noqa: E402
from lightning_core.common.stopping import on_signals  # noqa: E402


def machine() -> str:
    """Describe this machine in one line: CPU model, cores, memory, GPU."""
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    try:
        mem_kib = next(int(line.split()[1]) for line in open("/proc/meminfo") if line.startswith("MemTotal"))
        mem = f"{mem_kib / 2**20:.0f} GiB"
    except (OSError, StopIteration):
        mem = "? GiB"
    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return f"{cpu}, {os.cpu_count()} cores, {mem}, {gpu}"


def project_overrides(config_path: Path, work: Path, run_name: str, extra: list[str]) -> list[str]:
    """Overrides that move a config into the fresh project folder ``work``, keeping its data and agent paths.

    The pinned paths come last: they are resolved from the config's folder with ``extra`` applied, so a relative
    ``--set rollouts.dataset=...`` (or ``model.path=...``) names a file beside the config, not one in ``work``."""
    original = load_config(config_path, overrides=extra)
    r = original.rollouts
    pinned = [f"project_dir={work}", f"run_name={run_name}",
              f"rollouts.agent_path={[str(p) for p in [*r.agent_path, original.project_dir]]}"]
    for key in ("dataset", "eval_dataset"):
        if getattr(r, key) is not None:
            pinned.append(f"rollouts.{key}={getattr(r, key)}")
    if original.model.path is not None and Path(original.model.path).is_absolute():  # a folder, not a hub id
        pinned.append(f"model.path={original.model.path}")
    if r.command:  # a program agent keeps running where its config says, with the paths it names from there
        pinned.append(f"rollouts.command_cwd={(original.project_dir / (r.command_cwd or '.')).resolve()}")
    return [*extra, *pinned]


def fresh_project(config_path: Path, *, seed: int, overrides: list[str]) -> tuple[str, list[str]]:
    """A new project folder ``<example>/.arclight/measure/<config>-<stamp>`` on free ports, seeded; return (stamp,
    the overrides that move the config there)."""
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    work = config_path.parent / ".arclight" / "measure" / f"{config_path.stem}-{stamp}"
    work.mkdir(parents=True)
    # free ports, so a measurement never collides with another project's services on this machine
    extra = ["collector.port=0", "gateway.port=0", "serving.port=0", f"rollouts.seed={seed}", f"trainer.seed={seed}",
             *overrides]
    name = load_config(config_path).name
    return stamp, project_overrides(config_path, work, f"{name}-measure-s{seed}", extra)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", type=Path)
    parser.add_argument("--epochs", type=int, default=2, help="training epochs between the two evaluations")
    parser.add_argument("--eval-tasks", type=int, default=None, help="held-out tasks evaluated (default: all)")
    parser.add_argument("--seed", type=int, default=0, help="seeds task sampling and the trainer")
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="config override KEY=VALUE (repeatable)")
    parser.add_argument("--out", type=Path, default=None, help="markdown file to append to (default: the example's part of docs/measurement-log.md)")
    parser.add_argument("--extra-eval", type=Path, action="append", default=[],
                        help="another held-out JSONL set, evaluated before and after too (repeatable)")
    args = parser.parse_args()
    for path in args.extra_eval:  # before the services start and the first evaluation runs, not after it
        if not path.is_file():
            parser.error(f"--extra-eval {path}: no such file; give the JSONL set's path "
                         f"(e.g. examples/rag/test_reworded.jsonl)")

    from flows.train import evaluate, train

    config_path = args.config.resolve()
    extra = [*args.overrides, *([f"rollouts.eval_tasks={args.eval_tasks}"] if args.eval_tasks else [])]
    stamp, overrides = fresh_project(config_path, seed=args.seed, overrides=extra)
    cfg = load_config(config_path, overrides=overrides)

    started = time.perf_counter()

    try:
        with on_signals():  # the first Ctrl-C stops the rollouts in flight; `finally` then stops the services
            services.up(cfg)
            try:
                up_s = time.perf_counter() - started
                load_before = os.getloadavg()
                # labelled by the versions serving, so the train flow's own evaluations (evaluation.every_epochs) of
                # the same versions on the same file are reused rather than run twice; each --extra-eval file is its
                # own evaluation (reports.eval_dataset: path and sha256), even beside another file of the same stem
                before = evaluate(config_path=str(config_path), overrides=overrides)
                t_extra = time.perf_counter()
                extra = {path: {"before": evaluate(config_path=str(config_path), label=f"{path.stem}:before",
                                                   overrides=[*overrides, f"rollouts.eval_dataset={path.resolve()}"])}
                         for path in args.extra_eval}
                extra_s = time.perf_counter() - t_extra
                t0 = time.perf_counter()
                rows = train(config_path=str(config_path), overrides=overrides, epochs=args.epochs)
                train_s = time.perf_counter() - t0
                after = evaluate(config_path=str(config_path), overrides=overrides)
                t_extra = time.perf_counter()
                for path in args.extra_eval:
                    extra[path]["after"] = evaluate(config_path=str(config_path), label=f"{path.stem}:after",
                                                    overrides=[*overrides, f"rollouts.eval_dataset={path.resolve()}"])
                extra_s += time.perf_counter() - t_extra
                curve = reports.eval_curve(RunContext.of(cfg))
                load_after = os.getloadavg()
            finally:
                services.down(cfg)
    except KeyboardInterrupt:
        print("interrupted: the services this measurement started were stopped; nothing was appended", file=sys.stderr)
        raise SystemExit(130) from None
    total_s = time.perf_counter() - started

    r = cfg.rollouts
    rewards = ", ".join(f"{row['reward_mean']:.2f}" if row["reward_mean"] is not None else "-" for row in rows)
    versions = rows[-1]["new_version"] or rows[-1]["policy_version"] if rows else "-"
    points = ", ".join(f"{c['after_epochs']}: {c['success_rate']:.0%}" for c in curve if c["tasks"] == after["tasks"])
    drawn = [row["tasks_sampled"] for row in rows if row.get("tasks_sampled") is not None]
    informative = f" (dynamic: {min(drawn)}-{max(drawn)} tasks drawn)" if r.informative_groups and drawn else ""
    command = " ".join(shlex.quote(a) for a in [".venv/bin/python", "examples/measure.py",
                                                str(config_path.relative_to(REPO)), *sys.argv[2:]])
    extra_lines = [f"- `{path.name}` ({e['after']['tasks']} tasks): {e['before']['success_rate']:.2%} -> "
                   f"{e['after']['success_rate']:.2%}" for path, e in extra.items()]
    # the extra held-out sets are a report on generalisation, not part of the run a user makes: say what they cost
    extra_note = f"; {extra_s / 60:.1f} min of it the extra sets" if args.extra_eval else ""
    table = "\n".join([
        f"### {config_path.relative_to(REPO)}, seed {args.seed} ({stamp})",
        "",
        f"`{command}`",
        "",
        "| held-out accuracy before | after | eval tasks | epochs | rollouts/epoch | train reward per epoch | held-out curve (epochs: accuracy) | last versions | train wall time | total wall time | load (1-min avg, start/end) | machine |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
        f"| {before['success_rate']:.2%} | {after['success_rate']:.2%} | {after['tasks']} | {args.epochs} "
        f"| {(r.tasks_per_epoch or '-')} x {r.group_size}{informative} | {rewards} | {points} | {versions} | {train_s / 60:.1f} min "
        f"| {total_s / 60:.1f} min (services up {up_s:.0f} s{extra_note}) | {load_before[0]:.2f} / {load_after[0]:.2f} | {machine()} |",
        "",
        *([*extra_lines, ""] if extra_lines else []),
    ])
    print(table)
    record(table, example=config_path.parent.name, out=args.out)


MEASUREMENT_LOG = REPO / "docs" / "measurement-log.md"


def record(table: str, *, example: str, out: Path | None = None) -> Path:
    """Append ``table`` to ``out``, or to the end of ``example``'s part of the measurement log.

    The log's parts are its ``## Part N: ...`` sections; the example's part is the one that names
    ``examples/<example>/``. An example without one gets a new part at the end of the log.
    """
    if out is not None:
        with open(out, "a") as fh:
            fh.write(table + "\n")
        return out
    text = MEASUREMENT_LOG.read_text() if MEASUREMENT_LOG.exists() else "# Measurement log\n"
    lines = text.splitlines(keepends=True)
    parts = [i for i, line in enumerate(lines) if line.startswith("## Part ")]
    mine = [i for i in parts if f"examples/{example}/" in lines[i]]
    if mine:
        later = [i for i in parts if i > mine[0]]
        at = later[0] if later else len(lines)
        lines[at:at] = [table.rstrip("\n") + "\n", "\n"]
    else:
        if lines and not lines[-1].endswith("\n"):
            lines[-1] += "\n"
        lines += ["\n", f"## Part {len(parts) + 1}: the {example} example (`examples/{example}/`)\n", "\n", table.rstrip("\n") + "\n"]
    MEASUREMENT_LOG.write_text("".join(lines))
    return MEASUREMENT_LOG


if __name__ == "__main__":
    main()
