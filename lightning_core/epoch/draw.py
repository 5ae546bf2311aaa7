"""Which training tasks an epoch draws: the seeded draw, optionally balanced by a task field
(``rollouts.balance_by``), from the training tasks less the validation split (``rollouts.validation_tasks``).

Everything here is a function of the config and the dataset's contents, seeded by (seed, epoch): an epoch planned
again (a resumed run) draws the same tasks, and the validation split is the same for every epoch and every resume.
"""

from __future__ import annotations

import json
import logging
import random
from pathlib import Path
from typing import Any

from lightning_core.config import ArclightConfig
from lightning_core.rollouts.dataset import DatasetError, file_sha256, load_tasks


log = logging.getLogger("arclight.draw")


def training_tasks(config: ArclightConfig) -> list[dict[str, Any]]:
    """Every task of ``rollouts.dataset`` (each with the ``balance_by`` field when that is set)."""
    r = config.rollouts
    if r.dataset is None:
        raise DatasetError("rollouts.dataset is not set: point it at a JSONL file of training tasks")
    return load_tasks(r.dataset, required_field=r.balance_by, required_by=f"rollouts.balance_by ({r.balance_by!r})")


def validation_split(config: ArclightConfig, tasks: list[dict[str, Any]] | None = None) -> list[dict[str, Any]]:
    """The ``rollouts.validation_tasks`` training tasks held out of every epoch's draw ([] when off): seeded by
    ``rollouts.seed`` alone, so the same for every epoch and every resume; balanced by ``balance_by`` when set."""
    r = config.rollouts
    if not r.validation_tasks:
        return []
    tasks = training_tasks(config) if tasks is None else tasks
    if r.validation_tasks >= len(tasks):
        raise DatasetError(f"rollouts.validation_tasks ({r.validation_tasks}) must be fewer than the {len(tasks)} tasks of "
                           f"{r.dataset}: the rest train; lower it")
    return draw(tasks, count=r.validation_tasks, rng=random.Random(f"validation-{r.seed}"), balance_by=r.balance_by)


def training_pool(config: ArclightConfig) -> list[dict[str, Any]]:
    """The tasks epochs draw from: the training tasks less the validation split, in file order."""
    tasks = training_tasks(config)
    held = {t["id"] for t in validation_split(config, tasks)}
    return [t for t in tasks if t["id"] not in held]


def epoch_rng(config: ArclightConfig, *, epoch: int) -> random.Random:
    """The random source of an epoch's first draw (sampling round 0)."""
    return random.Random(_epoch_seed(config, epoch))


def _epoch_seed(config: ArclightConfig, epoch: int) -> int:
    return config.rollouts.seed * 100_003 + epoch


def round_rng(config: ArclightConfig, *, epoch: int, sampling_round: int) -> random.Random:
    """The random source of a later sampling round of an epoch (dynamic sampling)."""
    return random.Random(_epoch_seed(config, epoch) * 1_009 + sampling_round)


def epoch_tasks(config: ArclightConfig, *, epoch: int) -> list[dict[str, Any]]:
    """The tasks epoch ``epoch`` draws first: ``tasks_per_epoch`` of the pool (every task when None)."""
    r = config.rollouts
    pool = training_pool(config)
    if r.tasks_per_epoch is None or r.tasks_per_epoch >= len(pool):
        return pool
    return draw(pool, count=r.tasks_per_epoch, rng=epoch_rng(config, epoch=epoch), balance_by=r.balance_by)


def draw(tasks: list[dict[str, Any]], *, count: int, rng: random.Random, balance_by: str | None) -> list[dict[str, Any]]:
    """``count`` of ``tasks`` at random; with ``balance_by``, as many of each value of that field as the counts allow
    (``balanced_quotas``). Without it this is ``rng.sample``, the draw Arclight has always made."""
    count = min(count, len(tasks))
    if balance_by is None:
        return rng.sample(tasks, count)
    groups: dict[str, list[dict[str, Any]]] = {}
    for task in tasks:
        groups.setdefault(json.dumps(task[balance_by], sort_keys=True), []).append(task)
    quotas = balanced_quotas({value: len(members) for value, members in groups.items()}, count=count, rng=rng)
    short = {value: n for value, n in quotas.items() if n < count // len(groups)}
    if short:
        log.info("balance_by %s: %s had fewer tasks than an equal share of %d; the other values filled the draw",
                 balance_by, ", ".join(f"{v} ({n})" for v, n in sorted(short.items())), count)
    return [task for value in sorted(groups) for task in rng.sample(groups[value], quotas[value])]


def balanced_quotas(counts: dict[str, int], *, count: int, rng: random.Random) -> dict[str, int]:
    """How many tasks of each value to draw: equal shares of ``count``; a value with fewer tasks than its share gives
    all it has and the others share the rest equally (water-filling); the remainder of an uneven division goes one
    each to values picked by ``rng``."""
    quotas: dict[str, int] = {}
    left = min(count, sum(counts.values()))
    open_values = sorted(counts, key=lambda v: (counts[v], v))
    while open_values and counts[open_values[0]] <= left // len(open_values):
        value = open_values.pop(0)
        quotas[value] = counts[value]
        left -= counts[value]
    if open_values:
        share, extra = divmod(left, len(open_values))
        lucky = set(rng.sample(sorted(open_values), extra))
        quotas.update({value: share + (value in lucky) for value in open_values})
    return quotas


def dataset_identity(config: ArclightConfig) -> dict[str, Any]:
    """What a validation evaluation runs on, so that it is never taken for one on the held-out file: the training
    file, its sha256, and the split's size, seed and balance."""
    r = config.rollouts
    path = Path(r.dataset) if r.dataset is not None else None
    if path is None or not path.is_file():
        raise DatasetError(f"training dataset {path} not found: rollouts.validation_tasks draws from rollouts.dataset")
    return {"dataset": f"validation:{path}", "dataset_sha256": file_sha256(path),
            "validation_tasks": r.validation_tasks, "seed": r.seed, "balance_by": r.balance_by}
