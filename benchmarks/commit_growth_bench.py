"""Cost of one span-table commit as the table's Delta log grows: one collector request per commit.

    .venv/bin/python benchmarks/commit_growth_bench.py --commits 4000 [--code /path/to/other/checkout]

Writes the same converted request (1,050 spans) ``--commits`` times through ``Lake.write`` into a
fresh lake, one commit each, and prints every 500 commits the median and p90 commit time and the
number of entries in ``_delta_log``. As in a collector, a compactor pass runs every 5 s in a thread
(``Lake.compact``; here with a file threshold no partition reaches, so the data files grow the same
in every run and only the log differs). ``--code`` runs another checkout's ``lightning_core`` (side
by side with an older commit).
"""

from __future__ import annotations

import argparse
import os
import pathlib
import shutil
import sys
import tempfile
import threading
import time

HERE = pathlib.Path(__file__).resolve().parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--commits", type=int, default=4000)
    parser.add_argument("--code", type=pathlib.Path, default=HERE.parent, help="the checkout whose lightning_core runs")
    args = parser.parse_args()
    code = str(args.code.resolve())
    sys.path.insert(0, code)
    from lightning_core.store import spans as L  # noqa: E402 - before ingest_bench, which puts this checkout first
    from lightning_core.ingest.otlp_decode import PROTOBUF, parse  # noqa: E402

    sys.path.insert(0, str(HERE))
    import ingest_bench  # noqa: E402

    assert L.__file__.startswith(code), L.__file__
    body = ingest_bench.build_request(0)
    tables = L.request_to_tables(parse(body, PROTOBUF), body=body)
    root = tempfile.mkdtemp(prefix="commit-growth-")
    lake = L.Lake(root)
    log = pathlib.Path(root) / "spans" / "training" / "_delta_log"
    stop = threading.Event()

    def compactor() -> None:  # the collector's compact_loop, every compact_idle_s / 2
        mine = L.Lake(root)
        while not stop.wait(5.0):
            mine.compact(min_files=10**9, idle_s=0)

    thread = threading.Thread(target=compactor, daemon=True)
    thread.start()
    times: list[float] = []
    try:
        for i in range(args.commits):
            started = time.perf_counter()
            lake.write(tables)
            times.append(time.perf_counter() - started)
            if (i + 1) % 500 == 0:
                last = sorted(times[-500:])
                print(f"{code}: commits {i + 1 - 500}-{i + 1}: median {last[250] * 1e3:.1f} ms, p90 {last[450] * 1e3:.1f} ms; "
                      f"log entries {len(os.listdir(log))}", flush=True)
    finally:
        stop.set()
        thread.join()
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
