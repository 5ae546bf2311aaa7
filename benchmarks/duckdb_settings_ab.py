"""A/B of DuckDB settings for the SQL pipeline on the triplets benchmark's lake.

    .venv/bin/python benchmarks/duckdb_settings_ab.py --lake /tmp/benchlake1m --runs 3 \\
        --memory-limit 8GB --set "block_allocator_memory='4GB'"

Runs ``materialize_triplets`` ``--runs`` times in this process, with each ``--set`` applied to the
pipeline's DuckDB connection right after it opens (``SET name=value``), and prints per run the wall
time, this process's user and system CPU and its minor page faults. Without ``--set`` it measures
the defaults, the A side of an A/B. Alternate invocations of the two sides, and compare them
within one session: this machine's speed drifts. Generate the lake first with
``benchmarks/triplets_bench.py``.
"""

from __future__ import annotations

import argparse
import resource
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lightning_core.pipeline import triplets as pipeline  # noqa: E402
from lightning_core.config import load_config  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lake", type=Path, default=Path("/tmp/benchlake1m"))
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--memory-limit", default="4GB")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--set", dest="settings", action="append", default=[], metavar="NAME=VALUE",
                        help="a DuckDB setting for the pipeline's connection, e.g. \"block_allocator_memory='4GB'\"")
    args = parser.parse_args()
    if not (args.lake / "spans" / "training" / "run_id=bench").is_dir():
        raise SystemExit(f"no benchmark spans in {args.lake}: run benchmarks/triplets_bench.py --lake {args.lake} first")

    connect = pipeline.connect

    def connect_with_settings(config):
        con = connect(config)
        for setting in args.settings:
            con.execute(f"SET {setting}")
        return con

    pipeline.connect = connect_with_settings
    lake = args.lake.resolve()
    cfg = load_config(None, overrides=[f"project_dir={lake.parent}", f"lake.path={lake}",
                                       f"lake.duckdb_memory_limit={args.memory_limit}", f"lake.duckdb_threads={args.threads}"])
    runs = []
    for _ in range(args.runs):
        before = resource.getrusage(resource.RUSAGE_SELF)
        report = pipeline.materialize_triplets(cfg, run_id="bench", epoch=0)
        after = resource.getrusage(resource.RUSAGE_SELF)
        runs.append(f"{report.seconds:.2f} s (user {after.ru_utime - before.ru_utime:.1f} s, "
                    f"system {after.ru_stime - before.ru_stime:.1f} s, "
                    f"{(after.ru_minflt - before.ru_minflt) / 1e6:.2f} M faults)")
    print(f"memory_limit={args.memory_limit} settings={args.settings or 'defaults'}:")
    for i, run in enumerate(runs, 1):
        print(f"  run {i}: {run}")


if __name__ == "__main__":
    main()
