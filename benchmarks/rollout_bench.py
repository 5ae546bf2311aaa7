"""Rollout-stage throughput against vLLM serving the same requests directly, side by side.

For each concurrency C: run one epoch's rollouts of an example through the real rollout stage
(the train flow's ``run_rollouts``: Prefect tasks, a process per rollout, the gateway, the
collector), then read the model calls it made back from the lake and send the same requests
(same prompt token ids, same number of generated tokens: max_tokens = min_tokens, logprobs and
token ids asked for as the gateway asks) straight to the same vLLM server, C at a time.
tokens/s = generated tokens / wall time; ratio = rollout stage / direct.

    .venv/bin/python benchmarks/rollout_bench.py                       # calc, 8 tasks x 8, C = 16 and 64
    .venv/bin/python benchmarks/rollout_bench.py --concurrency 32 64 128 --tasks 16
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "examples"))

import httpx  # noqa: E402
from prefect import flow  # noqa: E402
from prefect.task_runners import ThreadPoolTaskRunner  # noqa: E402

from lightning_core.epoch import stack as services  # noqa: E402
from lightning_core.store.catalog import Catalog  # noqa: E402
from lightning_core.config import load_config  # noqa: E402
from lightning_core.common.stopping import on_signals  # noqa: E402


@flow(name="rollout-bench", task_runner=ThreadPoolTaskRunner(max_workers=512))
def rollout_stage(config_path: str, overrides: list[str], run_id: str) -> float:
    """Run epoch 0 of ``run_id``'s rollouts through the flow's rollout stage; return its wall time."""
    from flows.train import load, run_rollouts, running
    from tasks import epoch as t

    config = load(config_path, [*overrides, f"run_name={run_id}"])
    with running(config, lock=False) as ctx:
        before = cpu_seconds()
        started = time.perf_counter()
        run_rollouts(ctx, run_id=run_id, epoch=0, mode="train")
        elapsed = time.perf_counter() - started
        CPU[run_id] = {k: round(v - before.get(k, 0.0), 1) for k, v in cpu_seconds().items()}
        t.ingest(ctx, run_id=run_id, epoch=0)
    return elapsed


CPU: dict[str, dict[str, float]] = {}
CLASSES = (("VLLM", "vllm"), ("vllm.entrypoints", "vllm"), ("forkserver", "agents"), ("prefect.server", "prefect server"),
           ("lightning_core collector", "collector"), ("lightning_core gateway", "gateway"),
           ("rollout_bench", "flow process"))


def cpu_seconds() -> dict[str, float]:
    """CPU seconds (user + system, with reaped children) of this machine's processes, by kind; niced ones apart."""
    tick = os.sysconf("SC_CLK_TCK")
    totals: dict[str, float] = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            command = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        kind = next((name for key, name in CLASSES if key in command), "other")
        if int(fields[16]) > 0:
            kind = f"niced: {kind}"
        totals[kind] = totals.get(kind, 0.0) + sum(int(x) for x in fields[11:15]) / tick
    return totals


def recorded_calls(config, run_id: str) -> dict[str, list[tuple[list[int], int]]]:
    """Per rollout, in order: (prompt token ids, generated tokens) of each model call the gateway recorded."""
    with Catalog.from_config(config).read() as con:
        rows = con.execute(
            "SELECT rollout_id, prompt_token_ids, len(response_token_ids) FROM spans WHERE run_id = ? AND epoch = 0 "
            "AND span_kind = 'llm' AND prompt_token_ids IS NOT NULL AND len(response_token_ids) > 0 "
            "ORDER BY rollout_id, start_ns", [run_id]).fetchall()
    calls: dict[str, list[tuple[list[int], int]]] = {}
    for rollout, prompt, n in rows:
        calls.setdefault(rollout, []).append((list(prompt), n))
    return calls


async def replay(url: str, model: str, calls: dict[str, list[tuple[list[int], int]]], *, concurrency: int,
                 in_turns: bool) -> float:
    """Send the calls straight to vLLM, ``concurrency`` at a time; return the wall time.

    in_turns=False: every call is independent (vLLM's capacity for this work); True: a rollout's
    calls go one after another, as its agent sends them (the best a rollout stage could do).
    """
    gate = asyncio.Semaphore(concurrency)
    async with httpx.AsyncClient(timeout=600, limits=httpx.Limits(max_connections=concurrency)) as client:
        async def one(prompt: list[int], n: int) -> None:
            r = await client.post(f"{url}/v1/completions", json={
                "model": model, "prompt": prompt, "max_tokens": n, "min_tokens": n, "temperature": 1.0,
                "logprobs": 1, "return_token_ids": True})
            r.raise_for_status()

        async def gated(prompt: list[int], n: int) -> None:
            async with gate:
                await one(prompt, n)

        async def rollout(turns: list[tuple[list[int], int]]) -> None:
            async with gate:
                for prompt, n in turns:
                    await one(prompt, n)

        await one(*next(iter(calls.values()))[0])  # warm
        started = time.perf_counter()
        if in_turns:
            await asyncio.gather(*(rollout(turns) for turns in calls.values()))
        else:
            await asyncio.gather(*(gated(p, n) for turns in calls.values() for p, n in turns))
        return time.perf_counter() - started


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", type=Path, default=REPO / "examples" / "calc" / "config.yaml")
    ap.add_argument("--concurrency", type=int, nargs="+", default=[16, 64])
    ap.add_argument("--tasks", type=int, default=8, help="tasks per epoch (x group_size rollouts)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], help="config override KEY=VALUE")
    a = ap.parse_args()
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    work = REPO / ".arclight" / "bench" / f"rollouts-{stamp}"
    work.mkdir(parents=True)
    from measure import project_overrides  # examples/measure.py: a fresh project keeping the example's paths

    base = ["collector.port=0", "gateway.port=0", "serving.port=0", f"rollouts.tasks_per_epoch={a.tasks}", *a.overrides]
    overrides = project_overrides(a.config, work, "bench", base)
    cfg = load_config(a.config, overrides=overrides)
    results = []
    with on_signals():
        record = services.up(cfg)
        try:
            vllm_url = next(e["url"] for name, e in record.items() if name.startswith("vllm"))
            for c in a.concurrency:
                run_id = f"bench-c{c}"
                load = os.getloadavg()[0]
                stage_s = rollout_stage(str(a.config), [*overrides, f"rollouts.concurrency={c}"], run_id)
                calls = recorded_calls(cfg, run_id)
                direct_s = asyncio.run(replay(vllm_url, cfg.model.served_name, calls, concurrency=c, in_turns=False))
                turns_s = asyncio.run(replay(vllm_url, cfg.model.served_name, calls, concurrency=c, in_turns=True))
                flat = [call for turns in calls.values() for call in turns]
                tokens = sum(n for _, n in flat)
                row = {"concurrency": c, "rollouts": a.tasks * cfg.rollouts.group_size, "calls": len(flat),
                       "generated_tokens": tokens, "prompt_tokens": sum(len(p) for p, _ in flat),
                       "stage_s": round(stage_s, 1), "stage_tokens_per_s": round(tokens / stage_s, 1),
                       "direct_s": round(direct_s, 1), "direct_tokens_per_s": round(tokens / direct_s, 1),
                       "direct_in_turns_s": round(turns_s, 1), "direct_in_turns_tokens_per_s": round(tokens / turns_s, 1),
                       "ratio": round(direct_s / stage_s, 2), "ratio_in_turns": round(turns_s / stage_s, 2),
                       "load_1min": round(load, 2),
                       "stage_cpu_s": {k: v for k, v in sorted(CPU[run_id].items(), key=lambda kv: -kv[1]) if v >= 0.5}}
                results.append(row)
                print(json.dumps(row), flush=True)
        finally:
            services.down(cfg)
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
