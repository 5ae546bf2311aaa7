"""Stress (``make stress``, not in CI): send spans to a real collector while SIGKILLing it at random,
then check that no acknowledged span is missing and no span is stored twice.

    .venv/bin/python -m tests.stress_sigkill --spans 100000 [--second-compactor]

Senders post protobuf requests of ``--batch`` spans with unique span ids and never re-send, so
every duplicate would be the lake's doing (a compaction or a commit cut off). The collector
compacts every second (``compact_min_files=2``, ``compact_idle_s=0``); the killer SIGKILLs it every
``--kill-every`` seconds (random, mean) and restarts it. ``--second-compactor`` also loops
``Lake.compact`` in another process (and kills it too): delta-rs 1.6.6 lets two compactions of the
same files both commit, so that run shows rows stored twice (reported, as ``ConcurrentCompaction``,
by the compactor that loses). At the end the lake is counted through the ``spans_raw`` view (no
de-duplication).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

from lightning_core.store.catalog import Catalog
from lightning_core.store.spans import snapshot
from lightning_core.common.services import free_port, is_healthy
from tests.otlp_factory import export_request

REPO = Path(__file__).resolve().parents[1]
RUNS = ("stress-a", "stress-b", "stress-c")


class Collector:
    """A collector process on a fixed port that can be killed and started again."""

    def __init__(self, lake: Path, port: int, log: Path):
        self.lake, self.port, self.log = lake, port, log
        self.url = f"http://127.0.0.1:{port}"
        self.process: subprocess.Popen | None = None

    def start(self) -> None:
        argv = [sys.executable, "-m", "lightning_core", "collector", "--lake", str(self.lake), "--port", str(self.port),
                "--set", "collector.compact_min_files=2", "--set", "collector.compact_idle_s=0", "--log-level", "warning"]
        with open(self.log, "ab") as log:
            self.process = subprocess.Popen(argv, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 60
        while not is_healthy(f"{self.url}/healthz", timeout_s=1):
            if time.monotonic() > deadline or self.process.poll() is not None:
                raise SystemExit(f"collector did not start (log {self.log})")
            time.sleep(0.05)

    def kill(self) -> None:
        self.process.send_signal(signal.SIGKILL)
        self.process.wait()

    def stop(self) -> None:
        self.process.send_signal(signal.SIGTERM)
        self.process.wait(30)


COMPACTOR = "import sys\nfrom lightning_core.store.spans import Lake\nlake = Lake(sys.argv[1])\nwhile True:\n    lake.compact(min_files=2, idle_s=0)\n"


def start_compactor(lake: Path) -> subprocess.Popen:
    """A second compactor looping over the lake, as `arclight compact` run beside the collector."""
    return subprocess.Popen([sys.executable, "-c", COMPACTOR, str(lake)], cwd=REPO, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)


def files_outside_the_table(lake: Path) -> int:
    """Data files on disk that no table version lists: written by a commit a kill cut off (vacuum removes them
    after the retention window) -- never read, whatever their number."""
    listed = {str(Path(f).resolve()) for files in snapshot(lake).files.values() for f in files}
    on_disk = {str(p.resolve()) for p in (lake / "spans").rglob("*.parquet") if "_delta_log" not in p.parts}
    return len(on_disk - listed)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--spans", type=int, default=100_000)
    parser.add_argument("--batch", type=int, default=100)
    parser.add_argument("--senders", type=int, default=4)
    parser.add_argument("--kill-every", type=float, default=1.5, help="mean seconds between kills")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--second-compactor", action="store_true",
                        help="also loop `Lake.compact` in a second process (delta-rs 1.6.6 then stores rows twice)")
    args = parser.parse_args()
    rng = random.Random(args.seed)
    root = Path(tempfile.mkdtemp(prefix="arclight-stress-"))
    lake = root / "lake"
    Catalog(lake).ensure()
    collector = Collector(lake, free_port(), root / "collector.log")
    collector.start()
    compactor = start_compactor(lake) if args.second_compactor else None

    n_requests = args.spans // args.batch
    next_request = iter(range(n_requests))
    lock = threading.Lock()
    acked: list[int] = []  # request numbers acknowledged with 200
    failed: dict[str, int] = {}
    done = threading.Event()

    def send() -> None:
        with httpx.Client(timeout=30) as client:
            while True:
                with lock:
                    k = next(next_request, None)
                if k is None:
                    return
                first = k * args.batch
                spans = [{"span_id": (first + i + 1).to_bytes(8, "big"), "trace_id": (k + 1).to_bytes(16, "big"),
                          "start": 1_700_000_000 * 10**9 + first + i} for i in range(args.batch)]
                body = export_request({"arclight.run_id": RUNS[k % len(RUNS)], "arclight.epoch": k % 2}, spans).SerializeToString()
                try:
                    status = client.post(f"{collector.url}/v1/traces", content=body,
                                         headers={"Content-Type": "application/x-protobuf"}).status_code
                except httpx.HTTPError as exc:
                    status = type(exc).__name__
                with lock:
                    if status == 200:
                        acked.append(k)
                    else:  # never re-sent: a duplicate could then only be the lake's doing
                        failed[str(status)] = failed.get(str(status), 0) + 1
                while status != 200 and not is_healthy(f"{collector.url}/healthz", timeout_s=1):
                    time.sleep(0.05)  # the collector is being restarted

    kills = {"collector": 0, "compactor": 0}

    def kill_loop() -> None:
        nonlocal compactor
        while not done.wait(rng.expovariate(1 / args.kill_every)):
            if compactor is None or rng.random() < 0.5:
                collector.kill()
                kills["collector"] += 1
                collector.start()
            else:
                compactor.send_signal(signal.SIGKILL)
                compactor.wait()
                kills["compactor"] += 1
                compactor = start_compactor(lake)

    started = time.monotonic()
    killer = threading.Thread(target=kill_loop)
    killer.start()
    senders = [threading.Thread(target=send) for _ in range(args.senders)]
    for t in senders:
        t.start()
    for t in senders:
        t.join()
    done.set()
    killer.join()
    elapsed = time.monotonic() - started
    if compactor is not None:
        compactor.send_signal(signal.SIGKILL)
        compactor.wait()
    collector.stop()

    acked_ids = {k * args.batch + i + 1 for k in acked for i in range(args.batch)}
    with Catalog(lake).read() as con:
        rows = con.execute(
            "SELECT span_id FROM spans_raw WHERE run_id IN (SELECT unnest($runs))", {"runs": list(RUNS)}).fetchall()
    stored = [int(span_id, 16) for (span_id,) in rows]
    stored_set = set(stored)
    report = {
        "spans_sent": n_requests * args.batch,
        "requests_acknowledged": len(acked),
        "requests_not_acknowledged": failed,
        "spans_acknowledged": len(acked_ids),
        "acknowledged_spans_missing": len(acked_ids - stored_set),
        "rows_stored": len(stored),
        "duplicate_rows": len(stored) - len(stored_set),  # in spans_raw: the spans view would hide them
        "unacknowledged_spans_stored_anyway": len(stored_set - acked_ids),
        "kills": kills,
        "data_files_outside_the_table": files_outside_the_table(lake),
        "seconds": round(elapsed, 1),
        "uptime": subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip(),
        "lake": str(lake),
    }
    print(json.dumps(report, indent=2))
    ok = report["acknowledged_spans_missing"] == 0 and report["duplicate_rows"] == 0
    if ok and not os.environ.get("ARCLIGHT_STRESS_KEEP"):
        import shutil

        shutil.rmtree(root, ignore_errors=True)
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
