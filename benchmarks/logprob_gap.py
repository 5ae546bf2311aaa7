"""Do vLLM and the trainer agree on the policy, and what does their gap cost learning? (issue 56)

For each example (the calc example, the retrieval example's one-hop default), each serving dtype (bfloat16,
float32) and each behaviour correction (ppo: the ratio against vLLM's recorded logprobs; decoupled: against the
trainer's own, with the behaviour weight truncated at importance_cap), ``--runs`` seeds of ``examples/measure.py``
(base model evaluated, N epochs trained, evaluated again), one after another. Then, from each run's own lake:

- held-out reward and success before -> after, mean and spread over the seeds;
- the gap at each epoch's first GRPO step, before any update: mean and largest |trainer - vLLM| logprob over the
  response tokens, and the share of tokens ppo clipped (or would have clipped, under decoupled) at the first step (the
  epochs table);
- vLLM's generation speed (the rollouts' response tokens per second of rollout stage);
- a plot of the gap per epoch, bf16 against fp32 serving.

    .venv/bin/python benchmarks/logprob_gap.py --runs 3                       # the whole grid (hours on 2 cores)
    .venv/bin/python benchmarks/logprob_gap.py --examples rag --runs 1 --cells bfloat16:ppo
    .venv/bin/python benchmarks/logprob_gap.py --report                       # the table and plot from the runs so far

Every run is recorded in ``benchmarks/results/logprob_gap.jsonl`` (example, cell, seed, its project folder, the
command, ``uptime`` before and after); ``--report`` reads the lakes those name.
"""

from __future__ import annotations

import argparse
import json
import re
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

RESULTS = REPO / "benchmarks" / "results"
INDEX = RESULTS / "logprob_gap.jsonl"
EXAMPLES = {  # config, epochs, held-out tasks
    "calc": ("examples/calc/config.yaml", 8, 50),
    "rag": ("examples/rag/config.yaml", 3, 50),
}
CELLS = ("bfloat16:ppo", "bfloat16:decoupled", "float32:ppo", "float32:decoupled")


def uptime() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


def _run(command: list[str]) -> subprocess.CompletedProcess:
    """Run ``command`` and wait for it, also on Ctrl-C: the run then stops its own servers before it exits
    (``subprocess.run`` would SIGKILL it a quarter second after the interrupt and leave its vLLM servers behind).
    The run has a session of its own, so a terminal's Ctrl-C reaches it once, from here: a second interrupt would
    make it kill its servers at once instead of stopping them (``common.stopping``)."""
    with subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          start_new_session=True) as process:
        try:
            stdout, stderr = process.communicate()
        except KeyboardInterrupt:
            process.send_signal(signal.SIGINT)
            try:
                process.wait(timeout=180)
            except subprocess.TimeoutExpired:
                process.kill()
            raise
    return subprocess.CompletedProcess(command, process.returncode, stdout, stderr)


def run_one(example: str, cell: str, seed: int) -> dict:
    """One measure.py run of ``example`` with ``cell`` (dtype:correction) and ``seed``; its record."""
    config, epochs, tasks = EXAMPLES[example]
    dtype, correction = cell.split(":")
    command = [sys.executable, "examples/measure.py", config, "--epochs", str(epochs), "--eval-tasks", str(tasks),
               "--seed", str(seed), "--set", f"serving.dtype={dtype}", "--set",
               f"trainer.behaviour_correction={correction}", "--out", str(RESULTS / "logprob_gap_runs.md")]
    RESULTS.mkdir(parents=True, exist_ok=True)  # measure.py appends its table there: before the first run, too
    before = uptime()
    started = time.time()
    done = _run(command)
    stamp = re.search(r"^### .*\((\d{8}-\d{6})\)$", done.stdout, re.M)
    record = {"example": example, "cell": cell, "seed": seed, "returncode": done.returncode,
              "command": " ".join(command[1:]), "uptime_before": before, "uptime_after": uptime(),
              "wall_s": round(time.time() - started, 1),
              "project": str(REPO / Path(config).parent / ".arclight" / "measure" /
                             f"{Path(config).stem}-{stamp.group(1)}") if stamp else None}
    if done.returncode != 0:
        record["error"] = (done.stdout + done.stderr)[-3000:]
    else:  # the figures now, with the record: a run's project folder does not outlive this machine
        try:
            record["measured"] = measured(record)
        except Exception as exc:  # the record of a finished run is kept anyway; --report tries its lake again
            record["measured_error"] = f"{type(exc).__name__}: {exc}"
    with open(INDEX, "a") as out:
        out.write(json.dumps(record) + "\n")
    return record


def figures(record: dict) -> dict | None:
    """One run's figures: those stored with its record, else its lake's, else (a lake lost with an earlier machine)
    what its table in ``logprob_gap_runs.md`` kept: held-out success before/after and train reward per epoch."""
    return record.get("measured") or measured(record) or from_table(record)


def from_table(record: dict) -> dict | None:
    """The figures measure.py's table kept of a run (by its project's time stamp); None if it has none."""
    stamp = re.search(r"(\d{8}-\d{6})$", record.get("project") or "")
    runs = RESULTS / "logprob_gap_runs.md"
    if not stamp or not runs.exists():
        return None
    section = re.search(rf"^### .*\({stamp.group(1)}\)$(.*?)(?=^### |\Z)", runs.read_text(), re.M | re.S)
    row = next((line for line in (section.group(1) if section else "").splitlines()
                if line.startswith("| ") and "%" in line), None)
    if row is None:
        return None
    cells = [c.strip() for c in row.strip("|").split("|")]
    return {"before_reward": None, "after_reward": None, "before_success": float(cells[0].rstrip("%")) / 100,
            "after_success": float(cells[1].rstrip("%")) / 100,
            "train_reward": [float(v) for v in cells[5].split(",")], "gap_mean": [], "gap_max": [], "clipped": [],
            "correction": [], "call_tokens_per_s": None, "machine": cells[-1], "lake_lost": True}


def measured(record: dict) -> dict | None:
    """What one run's lake says: held-out before/after, train reward and the gap per epoch, generation speed."""
    from lightning_core.config import load_config
    from lightning_core.epoch import reports
    from lightning_core.epoch.context import RunContext

    if not record.get("project") or not Path(record["project"]).is_dir():
        return None
    config_path = REPO / EXAMPLES[record["example"]][0]
    name = load_config(config_path).name
    cfg = load_config(config_path, overrides=[f"project_dir={record['project']}",
                                              f"run_name={name}-measure-s{record['seed']}",
                                              *_dataset_overrides(config_path)])
    ctx = RunContext.of(cfg)
    curve = reports.eval_curve(ctx)
    if len(curve) < 2:
        return None
    with ctx.catalog.read(spans=False) as con:
        epochs = con.execute(
            "SELECT e.epoch, e.logprob_gap_mean, e.logprob_gap_max, "
            # what ppo clipped, or would have clipped under decoupled (an older decoupled lake's clipped_first is 0 by
            # construction: its first micro-batch's ratio is 1, so it is not shown)
            "coalesce(e.ppo_clipped_first, CASE WHEN e.behaviour_correction = 'ppo' THEN e.clipped_first END), "
            "e.behaviour_correction, "
            "avg(r.reward) FILTER (WHERE r.status = 'succeeded') FROM epochs e LEFT JOIN rollouts r "
            "ON r.run_id = e.run_id AND r.epoch = e.epoch AND r.mode = 'train' WHERE e.run_id = ? GROUP BY ALL "
            "ORDER BY e.epoch", [cfg.run_name]).fetchall()
    with ctx.catalog.read() as con:  # the gateway's spans: the policy's response tokens per second of generation
        speed = con.execute(
            "SELECT sum(len(response_token_ids)) / nullif(sum((end_ns - start_ns) / 1e9), 0) FROM spans "
            "WHERE run_id = ? AND span_kind = 'llm' AND response_token_ids IS NOT NULL", [cfg.run_name]).fetchall()[0][0]
    first, last = curve[0], curve[-1]
    table = from_table(record) or {}
    return {"machine": table.get("machine"), "before_reward": first["reward_mean"], "after_reward": last["reward_mean"],
            "before_success": first["success_rate"], "after_success": last["success_rate"],
            "train_reward": [e[5] for e in epochs], "gap_mean": [e[1] for e in epochs],
            "gap_max": [e[2] for e in epochs], "clipped": [e[3] for e in epochs],
            "correction": sorted({e[4] for e in epochs if e[4]}), "call_tokens_per_s": speed}


def _dataset_overrides(config_path: Path) -> list[str]:
    """measure.py pins the datasets to the config's folder: the same paths, for reading its run back."""
    from lightning_core.config import load_config

    r = load_config(config_path).rollouts
    return [f"rollouts.{key}={getattr(r, key)}" for key in ("dataset", "eval_dataset") if getattr(r, key) is not None]


def _records() -> list[dict]:
    """Every run on record, in the order they ran."""
    return [json.loads(line) for line in INDEX.read_text().splitlines()] if INDEX.exists() else []


def report() -> str:
    """The side-by-side table of every recorded run, and the plot of the gap per epoch."""
    records = _records()
    rows, curves = [], {}
    for example in EXAMPLES:
        for cell in CELLS:
            runs = [(r, m) for r in records if r["example"] == example and r["cell"] == cell
                    for m in [figures(r)] if m is not None]
            if not runs:
                continue
            ms = [m for _, m in runs]
            curves[(example, cell)] = [m["gap_mean"] for m in ms if m["gap_mean"]]
            rows.append(
                f"| {example} | {cell.replace(':', ' | ')} | {len(ms)} "
                f"| {_spread([m['before_reward'] for m in ms])} -> {_spread([m['after_reward'] for m in ms])} "
                f"| {_spread([m['before_success'] for m in ms], pct=True)} -> "
                f"{_spread([m['after_success'] for m in ms], pct=True)} "
                f"| {_spread([m['train_reward'][-1] for m in ms])} "
                f"| {_spread([m['gap_mean'][0] for m in ms if m['gap_mean']], digits=4)} / "
                f"{_spread([m['gap_max'][0] for m in ms if m['gap_max']])} "
                f"| {_spread([m['clipped'][0] for m in ms if m['clipped']], pct=True)} "
                f"| {_spread([m['call_tokens_per_s'] for m in ms], digits=0)} "
                f"| {', '.join(str(r['seed']) + ('*' if m.get('lake_lost') else '') for r, m in runs)} "
                f"| {'; '.join(sorted({m['machine'] for m in ms if m.get('machine')}))} |")
    table = "\n".join([
        "| example | vLLM dtype | correction | runs | held-out reward before -> after | success before -> after "
        "| train reward, last epoch | gap at epoch 0: mean / max | clipped at epoch 0 | tokens/s of a call | seeds | machine |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|", *rows,
        "", "Seeds marked * ran on a machine whose disk is gone: only measure.py's table of them is left (held-out "
        "success and train reward), no reward or gap. Each column's mean and spread is over the runs that have it."])
    _plot(curves)
    return table


def _spread(values: list[float | None], *, pct: bool = False, digits: int = 3) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "-"
    mean = statistics.mean(values)
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    if pct:
        return f"{mean:.1%} ± {sd:.1%}"
    return f"{mean:.{digits}f} ± {sd:.{digits}f}"


def _plot(curves: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves = {key: runs for key, runs in curves.items() if runs}  # runs whose lake was lost have no gaps
    examples = sorted({e for e, _ in curves})
    if not examples:
        return
    fig, axes = plt.subplots(1, len(examples), figsize=(6 * len(examples), 4), squeeze=False)
    for ax, example in zip(axes[0], examples):
        for (e, cell), runs in sorted(curves.items()):
            if e != example:
                continue
            for i, gaps in enumerate(runs):
                ax.plot(range(len(gaps)), [g if g is not None else float("nan") for g in gaps],
                        color={"bfloat16": "tab:red", "float32": "tab:blue"}[cell.split(":")[0]],
                        linestyle={"ppo": "-", "decoupled": "--"}[cell.split(":")[1]], alpha=0.7,
                        label=cell if i == 0 else None)
        ax.set_yscale("log")
        ax.set_xlabel("epoch")
        ax.set_ylabel("mean |trainer - vLLM| logprob, first step")
        ax.set_title(example)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(RESULTS / "logprob_gap.png", dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--examples", nargs="+", default=list(EXAMPLES), choices=list(EXAMPLES))
    parser.add_argument("--cells", nargs="+", default=list(CELLS), choices=list(CELLS))
    parser.add_argument("--runs", type=int, default=3, help="seeds 0..runs-1 of each cell")
    parser.add_argument("--report", action="store_true", help="only summarise the runs recorded so far")
    args = parser.parse_args()
    if not args.report:
        # a grid run again goes on where it stopped: runs on record with their figures (evaluated before and after),
        # and a run that failed only after its last evaluation, whose figures were recovered into its record
        done = {(r["example"], r["cell"], r["seed"]) for r in _records()
                if (r["returncode"] == 0 or r.get("measured")) and figures(r) is not None}
        for seed in range(args.runs):  # seed-major: an interrupted grid still has every cell at the first seeds
            for example in args.examples:
                for cell in args.cells:
                    if (example, cell, seed) in done:
                        continue
                    record = run_one(example, cell, seed)
                    print(json.dumps({k: record.get(k) for k in ("example", "cell", "seed", "returncode", "wall_s")}),
                          flush=True)
    print(report())


if __name__ == "__main__":
    main()
