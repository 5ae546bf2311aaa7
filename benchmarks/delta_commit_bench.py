"""What one commit to a span table costs as the table holds more files (why a busy partition is compacted).

The collector commits each group of requests with delta-rs's ``create_write_transaction`` and then brings
its table object up to date (``delta.commit_durably``); both read the state of every file in the table.
This grows a table (with the span tables' properties: a checkpoint every 10 commits) by commits of
2,000 add actions, and at each size times 40 commits of one file as the collector makes them (the
log cleaned as the collector cleans it). The files are never read, so they need not exist.

    .venv/bin/python benchmarks/delta_commit_bench.py [--sizes 0 2000 10000 40000]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow as pa
from deltalake import DeltaTable, write_deltalake
from deltalake.transaction import AddAction

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lightning_core.store.delta import COMMIT_HOOKS, table_properties  # noqa: E402

SCHEMA = pa.schema([("a", pa.int64()), ("date", pa.string())])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[0, 2000, 10000, 40000], help="files in the table")
    parser.add_argument("--commits", type=int, default=40, help="one-file commits timed at each size")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="arclight-commit-bench-"))
    try:
        write_deltalake(str(root), pa.table({"a": [1], "date": ["2026-11-24"]}, schema=SCHEMA), partition_by=["date"],
                        configuration=table_properties(0))
        table, made = DeltaTable(str(root)), 1

        def commit(count: int) -> None:
            nonlocal made
            actions = [AddAction(f"date=2026-11-24/part-{made + i}.parquet", 300_000, {"date": "2026-11-24"},
                                 int(time.time() * 1000), True, json.dumps({"numRecords": 1000})) for i in range(count)]
            table.create_write_transaction(actions, mode="append", schema=SCHEMA, partition_by=["date"],
                                           post_commithook_properties=COMMIT_HOOKS)
            table.update_incremental()
            made += count

        for size in sorted(args.sizes):
            while made < size:
                commit(min(2000, size - made))
                table.cleanup_metadata()
            held, times = len(table.file_uris()), []
            for i in range(args.commits):
                started = time.perf_counter()
                commit(1)
                times.append((time.perf_counter() - started) * 1000)
                if i % 10 == 9:
                    table.cleanup_metadata()
            uptime = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
            print(f"{held:>6} files: a one-file commit {statistics.median(times):.1f} ms median, "
                  f"{statistics.fmean(times):.1f} ms mean (every 10th writes a checkpoint); {uptime}")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
