"""Durable writes: fsync files and folders, and publish a folder atomically by rename."""

from __future__ import annotations

import errno
import os
import secrets
import shutil
import threading
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


def _unique() -> str:
    """A suffix no other call, in this process or another, uses at the same time: two saves of one name at once (two
    fetches of one version) each write and move aside their own folders, and never delete the other's."""
    return f"{os.getpid()}-{threading.get_ident()}-{secrets.token_hex(4)}"


def _move_into_place(tmp: Path, final: Path, *, replace: bool) -> None:
    """Rename ``tmp`` to ``final``; with ``replace``, a ``final`` in the way is moved aside, and deleted once ``tmp`` is in
    place. Another save of the same name may be doing the same at the same moment: each moves aside what is in its way
    and tries again, so each ends with a complete folder in place (the last one's)."""
    aside: list[Path] = []
    try:
        for _ in range(100):
            try:
                os.rename(tmp, final)  # fails, and never merges, when a folder with files is in the way
                return
            except OSError as exc:
                if not replace or exc.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                    raise
            old = final.with_name(f".{final.name}.old-{_unique()}")
            try:
                os.rename(final, old)
                aside.append(old)
            except FileNotFoundError:  # another save moved it aside first
                pass
        raise OSError(f"could not move {tmp} to {final}: other saves kept putting theirs there")
    finally:
        for old in aside:
            shutil.rmtree(old, ignore_errors=True)


def save_atomically(write: Callable[[Path], None], *, root: Path, name: str, replace: bool = False) -> Path:
    """Call ``write(tmp_dir)``, fsync what it wrote, and rename it to ``root/name``; return that path.

    A crash at any point leaves either no ``root/name`` or a complete one. An existing ``root/name`` is
    refused (a checkpoint is immutable once written) unless ``replace``: then it is moved aside, the new
    folder takes its place, and the old one is deleted (a model folder made again from its source). Each call writes
    to a temporary folder of its own (``_unique``), so two saves of one name at once both complete: the last rename wins.
    """
    root.mkdir(parents=True, exist_ok=True)
    final = root / name
    if final.exists() and not replace:
        raise FileExistsError(f"{final} already exists; it is immutable once written")
    tmp = root / f".{name}.tmp-{_unique()}"
    try:
        write(tmp)
        fsync_tree(tmp)
        _move_into_place(tmp, final, replace=replace)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    fsync_dir(root)
    return final
