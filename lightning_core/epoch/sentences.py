"""What an evaluation, an epoch's rollouts and its sampling came to, as one line a person reads.

The run prints these on the screen and in a pipe (``held-out calc-v8 after 8 epochs: 79/100 tasks succeeded (79%),
reward 0.790 on test.jsonl``); the machine-readable form, the result's dict as JSON, goes to the log file and to
``arclight evaluate --format json``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

# the order a person reads a round's outcome in; a status not listed here follows, by name
STATUS_ORDER = ("succeeded", "failed", "timed_out", "running", "planned")


def rollout_counts(counts: dict[str, int]) -> str:
    """``{'succeeded': 62, 'failed': 2}`` -> ``62 succeeded, 2 failed``; no rollout -> ``no rollouts``."""
    ordered = sorted(counts, key=lambda s: (STATUS_ORDER.index(s) if s in STATUS_ORDER else len(STATUS_ORDER), s))
    parts = [f"{counts[s]} {s.replace('_', ' ')}" for s in ordered if counts[s]]
    return ", ".join(parts) or "no rollouts"


def evaluation(result: dict[str, Any], *, kind: str = "held-out") -> str:
    """One evaluation (``reports.record_eval``'s result) as ``held-out calc-v8 after 8 epochs: 79/100 tasks succeeded
    (79%), reward 0.790 on test.jsonl``, with the rollouts that failed to run and those our services failed (left
    out, not scored) when there are any."""
    tasks = result["tasks"] or 0
    where = f" on {Path(result['dataset']).name}" if result.get("dataset") else ""
    epochs = result["after_epochs"]
    head = f"{kind} {result['label']} after {epochs} epoch{'' if epochs == 1 else 's'}"
    if tasks:
        rate = result["success_rate"] or 0.0
        line = (f"{head}: {round(rate * tasks)}/{tasks} tasks succeeded ({rate:.0%}), "
                f"reward {result['reward_mean'] or 0.0:.3f}{where}")
    else:
        line = f"{head}: no task scored{where}"
    notes = []
    if result.get("failed"):
        notes.append(f"{result['failed']} of the rollouts failed (scored 0)")
    if result.get("left_out"):
        notes.append(f"{result['left_out']} left out: our services failed them")
    return line + (f"; {'; '.join(notes)}" if notes else "")


def sampling(counts: dict[str, int]) -> str:
    """An epoch's sampling (``bookkeeping.record_sampling``) as ``16 tasks drawn in 2 rounds: 12 groups informative,
    4 skipped``."""
    rounds = counts["sampling_rounds"]
    return (f"{counts['tasks_sampled']} tasks drawn in {rounds} round{'' if rounds == 1 else 's'}: "
            f"{counts['informative_groups']} groups informative, {counts['skipped_groups']} skipped")
