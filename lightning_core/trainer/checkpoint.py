"""The ``latest`` link of a policy's checkpoints: a symlink swapped atomically, always at a complete version.

Each version folder is written with ``common.durable.save_atomically`` (a hidden temp folder, fsync,
rename), so a crash at any point leaves either no new version folder or a complete one, and
``latest`` pointing at a complete version (it is replaced with ``os.replace``, never edited in place).
"""

from __future__ import annotations

import os
from pathlib import Path

from lightning_core.common.durable import fsync_dir as _fsync_dir

LATEST = "latest"


def set_latest(root: Path, name: str) -> Path:
    """Point ``root/latest`` at ``root/name`` atomically (a relative symlink swapped with os.replace)."""
    if not (root / name).is_dir():
        raise FileNotFoundError(f"cannot point {root / LATEST} at {root / name}: no such checkpoint")
    tmp = root / f".{LATEST}.tmp-{os.getpid()}"
    if tmp.is_symlink() or tmp.exists():
        tmp.unlink()
    os.symlink(name, tmp)
    os.replace(tmp, root / LATEST)
    _fsync_dir(root)
    return root / LATEST


def latest(root: Path) -> Path | None:
    """Return the resolved folder 'latest' points at, or None when there is none."""
    link = root / LATEST
    return link.resolve() if link.is_symlink() and link.resolve().is_dir() else None
