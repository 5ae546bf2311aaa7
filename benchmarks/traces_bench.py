"""What publishing each epoch's rollouts as MLflow traces costs (issue 54): the calc example's epochs with
``tracking.traces`` all, sample and off, side by side, and the bytes the traces add to ``mlflow.db``.

Each setting runs ``arclight train`` of a fresh copy of the calc example (the main job's small epochs: 4 tasks x 4
samples, up to 8 tasks) for ``--epochs`` epochs with no held-out evaluation, one setting after the other, in the
order given, ``--rounds`` times (alternating, so the machine's drift falls on each alike). Per epoch it reads from
the state tables the wall time (started_at -> finished_at), the training's, and what publishing recorded
(``epochs.traces``: traces, seconds), and at the end the size of ``mlflow.db`` and how many traces it holds.

    .venv/bin/python benchmarks/traces_bench.py --epochs 3 --modes off,sample,all --rounds 1
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
SMALL = ["rollouts.tasks_per_epoch=4", "rollouts.group_size=4", "rollouts.informative_groups=2",
         "rollouts.max_tasks_per_epoch=8", "rollouts.concurrency=16", "trainer.micro_batch_size=8",
         "evaluation.every_epochs=null"]
RESULTS = REPO / "benchmarks" / "results" / "traces_bench.jsonl"


def uptime() -> str:
    return Path("/proc/loadavg").read_text().split(" ")[0]


def run_one(mode: str, *, epochs: int, workdir: Path) -> dict:
    """One ``arclight train`` of a fresh calc copy with ``tracking.traces=mode``; its per-epoch figures."""
    from lightning_core.common.services import free_port
    from lightning_core.config import load_config
    from lightning_core.store.catalog import Catalog

    project = workdir / f"calc-{mode}-{time.strftime('%H%M%S')}"
    shutil.copytree(REPO / "examples" / "calc", project, ignore=shutil.ignore_patterns(".arclight", "mlflow.db",
                                                                                        "mlartifacts"))
    overrides = [*SMALL, f"tracking.traces={mode}", f"collector.port={free_port()}", f"gateway.port={free_port()}",
                 f"serving.port={free_port()}"]
    args = [str(Path(sys.executable).with_name("arclight")), "train", str(project / "config.yaml"), "--epochs",
            str(epochs), *[a for o in overrides for a in ("--set", o)]]
    load = [uptime()]
    started = time.monotonic()
    with open(project / "bench.log", "wb") as out:
        code = subprocess.run(args, stdout=out, stderr=subprocess.STDOUT, cwd=REPO, env={**os.environ}).returncode
    wall = time.monotonic() - started
    load.append(uptime())
    if code != 0:  # keep what the run said: the run's folder goes with the bench's
        kept = RESULTS.with_name(f"traces_bench-failed-{mode}-{time.strftime('%Y%m%d-%H%M%S')}.log")
        kept.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(project / "bench.log", kept)
        tail = (project / "bench.log").read_text(errors="replace").strip().splitlines()[-15:]
        print(f"{mode}: arclight train exited {code} after {wall:.1f} s; its output is in {kept}:\n" + "\n".join(tail),
              file=sys.stderr, flush=True)
        return {"mode": mode, "returncode": code, "wall_s": round(wall, 1), "load": load, "machine": os.uname().nodename,
                "log": str(kept.relative_to(REPO)), "when": time.strftime("%Y-%m-%d %H:%M:%S")}
    cfg = load_config(project / "config.yaml", overrides=overrides)
    with Catalog.from_config(cfg).read(spans=False) as con:
        rows = con.execute("SELECT epoch, epoch(finished_at) - epoch(started_at), epoch(train_finished_at) - "
                           "epoch(train_started_at), traces FROM epochs WHERE run_id = ? ORDER BY epoch",
                           [cfg.run_name]).fetchall()
    db = project / "mlflow.db"
    with sqlite3.connect(db) as sql:
        traces = sql.execute("SELECT count(*) FROM trace_info").fetchone()[0]
        spans = sql.execute("SELECT count(*) FROM spans").fetchone()[0]
    return {"mode": mode, "returncode": code, "wall_s": round(wall, 1), "load": load, "machine": os.uname().nodename,
            "epochs": [{"epoch": e, "epoch_s": round(s or 0, 1), "train_s": round(t or 0, 1),
                        "traces": json.loads(tr) if tr else None} for e, s, t, tr in rows],
            "mlflow_db_bytes": db.stat().st_size, "traces": traces, "trace_spans": spans,
            "when": time.strftime("%Y-%m-%d %H:%M:%S")}


def table(records: list[dict]) -> str:
    """The side-by-side table: per setting, epoch wall time (median over epochs and rounds), publishing time, and
    mlflow.db size, each with its ratio to ``off``."""
    by_mode: dict[str, list[dict]] = {}
    for r in records:
        if r["returncode"] == 0:
            by_mode.setdefault(r["mode"], []).append(r)
    def epoch_median(rs):
        return statistics.median(e["epoch_s"] for r in rs for e in r["epochs"])
    base = by_mode.get("off")
    lines = ["| tracking.traces | runs | epoch wall, median (ratio to off) | publishing per epoch (traces, s) | "
             "mlflow.db (traces) | load |", "|---|---|---|---|---|---|"]
    for mode in ("off", "sample", "all"):
        rs = by_mode.get(mode)
        if not rs:
            continue
        med = epoch_median(rs)
        ratio = f" ({med / epoch_median(base):.2f})" if base else ""
        pubs = [e["traces"] for r in rs for e in r["epochs"] if e["traces"]]
        publishing = (f"{statistics.median(p['published'] for p in pubs):.0f} traces, "
                      f"{statistics.median(p['seconds'] for p in pubs):.1f} s") if pubs else "-"
        size = statistics.median(r["mlflow_db_bytes"] for r in rs) / 1e6
        loads = sorted(float(x) for r in rs for x in r["load"])
        lines.append(f"| {mode} | {len(rs)} | {med:.1f} s{ratio} | {publishing} | {size:.1f} MB "
                     f"({statistics.median(r['traces'] for r in rs):.0f}) | {loads[0]:.1f}-{loads[-1]:.1f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--modes", default="off,sample,all")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--report", action="store_true", help="print the table of the recorded runs and stop")
    args = parser.parse_args()
    if not args.report:
        workdir = Path(tempfile.mkdtemp(prefix="traces-bench-"))
        for _ in range(args.rounds):
            for mode in args.modes.split(","):
                record = run_one(mode, epochs=args.epochs, workdir=workdir)
                RESULTS.parent.mkdir(parents=True, exist_ok=True)
                with open(RESULTS, "a") as fh:
                    fh.write(json.dumps(record) + "\n")
                print(json.dumps(record), flush=True)
        shutil.rmtree(workdir, ignore_errors=True)
    records = [json.loads(line) for line in RESULTS.read_text().splitlines()] if RESULTS.exists() else []
    print(table(records))


if __name__ == "__main__":
    main()
