"""Durable writes: fsync files and folders, and publish a folder atomically by rename."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Callable


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(folder: Path) -> None:
    """Flush a folder's entries (new or renamed names) to disk."""
    _fsync(folder)


def fsync_file(path: Path) -> None:
    """Flush a file's contents to disk."""
    _fsync(path)


def fsync_tree(folder: Path) -> None:
    """Flush every file and folder under ``folder`` to disk."""
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            fsync_file(path)
    for path in [folder, *[p for p in folder.rglob("*") if p.is_dir()]]:
        fsync_dir(path)


def save_atomically(write: Callable[[Path], None], *, root: Path, name: str, replace: bool = False) -> Path:
    """Call ``write(tmp_dir)``, fsync what it wrote, and rename it to ``root/name``; return that path.

    A crash at any point leaves either no ``root/name`` or a complete one. An existing ``root/name`` is
    refused (a checkpoint is immutable once written) unless ``replace``: then it is moved aside, the new
    folder takes its place, and the old one is deleted (a model folder made again from its source).
    """
    root.mkdir(parents=True, exist_ok=True)
    final = root / name
    if final.exists() and not replace:
        raise FileExistsError(f"{final} already exists; it is immutable once written")
    tmp = root / f".{name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        write(tmp)
        fsync_tree(tmp)
        if final.exists():
            old = root / f".{name}.old-{os.getpid()}"
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    fsync_dir(root)
    return final
