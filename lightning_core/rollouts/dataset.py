"""Task datasets: JSONL files of one JSON object per line, read and checked, each task with an id.

A task id is any JSON string or number (``gsm8k/train/17``, ``q 17``, a URL, 42): it is kept as it is in the lake
and the state tables, and rollout ids are derived from it (``names.rollout_id_part``). Only ids that cannot travel
are refused when the file loads, with the line and the rule (``TASK_ID_RULE``).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any


class DatasetError(ValueError):
    """A dataset file that cannot be read; the message names the file and line."""


MAX_TASK_ID_CHARS = 1024  # an id rides in every span's resource and the gateway's registration
TASK_ID_RULE = (f"a task id must be a JSON string of 1 to {MAX_TASK_ID_CHARS} characters without NUL (it is passed to "
                "program agents in an environment variable) and without lone UTF-16 surrogates (it must encode as "
                "UTF-8), or a JSON number")


def task_id_of(task: dict[str, Any], *, number: int) -> str:
    """The id of the task on line ``number``: its ``id`` as text (``task-<line>`` when it has none); a
    ``ValueError`` naming ``TASK_ID_RULE`` when it breaks the rule."""
    if "id" not in task:
        return f"task-{number}"
    value = task["id"]
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise ValueError(f"its id {json.dumps(value)[:80]} is a JSON {_json_type(value)}: {TASK_ID_RULE}")
    text = value if isinstance(value, str) else json.dumps(value)
    if not 1 <= len(text) <= MAX_TASK_ID_CHARS:
        raise ValueError(f"its id has {len(text)} characters: {TASK_ID_RULE}")
    if "\0" in text:
        raise ValueError(f"its id {text[:80]!r} holds a NUL character: {TASK_ID_RULE}")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError(f"its id {text[:80]!r} holds a lone surrogate: {TASK_ID_RULE}") from None
    return text


def file_sha256(path: str | Path) -> str:
    """The sha256 of a task file's bytes: with its path, what tells two evaluations' datasets apart."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _json_type(value: Any) -> str:
    return {type(None): "null", bool: "boolean", dict: "object", list: "array"}.get(type(value), type(value).__name__)


def load_tasks(path: str | Path, *, required_field: str | None = None, required_by: str = "") -> list[dict[str, Any]]:
    """Read a JSONL dataset: one JSON object per line; ``id`` defaults to ``task-<line>``. With ``required_field``,
    a task without that field is an error naming its line and the setting that needs it (``required_by``)."""
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
        try:
            task_id = task_id_of(task, number=number)
        except ValueError as exc:
            raise DatasetError(f"{path}:{number}: {exc}") from None
        if task_id in seen:
            raise DatasetError(f"{path}:{number}: duplicate task id {task_id!r}")
        if required_field is not None and required_field not in task:
            raise DatasetError(f"{path}:{number}: task {task_id!r} has no {required_field!r} field, which "
                               f"{required_by or 'the caller'} needs on every task (add it, or unset {required_by})")
        seen.add(task_id)
        tasks.append({**task, "id": task_id})
    if not tasks:
        raise DatasetError(f"dataset {path} has no tasks")
    return tasks
