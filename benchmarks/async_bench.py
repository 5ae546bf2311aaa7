"""Epoch wall time, synchronous against asynchronous epochs (trainer.max_staleness 0 against 1), side by side.

For each agent (the calc agent as it is, and the calc agent whose calculator takes ``--latency`` seconds a call,
as a remote sandbox or API would) and each mode, a fresh copy of the calc example trains ``--epochs`` epochs on
the same tasks and samples (dynamic sampling off: every epoch runs ``--tasks`` problems x ``--group`` samples),
with its own collector, vLLM and gateway. Reported per run:

- epoch wall time: the train flow's wall time over its epochs (the overlap shows here);
- vLLM idle: the share of that time with no model call in flight (the gateway's spans of the run's calls);
- trainer idle: the share with no training stage running (the epochs table's train_started_at / train_finished_at);
- CPU busy: the share of the machine's CPU time (every core, /proc/stat) that was not idle: what an overlap can
  still use is the rest.

    .venv/bin/python benchmarks/async_bench.py --epochs 4                 # both agents, both modes
    .venv/bin/python benchmarks/async_bench.py --agents latency --latency 2 --epochs 3

Prints a markdown table and writes the rows as JSON (``--json``). Record ``uptime`` beside it: this machine is
shared, and both modes of an agent run back to back so that they see the same load.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "examples"))

from lightning_core.config import load_config  # noqa: E402
from lightning_core.epoch import stack as services  # noqa: E402
from lightning_core.epoch.context import RunContext  # noqa: E402
from lightning_core.common.stopping import on_signals  # noqa: E402
from measure import fresh_project  # noqa: E402

CONFIG = REPO / "examples" / "calc" / "config.yaml"


def cpu_times() -> tuple[int, int]:
    """This machine's CPU time so far (jiffies, all cores): busy and total (/proc/stat)."""
    fields = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    return sum(fields) - idle, sum(fields)


def busy_seconds(intervals: list[tuple[float, float]], start: float, end: float) -> float:
    """Seconds of [start, end] covered by at least one of ``intervals`` (their union, clipped)."""
    covered, reach = 0.0, start
    for a, b in sorted((max(a, start), min(b, end)) for a, b in intervals if b > start and a < end):
        if b > reach:
            covered += b - max(a, reach)
            reach = b
    return covered


def run_once(*, agent: str, staleness: int, epochs: int, tasks: int, group: int, latency: float, seed: int,
             concurrency: int | None, extra: list[str]) -> dict:
    """Train a fresh calc project; return its wall time and idle shares."""
    from flows.train import train

    overrides = [f"trainer.max_staleness={staleness}", f"rollouts.tasks_per_epoch={tasks}",
                 *([f"rollouts.concurrency={concurrency}"] if concurrency else []),
                 f"rollouts.group_size={group}", "rollouts.informative_groups=null", f"rollouts.max_tasks_per_epoch={tasks}",
                 "evaluation.every_epochs=null", f"epochs={epochs}", "trainer.lr_schedule=constant",
                 f"rollouts.resources.tool_latency_s={latency if agent == 'latency' else 0}", *extra]
    _, overrides = fresh_project(CONFIG, seed=seed, overrides=overrides)
    cfg = load_config(CONFIG, overrides=overrides)
    services.up(cfg)
    try:
        load = os.getloadavg()[0]
        started, cpu_before = time.time(), cpu_times()
        train(config_path=str(CONFIG), overrides=overrides, epochs=epochs)
        ended, cpu_after = time.time(), cpu_times()
    finally:
        services.down(cfg)
    with RunContext.of(cfg).catalog.read() as con:
        calls = con.execute("SELECT start_ns / 1e9, end_ns / 1e9 FROM spans WHERE run_id = ? AND span_kind = 'llm' "
                            "AND rollout_id IS NOT NULL", [cfg.run_name]).fetchall()
        trains = con.execute("SELECT epoch(train_started_at), epoch(train_finished_at) FROM epochs WHERE run_id = ? "
                             "AND train_finished_at IS NOT NULL", [cfg.run_name]).fetchall()
        rollouts = con.execute("SELECT count(*) FROM rollouts WHERE run_id = ? AND status = 'succeeded'",
                               [cfg.run_name]).fetchall()[0][0]
        rewards = [r[0] for r in con.execute("SELECT avg(reward) FROM rollouts WHERE run_id = ? AND status = 'succeeded' "
                                              "GROUP BY epoch ORDER BY epoch", [cfg.run_name]).fetchall()]
    wall = ended - started
    return {"agent": agent, "max_staleness": staleness, "epochs": epochs, "wall_s": wall, "epoch_s": wall / epochs,
            "vllm_idle": 1 - busy_seconds(calls, started, ended) / wall,
            "trainer_idle": 1 - busy_seconds(trains, started, ended) / wall, "rollouts": rollouts,
            "cpu_busy": (cpu_after[0] - cpu_before[0]) / max(cpu_after[1] - cpu_before[1], 1),
            "reward_per_epoch": rewards, "load_at_start": load, "latency_s": latency if agent == "latency" else 0.0,
            "tasks": tasks, "group": group, "concurrency": cfg.rollouts.concurrency, "overrides": extra,
            "project": str(cfg.project_dir)}


def table(rows: list[dict]) -> str:
    lines = ["| agent | rollouts at once | mode | epoch wall time | vs synchronous | vLLM idle | trainer idle | CPU busy | rollouts | reward per epoch | load at start |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    sync = {r["agent"]: r["epoch_s"] for r in rows if r["max_staleness"] == 0}
    for r in rows:
        name = f"calc, calculator {r['latency_s']:g} s a call" if r["agent"] == "latency" else "calc"
        mode = "synchronous" if r["max_staleness"] == 0 else f"max_staleness {r['max_staleness']}"
        ratio = f"{r['epoch_s'] / sync[r['agent']]:.2f}x" if r["agent"] in sync else "-"
        rewards = ", ".join(f"{x:.2f}" for x in r["reward_per_epoch"])
        lines.append(f"| {name} | {r['concurrency']} | {mode} | {r['epoch_s']:.1f} s | {ratio} | {r['vllm_idle']:.0%} | {r['trainer_idle']:.0%} "
                     f"| {r['cpu_busy']:.0%} "
                     f"| {r['rollouts']} | {rewards} | {r['load_at_start']:.2f} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--agents", nargs="+", choices=["calc", "latency"], default=["calc", "latency"])
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--tasks", type=int, default=8, help="problems per epoch")
    ap.add_argument("--group", type=int, default=8, help="samples per problem")
    ap.add_argument("--latency", type=float, default=2.0, help="seconds a calculator call takes (the latency agent)")
    ap.add_argument("--concurrency", type=int, help="rollouts at once (default: the calc config's 64); a sandbox or API "
                    "pool that serves a few agents at a time is what makes an agent wait on its tools")
    ap.add_argument("--set", dest="common", action="append", default=[], help="an override for every run")
    ap.add_argument("--async-set", dest="overlapped", action="append", default=[],
                    help="an override for the max_staleness 1 runs only")
    ap.add_argument("--modes", nargs="+", type=int, default=[0, 1], help="max_staleness values to run")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path, help="append the rows here, one JSON object per line")
    ap.add_argument("--one", help=argparse.SUPPRESS)  # AGENT:STALENESS: one run, in this process (see below)
    a = ap.parse_args()
    if a.one:
        agent, staleness = a.one.split(":")
        with on_signals():
            row = run_once(agent=agent, staleness=int(staleness), epochs=a.epochs, tasks=a.tasks, group=a.group,
                           latency=a.latency, seed=a.seed, concurrency=a.concurrency,
                           extra=[*a.common, *(a.overlapped if int(staleness) else [])])
        print(json.dumps(row))
        return
    rows = []
    for agent in a.agents:
        for staleness in a.modes:
            # each run in a process of its own: a process that trained once has its OpenMP settings fixed (the
            # asynchronous run's trainer threads wait passively only where torch was not loaded before it)
            # (the child prints its row and returns before --json is read: only this process appends)
            out = subprocess.run([sys.executable, __file__, *sys.argv[1:], "--one", f"{agent}:{staleness}"], check=True,
                                 stdout=subprocess.PIPE, text=True).stdout
            row = json.loads(out.strip().splitlines()[-1])
            row["finished"] = dt.datetime.now().isoformat(timespec="seconds")
            print(json.dumps(row), file=sys.stderr, flush=True)
            rows.append(row)
            if a.json:
                with a.json.open("a") as fh:
                    fh.write(json.dumps(row) + "\n")
    print(table(rows))


if __name__ == "__main__":
    main()
