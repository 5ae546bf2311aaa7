"""Triplet rows -> training samples -> optimizer steps of micro-batches -> padded tensors.

Pure data preparation: no model, no config object. A *sample* is one triplet (one model call):
prompt ids, response ids, the logprobs recorded when it was sampled (or None), its advantage.
A *step* is the samples of one optimizer step (up to a token budget), split into micro-batches,
each sample carrying the weight that makes the summed loss the chosen normalisation.
"""

from __future__ import annotations

import math
import random
from collections import defaultdict
from typing import Any, Iterable

import torch
from trl.trainer.utils import pad

from lightning_core.trainer.samples import ZERO_ADVANTAGE, Sample, Step, group_key, rollout_key
from lightning_core.trainer.prefix_tree import TreeCounter, plain_size, tree_size



def rows_of(triplets: Any) -> list[dict[str, Any]]:
    """Return triplets (a pyarrow Table, a polars frame or a list of dicts) as a list of dicts."""
    if isinstance(triplets, list):
        return triplets
    if hasattr(triplets, "to_pylist"):
        return triplets.to_pylist()
    if hasattr(triplets, "to_dicts"):
        return triplets.to_dicts()
    raise TypeError(f"triplets must be a pyarrow Table, a polars DataFrame or a list of dicts, found {type(triplets).__name__}")


def epoch_stats(rows: list[dict[str, Any]], *, success_reward: float) -> dict[str, float]:
    """Reward statistics per rollout (one reward each), triplet count and groups with no signal."""
    rollout_reward: dict[str, float] = {}
    for i, row in enumerate(rows):
        if row.get("reward") is not None:
            rollout_reward.setdefault(rollout_key(row, i), float(row["reward"]))
    rewards = list(rollout_reward.values())
    mean = sum(rewards) / len(rewards) if rewards else float("nan")
    std = math.sqrt(sum((r - mean) ** 2 for r in rewards) / len(rewards)) if rewards else float("nan")
    group_adv: dict[str, list[float]] = defaultdict(list)
    for row in rows:
        group_adv[group_key(row)].append(abs(float(row.get("advantage") or 0.0)))
    zero_groups = sum(1 for advs in group_adv.values() if max(advs) < ZERO_ADVANTAGE)
    return {
        "reward/mean": mean,
        "reward/std": std,
        "success_rate": (sum(r >= success_reward for r in rewards) / len(rewards)) if rewards else float("nan"),
        "triplets": float(len(rows)),
        "rollouts": float(len(rewards)),
        "groups": float(len(group_adv)),
        "zero_adv_groups": float(zero_groups),
    }


def staleness(row: dict[str, Any], *, trained_from: int) -> int | None:
    """Versions between the one that sampled ``row`` (its ``policy_version``) and ``trained_from``; None when the
    call's version was not recorded (no gateway span)."""
    sampled = str(row.get("policy_version") or "").rsplit("-v", 1)[-1]  # the gateway's number ("3"), or "<policy>-v3"
    return trained_from - int(sampled) if sampled.isdigit() else None


def within_staleness(rows: list[dict[str, Any]], *, trained_from: int, max_staleness: int
                     ) -> tuple[list[dict[str, Any]], dict[str, int]]:
    """Keep the groups whose every triplet was sampled at most ``max_staleness`` versions before ``trained_from``.

    A group goes whole or not at all: its advantages were computed over all its members, so dropping some would
    bias the rest. Triplets of unrecorded version count as fresh (and are counted)."""
    stale_groups = {group_key(r) for r in rows if (staleness(r, trained_from=trained_from) or 0) > max_staleness}
    kept = [r for r in rows if group_key(r) not in stale_groups]
    counts = {"staleness_dropped_groups": len(stale_groups), "staleness_dropped_triplets": len(rows) - len(kept),
              "staleness_unknown": sum(1 for r in kept if staleness(r, trained_from=trained_from) is None)}
    return kept, counts


def make_samples(
    rows: list[dict[str, Any]],
    *,
    max_prompt_length: int,
    max_response_length: int,
    use_recorded_logprobs: bool,
    keep_zero_advantage: bool = False,
    trained_from: int = 0,
) -> tuple[list[Sample], dict[str, int]]:
    """Turn triplet rows into samples; drop the untrainable ones and count why. ``trained_from``: the version number
    the training starts from (each sample's staleness is counted from it)."""
    counts = {"dropped_zero_advantage": 0, "dropped_no_tokens": 0, "dropped_bad_advantage": 0,
              "truncated_prompt": 0, "truncated_response": 0, "logprobs_missing": 0, "logprobs_mismatched": 0}
    samples: list[Sample] = []
    for i, row in enumerate(rows):
        prompt = list(row.get("prompt_token_ids") or row.get("prompt_ids") or [])
        response = list(row.get("response_token_ids") or row.get("response_ids") or [])
        advantage = row.get("advantage")
        if not prompt or not response:
            counts["dropped_no_tokens"] += 1
            continue
        if advantage is None or not math.isfinite(float(advantage)):
            counts["dropped_bad_advantage"] += 1
            continue
        if abs(float(advantage)) < ZERO_ADVANTAGE and not keep_zero_advantage:
            counts["dropped_zero_advantage"] += 1
            continue
        logprobs = row.get("response_logprobs") if use_recorded_logprobs else None
        if logprobs is not None and (len(logprobs) != len(response) or any(lp is None for lp in logprobs)):
            counts["logprobs_mismatched"] += 1
            logprobs = None
        if logprobs is None:
            counts["logprobs_missing"] += 1
        else:
            logprobs = [float(lp) for lp in logprobs]
        if len(prompt) > max_prompt_length:
            counts["truncated_prompt"] += 1
            prompt = prompt[-max_prompt_length:]
        if len(response) > max_response_length:
            counts["truncated_response"] += 1
            response = response[:max_response_length]
            logprobs = logprobs[:max_response_length] if logprobs is not None else None
        samples.append(Sample(
            prompt_ids=[int(t) for t in prompt], response_ids=[int(t) for t in response], logprobs=logprobs,
            advantage=float(advantage), reward=float(row.get("reward") or 0.0),
            rollout_id=rollout_key(row, i), group_id=group_key(row), row=i,
            staleness=max(staleness(row, trained_from=trained_from) or 0, 0),
        ))
    return samples, counts


def plan_steps(
    samples: list[Sample],
    *,
    tokens_per_step: int,
    micro_batch_size: int,
    normalization: str,
    seed: int,
    shared_prefix: str = "off",
    micro_batch_tokens: int = 1024,
) -> list[Step]:
    """Shuffle rollouts (keeping each rollout's turns together), pack steps to the token budget.

    ``shared_prefix``: off packs ``micro_batch_size`` samples per micro-batch for the plain forward;
    on packs samples of a group together while their prefix tree stays within ``micro_batch_tokens``;
    auto does that for a step whose distinct tokens are at most SHARED_PREFIX_GAIN of the plain cost.
    """
    if shared_prefix not in ("off", "on", "auto"):
        raise ValueError(f"shared_prefix must be 'off', 'on' or 'auto', found {shared_prefix!r}")
    # As few steps as the budget allows, of about equal size: 99 triplets in two steps are 50 + 49,
    # not 96 + 3 (a step of 3 triplets would move the weights as far as one of 96, on far less evidence).
    total = sum(s.tokens for s in samples)
    n_steps = max(1, math.ceil(total / tokens_per_step))
    target = total / n_steps
    steps: list[list[Sample]] = [[] for _ in range(n_steps)]
    used = 0
    for s in in_rollout_order(samples, seed=seed):
        steps[min(n_steps - 1, int((used + s.tokens / 2) // target))].append(s)
        used += s.tokens
    rollout_tokens = response_tokens_by_rollout(samples)  # a rollout split over two steps still counts once
    return [make_step(chunk, micro_batch_size=micro_batch_size, normalization=normalization,
                      shared_prefix=shared_prefix, micro_batch_tokens=micro_batch_tokens,
                      rollout_tokens=rollout_tokens) for chunk in steps if chunk]


def in_rollout_order(samples: list[Sample], *, seed: int) -> list[Sample]:
    """The samples with each rollout's calls together, in their order, the rollouts shuffled by ``seed``."""
    by_rollout: dict[str, list[Sample]] = defaultdict(list)
    for s in samples:
        by_rollout[s.rollout_id].append(s)
    order = sorted(by_rollout)
    random.Random(seed).shuffle(order)
    return [s for rollout in order for s in by_rollout[rollout]]


def make_step(chunk: list[Sample], *, micro_batch_size: int, normalization: str, shared_prefix: str,
              micro_batch_tokens: int, rollout_tokens: dict[str, int] | None = None) -> Step:
    """One optimizer step of ``chunk``: plain micro-batches of ``micro_batch_size``, or packed for the shared-prefix
    forward (``shared_prefix`` on, or auto where that encodes at most SHARED_PREFIX_GAIN of the plain tokens)."""
    plain = [chunk[i:i + micro_batch_size] for i in range(0, len(chunk), micro_batch_size)]
    shared = pack_shared_prefix(chunk, micro_batch_tokens=micro_batch_tokens) if shared_prefix != "off" else None
    use_shared = shared is not None and (
        shared_prefix == "on"
        or sum(tree_size(mb) for mb in shared) <= SHARED_PREFIX_GAIN * sum(plain_size(mb) for mb in plain))
    return Step(micro_batches=shared if use_shared else plain,
                weights=loss_weights(chunk, normalization=normalization, rollout_tokens=rollout_tokens),
                shared_prefix=use_shared)


# auto uses the shared-prefix forward when it encodes at most this fraction of the plain forward's tokens:
# the packed sequence's attention is dense over its nodes, which the saved tokens must pay for.
SHARED_PREFIX_GAIN = 0.6


def pack_shared_prefix(chunk: list[Sample], *, micro_batch_tokens: int) -> list[list[Sample]]:
    """Micro-batches for the shared-prefix forward: a group's samples together, each batch's trie within budget."""
    ordered = sorted(chunk, key=lambda s: s.group_id)  # stable: rollouts and their turns keep their order
    batches: list[list[Sample]] = []
    counter = TreeCounter()
    for s in ordered:
        if batches and batches[-1] and counter.size + counter.added_by(s) > micro_batch_tokens:
            batches.append([])
            counter = TreeCounter()
        if not batches:
            batches.append([])
        batches[-1].append(s)
        counter.add(s)
    return batches


def response_tokens_by_rollout(samples: Iterable[Sample]) -> dict[str, int]:
    """Each rollout's response tokens, over all its calls."""
    per_rollout: dict[str, int] = defaultdict(int)
    for s in samples:
        per_rollout[s.rollout_id] += len(s.response_ids)
    return dict(per_rollout)


def loss_weights(samples: Iterable[Sample], *, normalization: str,
                 rollout_tokens: dict[str, int] | None = None) -> dict[int, float]:
    """Per-token weight of each sample so that the weighted token sum is the normalised loss.

    token: every response token of the step weighs 1/N_tokens. sequence: each triplet's mean over its
    tokens, averaged over triplets. rollout: each rollout's mean over all its tokens, averaged over
    rollouts (a 20-turn rollout counts as much as a 1-turn one; Agent Lightning's per_rollout_mean).
    ``rollout_tokens``: each rollout's response tokens over the whole epoch (default: over ``samples``); a
    rollout with only part of its tokens here counts as that fraction of a rollout, so one split over two
    steps counts once in all: weight = 1 / (T_rollout x sum over the step's samples of their share of their rollout).
    """
    samples = list(samples)
    if normalization == "token":
        total = sum(len(s.response_ids) for s in samples)
        return {s.row: 1.0 / total for s in samples}
    if normalization == "sequence":
        return {s.row: 1.0 / (len(s.response_ids) * len(samples)) for s in samples}
    if normalization == "rollout":
        whole = rollout_tokens if rollout_tokens is not None else response_tokens_by_rollout(samples)
        held = sum(len(s.response_ids) / whole[s.rollout_id] for s in samples)  # rollouts here, in fractions
        return {s.row: 1.0 / (whole[s.rollout_id] * held) for s in samples}
    raise ValueError(f"loss normalization must be 'token', 'sequence' or 'rollout', found {normalization!r}")


def collate(samples: list[Sample], *, weights: dict[int, float], pad_token_id: int, device: torch.device | str) -> dict[str, torch.Tensor]:
    """Pad a micro-batch: prompts on the left, responses on the right, so responses share columns.

    ``old_logps`` holds recorded logprobs (NaN where none were recorded); ``position_ids`` count
    real tokens only, so a sample's logprobs do not depend on how much padding it got.
    """
    prompts = [torch.tensor(s.prompt_ids, dtype=torch.long) for s in samples]
    responses = [torch.tensor(s.response_ids, dtype=torch.long) for s in samples]
    prompt_ids = pad(prompts, padding_value=pad_token_id, padding_side="left")
    prompt_mask = pad([torch.ones_like(p) for p in prompts], padding_value=0, padding_side="left")
    response_ids = pad(responses, padding_value=pad_token_id, padding_side="right")
    response_mask = pad([torch.ones_like(r) for r in responses], padding_value=0, padding_side="right")
    old = [torch.tensor(s.logprobs if s.logprobs is not None else [math.nan] * len(s.response_ids), dtype=torch.float32)
           for s in samples]
    attention_mask = torch.cat([prompt_mask, response_mask], dim=1)
    position_ids = (attention_mask.cumsum(dim=1) - 1).clamp(min=0)
    batch = {
        "input_ids": torch.cat([prompt_ids, response_ids], dim=1),
        "attention_mask": attention_mask,
        "position_ids": position_ids,
        "response_ids": response_ids,
        "response_mask": response_mask.float(),
        "old_logps": pad(old, padding_value=math.nan, padding_side="right"),
        "advantages": torch.tensor([s.advantage for s in samples], dtype=torch.float32),
        "weights": torch.tensor([weights[s.row] for s in samples], dtype=torch.float32),
    }
    return {k: v.to(device) for k, v in batch.items()}
