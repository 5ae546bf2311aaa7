"""Atomic checkpoints: write to a hidden temp folder, fsync, rename; 'latest' is a swapped symlink.

A crash at any point leaves either no new version folder or a complete one, and ``latest``
pointing at a complete version (it is replaced with ``os.replace``, never edited in place).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Callable

LATEST = "latest"


def save_atomically(write: Callable[[Path], None], *, root: Path, name: str) -> Path:
    """Call ``write(tmp_dir)``, fsync what it wrote, and rename it to ``root/name``; return that path."""
    root.mkdir(parents=True, exist_ok=True)
    final = root / name
    if final.exists():
        raise FileExistsError(f"checkpoint {final} already exists; versions are immutable")
    tmp = root / f".{name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        write(tmp)
        _fsync_tree(tmp)
        os.rename(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _fsync_dir(root)
    return final


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


def _fsync_tree(folder: Path) -> None:
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
    for path in [folder, *[p for p in folder.rglob("*") if p.is_dir()]]:
        _fsync_dir(path)


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
