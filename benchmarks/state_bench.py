"""State-table cost: one state write (a rollout's outcome) and one read, on a state of N rollouts.

    .venv/bin/python benchmarks/state_bench.py --rollouts 1000 20000
    PYTHONPATH=<other checkout> .venv/bin/python benchmarks/state_bench.py   # the same against other code

The state lives in a fresh temporary lake; each size is timed over ``--repeat`` writes and reads
(median and max). Results: benchmarks/README.md ("State tables as Delta tables").
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

if not os.environ.get("PYTHONPATH"):  # this checkout's code, unless PYTHONPATH names another
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lightning_core.store.catalog import Catalog  # noqa: E402


def measure(n: int, repeat: int) -> tuple[list[float], list[float]]:
    root = Path(tempfile.mkdtemp()) / "lake"
    try:
        catalog = Catalog(root)
        catalog.ensure()
        with catalog.write() as con:
            con.execute("INSERT INTO runs (run_id) VALUES ('r')")
            con.execute("INSERT INTO rollouts (rollout_id, run_id, epoch, task_id, status, task) "
                        "SELECT 'ro-' || i, 'r', i // 64, 't' || (i % 50), 'planned', '{\"question\": \"what is 2+2\"}' "
                        f"FROM range({n}) t(i)")
        writes, reads = [], []
        for i in range(repeat):
            started = time.perf_counter()
            with catalog.write() as con:
                con.execute("UPDATE rollouts SET status = 'succeeded', reward = 1.0 WHERE rollout_id = ?", [f"ro-{i}"])
            writes.append(time.perf_counter() - started)
            started = time.perf_counter()
            with catalog.read(spans=False) as con:
                con.execute("SELECT status, count(*) FROM rollouts WHERE epoch = 0 GROUP BY 1").fetchall()
            reads.append(time.perf_counter() - started)
        return writes, reads
    finally:
        shutil.rmtree(root.parent, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rollouts", type=int, nargs="+", default=[1000, 20000])
    parser.add_argument("--repeat", type=int, default=30)
    args = parser.parse_args()
    print(subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip())
    for n in args.rollouts:
        writes, reads = measure(n, args.repeat)
        print(f"{n} rollouts: write median {statistics.median(writes) * 1000:.1f} ms (max {max(writes) * 1000:.0f}), "
              f"read median {statistics.median(reads) * 1000:.1f} ms (max {max(reads) * 1000:.0f})")


if __name__ == "__main__":
    main()
