"""Collector ingest throughput: batched OTLP export vs one request per span, same collector, same run.

    .venv/bin/python benchmarks/collector_bench.py --rollouts 400 --spans-per-rollout 12 --senders 2

Each sender process traces rollouts with the SDK (agent -> llm -> tool spans, a reward) through the
real OTLP/HTTP exporter to a real collector. "batched" is Arclight's SDK default
(BatchSpanProcessor); "per-span" exports every span in its own request, as Agent Lightning v0.x's
store client does. The timed section runs from the first span to the moment every span is
durable in the lake (the senders flush, and the collector acknowledges only after fsync). Every
stored span is counted, so a lost span fails the run.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lightning_core import tracing  # noqa: E402
from lightning_core.store.catalog import Catalog  # noqa: E402
from lightning_core.config import load_config  # noqa: E402
from lightning_core.common.services import free_port
from lightning_core.ingest.service import start_collector  # noqa: E402


def sender(url: str, run_id: str, first: int, count: int, spans_per_rollout: int, per_span: bool) -> None:
    """Trace ``count`` rollouts of ``spans_per_rollout`` spans and flush them to the collector."""
    for i in range(first, first + count):
        context = tracing.RolloutContext(run_id=run_id, epoch=0, rollout_id=f"r{i}", task_id=f"t{i % 50}")
        handle = tracing.init_tracing(endpoint=url, context=context, set_global=False, batch=not per_span)
        with tracing.agent("planner"):
            for _ in range((spans_per_rollout - 2) // 2):
                with handle.tracer.start_as_current_span("chat", attributes={"gen_ai.operation.name": "chat", "ids": list(range(64))}):
                    pass
                with tracing.tool("calc", expression="6*7"):
                    pass
            tracing.emit_reward(1.0)
        handle.flush()
        handle.shutdown()


def measure(url: str, cfg, run_id: str, args, per_span: bool) -> dict:
    per = args.rollouts // args.senders
    procs = [mp.get_context("fork").Process(target=sender, args=(url, run_id, k * per, per, args.spans_per_rollout, per_span))
             for k in range(args.senders)]
    started = time.perf_counter()
    for p in procs:
        p.start()
    for p in procs:
        p.join()
    elapsed = time.perf_counter() - started
    with Catalog.from_config(cfg).read() as con:
        stored = con.execute("SELECT count(*), count(DISTINCT rollout_id) FROM spans WHERE run_id = ?", [run_id]).fetchall()[0]
    expected = per * args.senders * (2 + 2 * ((args.spans_per_rollout - 2) // 2))
    if stored[0] != expected:
        raise SystemExit(f"{run_id}: {stored[0]} spans stored, {expected} sent: spans were lost")
    return {"mode": "per-span" if per_span else "batched", "spans": stored[0], "rollouts": stored[1],
            "seconds": elapsed, "spans_per_s": stored[0] / elapsed, "rollouts_per_s": stored[1] / elapsed}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rollouts", type=int, default=400)
    parser.add_argument("--spans-per-rollout", type=int, default=12)
    parser.add_argument("--senders", type=int, default=2)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        cfg = load_config(None, overrides=[f"project_dir={tmp}", f"collector.port={free_port()}"])
        Catalog.from_config(cfg).ensure()
        service = start_collector(cfg)
        try:
            rows = [measure(service.url, cfg, "bench-batched", args, per_span=False),
                    measure(service.url, cfg, "bench-per-span", args, per_span=True)]
        finally:
            service.stop()
    print("| mode | spans | rollouts | seconds | spans/s | rollouts/s |\n|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['mode']} | {r['spans']} | {r['rollouts']} | {r['seconds']:.2f} | {r['spans_per_s']:.0f} | {r['rollouts_per_s']:.1f} |")
    print(f"\nbatched / per-span: {rows[0]['spans_per_s'] / rows[1]['spans_per_s']:.1f}x spans/s")


if __name__ == "__main__":
    main()
