"""Dynamic sampling, after DAPO (arXiv 2503.14476): draw further tasks until enough groups train.

A GRPO group whose samples all got the same reward has zero advantages and carries no gradient.
With ``rollouts.informative_groups`` set, an epoch that holds fewer informative groups than that
draws more tasks (a new sampling round), runs them, and counts again, until it holds enough or
has drawn ``max_tasks_per_epoch`` tasks. The size of a round is estimated from the informative
rate seen so far, so that one round usually suffices.
"""

from __future__ import annotations

import math

from lightning_core.config import ArclightConfig


def task_cap(config: ArclightConfig) -> int | None:
    """The most tasks one epoch may draw: ``max_tasks_per_epoch``, else 3 x ``tasks_per_epoch``."""
    r = config.rollouts
    if r.max_tasks_per_epoch is not None:
        return r.max_tasks_per_epoch
    return 3 * r.tasks_per_epoch if r.tasks_per_epoch is not None else None


def tasks_to_add(*, informative: int, drawn: int, target: int | None, cap: int | None) -> int:
    """How many more tasks to draw: 0 when the target is met (or off) or the cap is reached."""
    if target is None or informative >= target:
        return 0
    room = (cap - drawn) if cap is not None else math.inf
    if room <= 0:
        return 0
    rate = max(informative, 1) / max(drawn, 1)  # informative groups per task so far (at least one assumed)
    wanted = max(target - informative, math.ceil((target - informative) / rate))
    return int(min(room, wanted))
