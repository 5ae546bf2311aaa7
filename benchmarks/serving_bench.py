"""Serving benchmarks: gateway overhead vs direct vLLM, and hot-redeploy latency of a LoRA adapter.

    .venv/bin/python benchmarks/serving_bench.py                      # tiny random model (fast start)
    .venv/bin/python benchmarks/serving_bench.py --model models/SmolLM2-135M-Instruct --dtype bfloat16

Starts a collector, one vLLM (CPU build) with LoRA enabled and the gateway, all real processes.
Overhead: the same chat requests (fixed max_tokens, ignore_eos) sent directly to vLLM and through
the gateway, alternating rounds in the same run; latency p50/p99 and throughput per path.
Redeploy: ``deploy_adapter`` of a fresh LoRA (random non-zero weights) as versions 1..N; the time
from the call to the first answer by the new version through the gateway. Prints a JSON summary.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import shutil
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lightning_core.store.catalog import Catalog  # noqa: E402
from lightning_core.config import load_config  # noqa: E402
from lightning_core.serving.client import GatewayClient  # noqa: E402
from lightning_core.common.model import build_tiny_model  # noqa: E402
from lightning_core.serving.redeploy import deploy_adapter  # noqa: E402
from lightning_core.serving.vllm import start_gateway, start_vllm  # noqa: E402
from lightning_core.common.services import free_port
from lightning_core.ingest.service import start_collector  # noqa: E402


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


async def run_load(url: str, *, model: str, requests: int, concurrency: int, max_tokens: int) -> dict:
    """Send ``requests`` chat calls with ``concurrency`` in flight; return latency and throughput."""
    latencies: list[float] = []
    tokens = 0
    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(requests):
        queue.put_nowait(i)
    body = {"model": model, "max_tokens": max_tokens, "temperature": 1.0, "ignore_eos": True}

    async def worker(client: httpx.AsyncClient) -> None:
        nonlocal tokens
        while not queue.empty():
            i = queue.get_nowait()
            started = time.perf_counter()
            r = await client.post(url, json={**body, "messages": [{"role": "user", "content": f"Count to ten, take {i}."}]})
            r.raise_for_status()
            latencies.append(time.perf_counter() - started)
            tokens += r.json()["usage"]["completion_tokens"]

    async with httpx.AsyncClient(timeout=600) as client:
        started = time.perf_counter()
        await asyncio.gather(*(worker(client) for _ in range(concurrency)))
        elapsed = time.perf_counter() - started
    return {"latencies": latencies, "elapsed": elapsed, "tokens": tokens}


def summarize(runs: list[dict]) -> dict:
    latencies = [x for r in runs for x in r["latencies"]]
    elapsed = sum(r["elapsed"] for r in runs)
    return {
        "requests": len(latencies),
        "p50_ms": round(statistics.median(latencies) * 1000, 1),
        "p99_ms": round(percentile(latencies, 0.99) * 1000, 1),
        "req_per_s": round(len(latencies) / elapsed, 2),
        "tokens_per_s": round(sum(r["tokens"] for r in runs) / elapsed, 1),
    }


def make_adapter(model_dir: Path, out_dir: Path, *, seed: int) -> Path:
    """Save a LoRA adapter with random non-zero weights (what a trainer step would produce, size-wise)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    lora = LoraConfig(r=16, lora_alpha=32, init_lora_weights=False, task_type="CAUSAL_LM",
                      target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
    get_peft_model(model, lora).save_pretrained(str(out_dir))
    return out_dir


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=None, help="Model folder (default: a tiny random Llama built here).")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--requests", type=int, default=64, help="Requests per path per round.")
    parser.add_argument("--rounds", type=int, default=3, help="Alternating direct/gateway rounds.")
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--redeploys", type=int, default=5)
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="arclight-serving-bench-"))
    model_dir = args.model.resolve() if args.model else build_tiny_model(work / "tiny-llama")
    cfg = load_config(None, overrides=[
        f"project_dir={work}", f"collector.port={free_port()}", f"gateway.port={free_port()}",
        f"model.path={model_dir}", "model.served_name=base", "serving.port=0", f"serving.dtype={args.dtype}",
        "serving.max_model_len=1024", "serving.max_lora_rank=16",
    ])
    Catalog.from_config(cfg).ensure()
    services = []
    try:
        collector = start_collector(cfg)
        services.append(collector)
        t = time.perf_counter()
        vllm = start_vllm(cfg)
        vllm_start_s = time.perf_counter() - t
        services.append(vllm)
        gateway = start_gateway(cfg, upstreams=[vllm.url], collector_url=collector.url)
        services.append(gateway)
        admin = GatewayClient(gateway.url)
        base_url = admin.register_rollout(rollout_id="bench", run_id="bench", epoch=0)

        paths = {"direct": f"{vllm.url}/v1/chat/completions", "gateway": f"{base_url}/chat/completions"}
        load = {"requests": args.requests, "concurrency": args.concurrency, "max_tokens": args.max_tokens}
        asyncio.run(run_load(paths["direct"], model="base", **{**load, "requests": 8}))  # warm-up
        asyncio.run(run_load(paths["gateway"], model="base", **{**load, "requests": 8}))
        runs: dict[str, list[dict]] = {"direct": [], "gateway": []}
        for _ in range(args.rounds):
            for name, url in paths.items():
                runs[name].append(asyncio.run(run_load(url, model="base", **load)))
        overhead = {name: summarize(r) for name, r in runs.items()}

        redeploys = []
        client = httpx.Client(timeout=120)
        for version in range(1, args.redeploys + 1):
            adapter = make_adapter(model_dir, work / f"adapter-v{version}", seed=version)
            started = time.perf_counter()
            done = deploy_adapter(gateway=admin, replicas=[vllm.url], policy="default", adapter_dir=adapter, version=version)
            r = client.post(f"{base_url}/chat/completions", json={
                "model": "default", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1})
            r.raise_for_status()
            assert r.json()["model"] == f"default-v{version}", r.json()["model"]
            redeploys.append({"version": version, "load_s": round(done.load_s, 3), "verified_s": round(done.first_answer_s, 3),
                              "switched_s": round(done.switch_s, 3), "first_gateway_answer_s": round(time.perf_counter() - started, 3)})
        first = [r["first_gateway_answer_s"] for r in redeploys]
        summary = {
            "model": str(model_dir), "dtype": args.dtype, "vllm_start_s": round(vllm_start_s, 1), "load": load,
            "rounds": args.rounds, "overhead": overhead,
            "gateway_added_p50_ms": round(overhead["gateway"]["p50_ms"] - overhead["direct"]["p50_ms"], 1),
            "redeploy": redeploys,
            "redeploy_first_answer_s": {"median": round(statistics.median(first), 3), "max": round(max(first), 3)},
        }
        print(json.dumps(summary, indent=2))
    finally:
        for service in reversed(services):
            service.stop()
        shutil.rmtree(work, ignore_errors=True)  # the lake, the catalog and the tiny model built here


if __name__ == "__main__":
    main()
