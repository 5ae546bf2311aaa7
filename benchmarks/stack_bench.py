"""How long a stack (collector, vLLM, gateway) takes to start: side by side (``start_stack``) against one after the
other (collector, then vLLM, then the gateway, each waited for: how ``start_stack`` started them before issue 69).

    .venv/bin/python benchmarks/stack_bench.py examples/calc/config.yaml --pairs 3

Alternates the two ways (pairs), each start in a fresh project folder, and prints each time with the load average.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lightning_core.config import load_config  # noqa: E402
from lightning_core.epoch.stack import Stack, start_stack  # noqa: E402
from lightning_core.ingest.service import start_collector  # noqa: E402
from lightning_core.serving.vllm import start_gateway, start_vllm_replicas, upstream_specs  # noqa: E402


def one_after_the_other(config) -> Stack:
    stack = Stack(collector=start_collector(config))
    try:
        stack.replicas = start_vllm_replicas(config)
        stack.gateway = start_gateway(config, upstreams=upstream_specs(stack.replicas), collector_url=stack.collector.url)
    except BaseException:
        stack.stop()
        raise
    return stack


def timed(how, config_path: str) -> float:
    with tempfile.TemporaryDirectory(prefix="stack-bench-") as tmp:
        config = load_config(config_path, overrides=[f"project_dir={tmp}", "collector.port=0", "gateway.port=0",
                                                     "serving.port=0"])
        started = time.perf_counter()
        stack = how(config)
        took = time.perf_counter() - started
        stack.stop()
        return took


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config")
    parser.add_argument("--pairs", type=int, default=3)
    args = parser.parse_args()
    times: dict[str, list[float]] = {"one after the other": [], "side by side": []}
    for pair in range(args.pairs):
        for name, how in (("one after the other", one_after_the_other), ("side by side", start_stack)):
            took = timed(how, args.config)
            times[name].append(took)
            print(f"pair {pair + 1}, {name}: {took:.1f} s (load {os.getloadavg()[0]:.2f})", flush=True)
    seq, par = statistics.median(times["one after the other"]), statistics.median(times["side by side"])
    print(f"median: one after the other {seq:.1f} s, side by side {par:.1f} s, saved {seq - par:.1f} s ({par / seq:.2f}x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
