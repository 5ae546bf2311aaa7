"""How to serve a multi-agent rollout with a frozen agent on vLLM's CPU build: LoRA adapter vs merged weights.

    .venv/bin/python benchmarks/multiagent_serving_bench.py                  # every setup below, one after another
    .venv/bin/python benchmarks/multiagent_serving_bench.py --setup groups   # one of them

Each setup answers the same 64 rollouts of the sql example at once (writer, frozen checker,
rewriter: three chat calls each, the prompts the agent sends, temperature 1 for the trained
agents, greedy for the checker) straight against vLLM (no gateway) with SmolLM2-135M:

- ``lora``: one vLLM with LoRA on; writer and rewriter call an active adapter (r=16, all linear
  layers, random B so it is not skipped), the checker the base model -- ``serving.redeploy: lora``;
- ``lora-base``: the same vLLM, every call to the base model (LoRA on, no adapter active);
- ``plain``: one vLLM without LoRA serving everything (what merged serving costs with one policy);
- ``groups``: two vLLMs without LoRA, writer and rewriter on one, the checker on the other
  (``serving.redeploy: merged`` with a frozen agent: ``serving.replica_groups``);
- ``plain-block128``: ``plain`` with the CPU build's default block size (128) instead of 32.

Prints one JSON line per setup: wall seconds for the 64 rollouts, generated tokens per second, the
1-minute load average before and after (the machine is shared), prefix-cache hit rate.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "examples" / "sql"))

import httpx  # noqa: E402
from openai import AsyncOpenAI  # noqa: E402

import sql_agent  # noqa: E402
from lightning_core.config import load_config  # noqa: E402
from lightning_core.serving.vllm import model_dir, start_vllm  # noqa: E402
from lightning_core.common.services import free_port  # noqa: E402

SETUPS = ("lora", "lora-base", "plain", "groups", "plain-block128")


def make_adapter(base: Path, out: Path) -> Path:
    """A LoRA adapter as the trainer makes them (r=16, alpha 32), with non-zero B so vLLM applies it."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base),
                           LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", task_type="CAUSAL_LM"))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 1e-3)
    model.save_pretrained(out)
    return out


def config(project: Path, *, lora: bool, block: int | None):
    extra = [] if block is None else ["--block-size", str(block)]
    return load_config(None, overrides=[f"project_dir={project}", "model.served_name=base",
                                        f"serving.redeploy={'lora' if lora else 'merged'}",
                                        f"serving.extra_args={json.dumps(extra)}"])


async def rollouts(tasks: list[dict], *, policy: AsyncOpenAI, frozen: AsyncOpenAI, policy_model: str) -> int:
    """Run the sql agent's three calls for every task at once; return the tokens generated."""
    async def one(task: dict) -> int:
        q = task["question"]
        w = await policy.chat.completions.create(model=policy_model, temperature=1.0, max_tokens=48, messages=[
            {"role": "system", "content": sql_agent.WRITER_SYSTEM}, *sql_agent.WRITER_EXAMPLE, {"role": "user", "content": q}])
        draft = w.choices[0].message.content
        c = await frozen.chat.completions.create(model="base", temperature=0.0, max_tokens=32, messages=[
            {"role": "system", "content": sql_agent.CHECKER_SYSTEM},
            {"role": "user", "content": f"Question: {q}\nQuery: {draft}\nResult: 1 rows: 3"}])
        f = await policy.chat.completions.create(model=policy_model, temperature=1.0, max_tokens=48, messages=[
            {"role": "system", "content": sql_agent.REWRITER_SYSTEM}, *sql_agent.REWRITER_EXAMPLE,
            {"role": "user", "content": f"Question: {q}\nQuery: {draft}\nResult: 1 rows: 3\n"
                                        f"Critique: {c.choices[0].message.content}"}])
        return sum(x.usage.completion_tokens for x in (w, c, f))

    return sum(await asyncio.gather(*(one(t) for t in tasks)))


def hit_rate(url: str) -> float | None:
    text = httpx.get(f"{url}/metrics", timeout=10).text
    values = {line.split("{")[0]: float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
              if line.startswith(("vllm:prefix_cache_hits_total", "vllm:prefix_cache_queries_total"))}
    queries = values.get("vllm:prefix_cache_queries_total")
    return round(values["vllm:prefix_cache_hits_total"] / queries, 3) if queries else None


def run(setup: str, work: Path, tasks: list[dict]) -> dict:
    lora = setup.startswith("lora")
    block = 128 if setup == "plain-block128" else None  # None: Arclight's CPU default (32)
    cfg = config(work, lora=lora, block=block)
    servers = [start_vllm(cfg, port=free_port(), name=f"bench-{setup}")]
    if setup == "groups":
        servers.append(start_vllm(cfg, port=free_port(), name=f"bench-{setup}-base"))
    try:
        policy_model = "base"
        if setup == "lora":
            adapter = make_adapter(model_dir(cfg), work / "adapter")
            r = httpx.post(f"{servers[0].url}/v1/load_lora_adapter", json={"lora_name": "policy", "lora_path": str(adapter)},
                           timeout=120)
            r.raise_for_status()
            policy_model = "policy"
        async def measure() -> tuple[int, float, float]:
            # the clients belong to this event loop: warm-up and measured pass run in it
            policy = AsyncOpenAI(base_url=f"{servers[0].url}/v1", api_key="x")
            frozen = AsyncOpenAI(base_url=f"{servers[-1].url}/v1", api_key="x")
            await rollouts(tasks[:4], policy=policy, frozen=frozen, policy_model=policy_model)  # warm-up
            load = os.getloadavg()[0]
            started = time.perf_counter()
            tokens = await rollouts(tasks, policy=policy, frozen=frozen, policy_model=policy_model)
            return tokens, time.perf_counter() - started, load

        tokens, wall, load_before = asyncio.run(measure())
        return {"setup": setup, "rollouts": len(tasks), "wall_s": round(wall, 1), "gen_tokens_per_s": round(tokens / wall, 1),
                "prefix_cache_hit_rate": [hit_rate(s.url) for s in servers],
                "load_before": round(load_before, 2), "load_after": round(os.getloadavg()[0], 2)}
    finally:
        for server in servers:
            server.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--setup", choices=SETUPS, action="append", help="setups to run (default all)")
    parser.add_argument("--rollouts", type=int, default=64)
    args = parser.parse_args()
    tasks = [json.loads(line) for line in (REPO / "examples" / "sql" / "train.jsonl").read_text().splitlines()][:args.rollouts]
    with tempfile.TemporaryDirectory(prefix="arclight-serving-") as tmp:
        for setup in args.setup or SETUPS:
            print(json.dumps(run(setup, Path(tmp), tasks)), flush=True)


if __name__ == "__main__":
    main()
