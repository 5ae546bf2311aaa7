"""Stress (``make stress``, not in CI): well-behaved clients next to a hostile one. Every good
request must be acknowledged and stored, whatever the neighbour sends.

    .venv/bin/python -m tests.stress_neighbours --seconds 30 [--source DIR]

``--senders`` clients post valid protobuf requests (100 spans, unique ids) as fast as they can;
one hostile client cycles through the bad inputs of issue 15 (times past 2^63, a 300-digit
epoch, a run id with a newline or '..', all-zero ids, wrong wire types, JSON nested 10,000 deep,
+inf epochs, 2,000 partitions in one request, a 30 MB body, a chunked body past the limit).
``--source`` runs the collector from another checkout (to compare with main). Prints one JSON
report (good requests answered by status, p50/p99 latency, good spans missing, bad requests by
status) and exits 1 when a good request failed or a good span is missing.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import duckdb
import httpx

from lightning_core.store.catalog import Catalog
from lightning_core.common.services import free_port, is_healthy
from tests.otlp_factory import export_request, otlp_json

REPO = Path(__file__).resolve().parents[1]
PB, JS = {"Content-Type": "application/x-protobuf"}, {"Content-Type": "application/json"}


def bad_inputs() -> list[tuple[str, bytes, dict]]:
    """(name, body, headers) of every bad input issue 15 found."""
    day = 86_400 * 10**9
    fan = [{"start": 1_600_000_000 * 10**9 + i * day, "end": 1_600_000_000 * 10**9 + i * day + 1} for i in range(2000)]
    inf = otlp_json(export_request({"arclight.run_id": "bad-inf"}))
    inf["resourceSpans"][0]["resource"]["attributes"].append({"key": "arclight.epoch", "value": {"doubleValue": "Infinity"}})

    def pb(resource, spans=1):
        return export_request(resource, spans).SerializeToString()

    return [
        ("start time 2^63", pb({"arclight.run_id": "bad"}, [{"start": 2**63, "end": 2**63}]), PB),
        ("epoch of 300 digits", pb({"arclight.run_id": "bad", "arclight.epoch": "9" * 300}), PB),
        ("run id ok\\n", pb({"arclight.run_id": "ok\n"}), PB),
        ("run id ../../etc", pb({"arclight.run_id": "../../etc"}), PB),
        ("epoch -1", pb({"arclight.run_id": "bad", "arclight.epoch": -1}), PB),
        ("all-zero ids", pb({"arclight.run_id": "bad"}, [{"trace_id": bytes(16), "span_id": bytes(8)}]), PB),
        ("wrong wire type", bytes([0x0A, 0x02, 0x10, 0x01]), PB),
        ("JSON nested 10,000 deep", b'{"resourceSpans":' + b"[" * 10_000 + b"]" * 10_000 + b"}", JS),
        ("epoch +inf", json.dumps(inf).encode(), JS),
        ("2,000 partitions", pb({"service.name": "fan"}, fan), PB),
        ("30 MB body (valid, heavy)", pb({"arclight.run_id": "bad-big"}, [{"attributes": {"pad": "x" * 30_000_000}}]), PB),
    ]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=30)
    parser.add_argument("--senders", type=int, default=4)
    parser.add_argument("--source", type=Path, default=REPO, help="checkout whose collector runs")
    args = parser.parse_args()
    lake = Path(tempfile.mkdtemp(prefix="arclight-neighbours-")) / "lake"
    Catalog(lake).ensure()
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    collector = subprocess.Popen([sys.executable, "-m", "lightning_core", "collector", "--lake", str(lake), "--port", str(port),
                                  "--log-level", "error"], cwd=args.source, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    while not is_healthy(f"{url}/healthz", timeout_s=1):
        time.sleep(0.1)
    deadline = time.monotonic() + args.seconds
    lock = threading.Lock()
    good: dict[str, int] = {}
    latencies: list[float] = []
    acked_spans = [0]
    bad: dict[str, dict[str, int]] = {}
    counter = iter(range(10**9))

    def good_sender() -> None:
        with httpx.Client(timeout=120) as client:
            while time.monotonic() < deadline:
                with lock:
                    k = next(counter)
                spans = [{"span_id": (k * 100 + i + 1).to_bytes(8, "big"), "trace_id": (k + 1).to_bytes(16, "big")} for i in range(100)]
                body = export_request({"arclight.run_id": "good", "arclight.epoch": 0}, spans).SerializeToString()
                started = time.monotonic()
                try:
                    status = str(client.post(f"{url}/v1/traces", content=body, headers=PB).status_code)
                except httpx.HTTPError as exc:
                    status = type(exc).__name__
                with lock:
                    good[status] = good.get(status, 0) + 1
                    latencies.append(time.monotonic() - started)
                    acked_spans[0] += 100 if status == "200" else 0

    def hostile_sender() -> None:
        inputs = bad_inputs()
        with httpx.Client(timeout=120) as client:
            while time.monotonic() < deadline:
                for name, body, headers in inputs:
                    try:
                        status = str(client.post(f"{url}/v1/traces", content=body, headers=headers).status_code)
                    except httpx.HTTPError as exc:
                        status = type(exc).__name__
                    bad.setdefault(name, {}).setdefault(status, 0)
                    bad[name][status] += 1

    threads = [threading.Thread(target=good_sender) for _ in range(args.senders)] + [threading.Thread(target=hostile_sender)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    try:
        with Catalog(lake).read() as con:
            stored, query_error = con.execute("SELECT count(DISTINCT span_id) FROM spans WHERE run_id = 'good'").fetchall()[0][0], None
    except duckdb.Error as exc:  # a poisoned lake: no query on spans works any more
        stored, query_error = 0, str(exc).splitlines()[0][:300]
    collector.terminate()
    collector.wait(30)
    latencies.sort()
    report = {
        "source": str(args.source),
        "seconds": args.seconds,
        "good_requests": good,
        "good_spans_acknowledged": acked_spans[0],
        "good_spans_stored": stored,
        "spans_view_error": query_error,
        "good_latency_p50_s": round(statistics.median(latencies), 3) if latencies else None,
        "good_latency_p99_s": round(latencies[int(len(latencies) * 0.99)], 3) if latencies else None,
        "good_latency_max_s": round(latencies[-1], 3) if latencies else None,
        "bad_requests": bad,
        "uptime": subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip(),
    }
    print(json.dumps(report, indent=2))
    sent = sum(good.values())
    sys.exit(0 if good.get("200", 0) == sent and stored >= acked_spans[0] else 1)


if __name__ == "__main__":
    main()
