"""The GRPO step's inputs: one ``Sample`` per triplet (prompt and response ids, recorded logprobs, advantage, loss
weight) and one optimizer ``Step`` of micro-batches; the keys that group them by task and rollout."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


ZERO_ADVANTAGE = 1e-8


@dataclass
class Sample:
    """One trainable triplet."""

    prompt_ids: list[int]
    response_ids: list[int]
    logprobs: list[float] | None
    advantage: float
    reward: float
    rollout_id: str
    group_id: str
    row: int
    staleness: int = 0  # versions between the one that sampled it and the one it trains from

    @property
    def tokens(self) -> int:
        """Prompt plus response tokens (what a forward pass costs)."""
        return len(self.prompt_ids) + len(self.response_ids)


@dataclass
class Step:
    """The micro-batches of one optimizer step and each sample's loss weight."""

    micro_batches: list[list[Sample]]
    weights: dict[int, float] = field(default_factory=dict)  # row -> weight of each of its response tokens
    shared_prefix: bool = False  # micro-batches are packed for the shared-prefix forward (prefix_tree)

    @property
    def samples(self) -> list[Sample]:
        """All samples of the step, in order."""
        return [s for mb in self.micro_batches for s in mb]


def group_key(row: dict[str, Any]) -> str:
    """Return the group a triplet's advantage is relative to (group_id, else task_id)."""
    return str(row.get("group_id") or row.get("task_id") or "")


def rollout_key(row: dict[str, Any], index: int) -> str:
    """Return the rollout a triplet belongs to (its own row when the rollout id is missing)."""
    return str(row.get("rollout_id") or f"row-{index}")
