"""Names and numbers that users choose and that become lake folders: checked here, in one place.

Run ids, policy names, epochs and rollout ids arrive from config files, the command line, the
gateway's admin API and OTLP resource attributes, and end up in folder names
(``run_id=<run>/epoch=<n>/policy=<p>``) or URL paths. Each is checked with a full match: a
pattern ending in ``$`` would let a trailing newline through, and one bad folder name breaks
every query on the lake. ``inside`` is the last guard before a write or a delete: it refuses a
folder that is not below the one it belongs to.
"""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path
from typing import Any

NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
ROLLOUT_ID_PATTERN = re.compile(r"[A-Za-z0-9._:-]{1,256}")
INT64_MAX = 2**63 - 1
_DECIMAL = re.compile(r"0|[1-9][0-9]{0,18}")


class InvalidName(ValueError):
    """A name or number that cannot name a lake folder; the message says what is allowed."""


def check_name(value: Any, *, what: str) -> str:
    """Return ``value`` if it is 1-128 letters, digits, '.', '_' or '-' starting with a letter or digit."""
    if isinstance(value, str) and NAME_PATTERN.fullmatch(value):
        return value
    raise InvalidName(f"{what} {value!r} is not valid: expected 1-128 letters, digits, '.', '_' or '-', "
                      "starting with a letter or digit (it names a lake folder)")


def check_run_id(value: Any, *, what: str = "run id") -> str:
    """Return a valid run id (see ``check_name``)."""
    return check_name(value, what=what)


def check_policy_name(value: Any, *, what: str = "policy name") -> str:
    """Return a valid policy name (see ``check_name``)."""
    return check_name(value, what=what)


def check_count(value: Any, *, what: str) -> int:
    """Return ``value`` as a whole number 0 <= n < 2^63: an int, or a string of decimal digits."""
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= INT64_MAX:
        return value
    if isinstance(value, str) and _DECIMAL.fullmatch(value) and int(value) <= INT64_MAX:
        return int(value)
    raise InvalidName(f"{what} {value!r} is not valid: expected a whole number from 0 to 2^63-1 "
                      f"(found {type(value).__name__})")


def check_epoch(value: Any, *, what: str = "epoch") -> int:
    """Return a valid epoch number (see ``check_count``)."""
    return check_count(value, what=what)


def check_rollout_id(value: Any, *, what: str = "rollout id") -> str:
    """Return ``value`` if it is 1-256 letters, digits, '.', '_', ':' or '-' (it is a URL path segment)."""
    if isinstance(value, str) and ROLLOUT_ID_PATTERN.fullmatch(value):
        return value
    raise InvalidName(f"{what} {value!r} is not valid: expected 1-256 letters, digits, '.', '_', ':' or '-'")


TASK_ID_IN_ROLLOUT_ID = re.compile(r"[A-Za-z0-9._:-]{1,64}")
_NOT_IN_ROLLOUT_ID = re.compile(r"[^A-Za-z0-9._:-]+")


def rollout_id_part(task_id: str) -> str:
    """The part of a rollout id that names its task: the task id itself when it is 1-64 of the characters a rollout
    id may hold, else its safe characters (at most 40) and 10 hex digits of its hash, so that any id a dataset holds
    (``gsm8k/train/17``, ``q 17``, a URL, a long hash) makes a valid, stable and distinct rollout id."""
    if TASK_ID_IN_ROLLOUT_ID.fullmatch(task_id):
        return task_id
    slug = _NOT_IN_ROLLOUT_ID.sub("_", task_id).strip("_")[:40] or "task"
    return f"{slug}-{hashlib.blake2b(task_id.encode('utf-8'), digest_size=5).hexdigest()}"


def inside(root: str | os.PathLike[str], path: str | os.PathLike[str], *, what: str = "folder") -> Path:
    """Return ``path`` if it lies below ``root`` (compared without following links); raise otherwise."""
    base = os.path.normpath(os.path.abspath(root))
    target = os.path.normpath(os.path.abspath(path))
    if os.path.commonpath([base, target]) != base or target == base:
        raise InvalidName(f"{what} {path} is not inside {root}: refusing to write or delete there")
    return Path(path)
