"""SFT from traces: keep the best triplets and fine-tune on their response tokens, on the trainer's own step.

The triplets are already token ids. ``plan_sft_steps`` turns them into ``grpo.train_grpo`` steps whose gradient is
the responses' token-mean negative log-likelihood, so SFT gets the shared-prefix forward: the calls of an agent's
rollout share their prompt's prefix (system prompt, worked examples, earlier turns), encoded once per micro-batch.
trl's SFTTrainer, which this replaces, encoded every call whole: 5.1 s per call against 0.84 on the multi-hop warm
start's calls here (``benchmarks/sft_bench.py``).
"""

from __future__ import annotations

import dataclasses
import math
from collections import defaultdict
from typing import Any

from lightning_core.trainer.batches import in_rollout_order, make_step
from lightning_core.trainer.samples import Sample, Step, group_key


def select_sft_rows(rows: list[dict[str, Any]], *, min_reward: float | None, top_fraction: float | None) -> list[dict[str, Any]]:
    """Keep triplets with reward >= ``min_reward`` and/or in the top ``top_fraction`` of their group."""
    kept = [r for r in rows if r.get("reward") is not None]
    if min_reward is not None:
        kept = [r for r in kept if float(r["reward"]) >= min_reward]
    if top_fraction is not None:
        groups: dict[str, list[dict[str, Any]]] = defaultdict(list)
        for r in kept:
            groups[group_key(r)].append(r)
        top = []
        for members in groups.values():
            rollouts = sorted({(float(r["reward"]), str(r.get("rollout_id"))) for r in members}, reverse=True)
            n = max(1, round(len(rollouts) * top_fraction))
            best = {rid for _, rid in rollouts[:n]}
            top.extend(r for r in members if str(r.get("rollout_id")) in best)
        kept = top
    return kept


def plan_sft_steps(samples: list[Sample], *, calls_per_step: int, passes: float, seed: int, shared_prefix: str,
                   micro_batch_tokens: int) -> list[Step]:
    """SFT's optimizer steps for ``grpo.train_grpo``: ``passes`` over the calls (the last one partial when
    fractional), each in its own shuffled order, ``calls_per_step`` calls per step (a rollout's calls stay together,
    so a step's calls share their prompt's prefix), every call's advantage 1 and no behaviour logprobs.

    On-policy with advantage 1 the clipped surrogate's ratio is 1 and its gradient is that of the responses'
    token-mean negative log-likelihood: the step is SFT's, and it gets the trainer's shared-prefix forward."""
    sft = [dataclasses.replace(s, advantage=1.0, logprobs=None) for s in samples]
    per_pass = math.ceil(len(sft) / calls_per_step)
    steps: list[Step] = []
    for p in range(math.ceil(passes)):
        calls = in_rollout_order(sft, seed=seed + p)
        steps += [make_step(calls[i:i + calls_per_step], micro_batch_size=calls_per_step, normalization="token",
                            shared_prefix=shared_prefix, micro_batch_tokens=micro_batch_tokens)
                  for i in range(0, len(calls), calls_per_step)]
    return steps[:max(1, math.ceil(passes * per_pass))]
