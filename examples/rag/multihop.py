"""The 2- and 3-hop task in one command: base model -> SFT warm start from traces -> GRPO, evaluated after each.

For each seed, a fresh project (as ``examples/measure.py`` makes one: its own lake, checkpoints, MLflow store and
free ports), whose services start once and serve every step:

1. evaluate the base model, greedily, on ``test.jsonl`` (2- and 3-hop) and ``test_reworded.jsonl``;
2. ``multihop_sft.yaml``: ``--sft-epochs`` epochs, each sampling every task's group (the scripted oracle and the
   policy) and fine-tuning on the calls of the rollouts that succeeded; evaluate again;
3. ``multihop_grpo.yaml``: ``--grpo-epochs`` GRPO epochs on the same run, from the SFT adapter; evaluate again.

Then ``report.py`` reads the run back from its lake (reward, F1, searches per question and chain documents found
per evaluation, what each source gave the SFT epochs, a question before and after), and one row per seed, with
each step's wall time, goes to ``multihop_results.jsonl`` beside this file.

    .venv/bin/python examples/rag/multihop.py --seeds 0 1 2
    .venv/bin/python examples/rag/multihop.py --seeds 0 --sft-epochs 1 --grpo-epochs 0 --eval-tasks 8 --set rollouts.tasks_per_epoch=4
    .venv/bin/python examples/rag/multihop.py --seeds 0 --grpo-set pipeline.advantage=turn   # a switch for GRPO only
    .venv/bin/python examples/rag/multihop.py --summary     # the seeds' records: mean ± spread per step and split
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "examples"))
sys.path.insert(0, str(HERE))

from lightning_core.common.stopping import on_signals  # noqa: E402
from lightning_core.config import load_config  # noqa: E402
from lightning_core.epoch import stack as services  # noqa: E402

SFT, GRPO = HERE / "multihop_sft.yaml", HERE / "multihop_grpo.yaml"
SPLITS = {"test": HERE / "test.jsonl", "test_reworded": HERE / "test_reworded.jsonl"}
RESULTS = HERE / "multihop_results.jsonl"


def uptime() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


def one_seed(seed: int, args: argparse.Namespace) -> dict:
    """Base, SFT and GRPO for one seed, with an evaluation of both splits after each; the seed's record."""
    from flows.train import evaluate, train
    from measure import fresh_project, machine, project_overrides

    common = [f"rollouts.eval_tasks={args.eval_tasks}", *args.overrides]
    stamp, sft = fresh_project(SFT, seed=seed, overrides=common)
    cfg = load_config(SFT, overrides=sft)
    grpo = project_overrides(GRPO, cfg.project_dir, cfg.run_name,
                             ["collector.port=0", "gateway.port=0", "serving.port=0", f"rollouts.seed={seed}",
                              f"trainer.seed={seed}", *common, *args.grpo_overrides])
    steps: list[dict] = []
    record = {"seed": seed, "project": str(cfg.project_dir), "machine": machine(), "uptime_before": uptime(),
              "sft_epochs": args.sft_epochs, "grpo_epochs": args.grpo_epochs, "eval_tasks": args.eval_tasks,
              "overrides": args.overrides, "grpo_overrides": args.grpo_overrides, "steps": steps}

    def timed(name: str, fn) -> object:
        started = time.perf_counter()
        result = fn()
        steps.append({"step": name, "wall_s": round(time.perf_counter() - started, 1)})
        print(f"[multihop] seed {seed}: {name} took {steps[-1]['wall_s'] / 60:.1f} min", flush=True)
        return result

    def evaluate_all(stage: str, config: Path, overrides: list[str]) -> dict:
        out = {}
        for split, path in SPLITS.items():
            result = evaluate(config_path=str(config), label=f"{split}:{stage}",
                              overrides=[*overrides, f"rollouts.eval_dataset={path}"])
            out[split] = {"reward": result["reward_mean"], "success": result["success_rate"], "tasks": result["tasks"]}
        return out

    started = time.perf_counter()
    with on_signals():
        services.up(cfg)
        try:
            record["up_s"] = round(time.perf_counter() - started, 1)
            record["base"] = timed("evaluate base", lambda: evaluate_all("base", SFT, sft))
            if args.sft_epochs:
                timed("SFT", lambda: train(config_path=str(SFT), overrides=sft, epochs=args.sft_epochs))
                record["sft"] = timed("evaluate SFT", lambda: evaluate_all("sft", SFT, sft))
            if args.grpo_epochs:
                timed("GRPO", lambda: train(config_path=str(GRPO), overrides=grpo,
                                            epochs=args.sft_epochs + args.grpo_epochs))
                record["grpo"] = timed("evaluate GRPO", lambda: evaluate_all("grpo", GRPO, grpo))
        finally:
            services.down(cfg)
    record["total_s"] = round(time.perf_counter() - started, 1)
    record["uptime_after"] = uptime()
    import report

    record["evaluations"] = report.rows(cfg.project_dir, report.SUMMARY.format(key="label, after_epochs, dataset",
                                                                              mode="eval"))
    record["training"] = report.rows(cfg.project_dir, report.SUMMARY.format(key="epoch", mode="train"))
    record["sources"] = report.rows(cfg.project_dir, report.SOURCES)
    record["by_hops"] = report.rows(cfg.project_dir, report.BY_HOPS)
    report.report(cfg.project_dir)
    with open(args.out, "a") as fh:
        fh.write(json.dumps(record, default=str) + "\n")
    return record


STAGES = ("base", "sft", "grpo")
MEASURES = ("reward", "f1", "exact_match", "searches", "chain_docs_found")


def summary(path: Path) -> str:
    """The seeds' records in ``path`` as markdown: for each split and step, each measure's mean ± sample standard
    deviation over the seeds (the last record of each seed counts), then each step's wall time."""
    records = {}
    for line in path.read_text().splitlines():
        if line.strip():
            record = json.loads(line)
            records[record["seed"]] = record
    if not records:
        sys.exit(f"error: {path} holds no seed's record: run multihop.py --seeds 0 1 2 first")

    from report import spread

    lines = [f"seeds {', '.join(map(str, sorted(records)))} (mean ± sample standard deviation)", "",
             f"| split | step | {' | '.join(MEASURES)} |", "|---|---|" + "---|" * len(MEASURES)]
    for split in SPLITS:
        for stage in STAGES:
            rows = [row for record in records.values() for row in record.get("evaluations", [])
                    if row["label"] == f"{split}:{stage}"]
            if rows:
                lines.append(f"| {split} | {stage} | " + " | ".join(spread([float(r[m]) for r in rows]) for m in MEASURES)
                             + " |")
    hops = {seed: by_hops(record) for seed, record in records.items()}
    if any(hops.values()):
        lines += ["", "by the questions' hops (F1, searches per question)", "",
                  "| split | step | hops | f1 | searches |", "|---|---|---|---|---|"]
        for split in SPLITS:
            for stage in STAGES:
                for n in (2, 3):
                    rows = [row for seed_rows in hops.values() for row in seed_rows
                            if row["label"] == f"{split}:{stage}" and row["hops"] == n]
                    if rows:
                        lines.append(f"| {split} | {stage} | {n} | {spread([float(r['f1']) for r in rows])} | "
                                     f"{spread([float(r['searches']) for r in rows])} |")
    steps = list(dict.fromkeys(s["step"] for record in records.values() for s in record["steps"]))  # in run order
    lines += ["", "| step | " + " | ".join(f"seed {seed} (min)" for seed in sorted(records)) + " |",
              "|---|" + "---|" * len(records)]
    for step in [*steps, "total"]:
        cells = []
        for seed in sorted(records):
            wall = records[seed]["total_s"] if step == "total" else next(
                (s["wall_s"] for s in records[seed]["steps"] if s["step"] == step), None)
            cells.append("" if wall is None else f"{wall / 60:.1f}")
        lines.append(f"| {step} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def by_hops(record: dict) -> list[dict]:
    """A seed's evaluations by hops (``report.BY_HOPS``): from its record, else read from its project's lake when
    that is still there (records written before the field existed)."""
    if record.get("by_hops"):
        return record["by_hops"]
    project = Path(record["project"])
    if not (project / ".arclight" / "lake").is_dir():
        return []
    import report

    return report.rows(project, report.BY_HOPS)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--sft-epochs", type=int, default=load_config(SFT).epochs)
    parser.add_argument("--grpo-epochs", type=int, default=load_config(GRPO).epochs - load_config(SFT).epochs)
    parser.add_argument("--eval-tasks", type=int, default=50, help="held-out questions per split and evaluation")
    parser.add_argument("--out", type=Path, default=RESULTS, help="the JSONL file each seed's record is appended to")
    parser.add_argument("--summary", action="store_true", help="print the records in --out as a table, run nothing")
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        help="config override KEY=VALUE for both steps (repeatable)")
    parser.add_argument("--grpo-set", dest="grpo_overrides", action="append", default=[],
                        help="config override KEY=VALUE for the GRPO step only (repeatable), e.g. pipeline.advantage=turn")
    args = parser.parse_args()
    if args.summary:
        print(summary(args.out))
        return
    for seed in args.seeds:
        record = one_seed(seed, args)
        line = {"seed": seed, **{stage: record.get(stage) for stage in ("base", "sft", "grpo")},
                "steps": {s["step"]: s["wall_s"] for s in record["steps"]}, "total_s": record["total_s"]}
        print(json.dumps(line), flush=True)


if __name__ == "__main__":
    main()
