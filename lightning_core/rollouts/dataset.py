"""Task datasets: JSONL files of one JSON object per line, read and checked, each task with an id."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


class DatasetError(ValueError):
    """A dataset file that cannot be read; the message names the file and line."""


def load_tasks(path: str | Path) -> list[dict[str, Any]]:
    """Read a JSONL dataset: one JSON object per line; ``id`` defaults to ``task-<line>``."""
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"dataset {path} not found: set rollouts.dataset to a JSONL file")
    tasks, seen = [], set()
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            task = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DatasetError(f"{path}:{number}: not valid JSON ({exc.msg})") from None
        if not isinstance(task, dict):
            raise DatasetError(f"{path}:{number}: expected a JSON object, found {type(task).__name__}")
        task_id = str(task.get("id", f"task-{number}"))
        if task_id in seen:
            raise DatasetError(f"{path}:{number}: duplicate task id {task_id!r}")
        seen.add(task_id)
        tasks.append({**task, "id": task_id})
    if not tasks:
        raise DatasetError(f"dataset {path} has no tasks")
    return tasks
