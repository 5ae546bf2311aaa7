"""What a host that trains keeps of the weights on its own disk, beside ``published.py``, which moves them.

A folder here named like a version is that version only when its files are the published ones: a run interrupted
after a train host saved and published a version, but before the flow recorded it, leaves a folder of that name, and
the version trained again on resume (on this host or another) is another one. ``is_published_copy`` says which.

Every version a host trains leaves ``<version>`` (with its optimizer state), ``<version>.state`` and, in merged
serving, ``<version>.merged`` (a full model); every parent it fetches, a copy and its state. ``prune_versions`` keeps
the newest ``serving.keep_versions`` of them on each host; the store keeps every version, so a pruned one is fetched
again if it is ever asked for. The control host prunes its merged folders with it too (``epoch/deploy.py``; a merged
folder is a full copy of the base weights, and before this every epoch of every run left one: 67 GB in a week of calc
runs); it keeps its adapters, which its catalog records.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Mapping

from lightning_core.common import published

STATE, MERGED = SIBLINGS = (".state", ".merged")  # <version>.state: its optimizer state, published apart; .merged: merged weights


def is_published_copy(folder: Path, uri: str, *, options: Mapping[str, str] | None = None,
                      leave_out: tuple[str, ...] = ()) -> bool:
    """Whether ``folder`` holds the files published at ``uri``, byte for byte (``leave_out``: files kept here and not
    published, the optimizer state). Sizes first; the sha256s only when every size matches."""
    manifest = published.published_manifest(uri, options=options)
    if manifest is None:
        return False
    folder = Path(folder)
    here = {p.relative_to(folder).as_posix(): p for p in folder.rglob("*")
            if p.is_file() and p.name not in leave_out and p.relative_to(folder).as_posix() != published.MANIFEST}
    if set(here) != set(manifest.files) or any(here[k].stat().st_size != int(v["bytes"]) for k, v in manifest.files.items()):
        return False
    return all(published.sha256_of(here[k]) == v["sha256"] for k, v in manifest.files.items())


def version_of(folder_name: str) -> str:
    """The version a folder belongs to: ``calc-v3`` for ``calc-v3``, ``calc-v3.state`` and ``calc-v3.merged``."""
    for suffix in SIBLINGS:
        if folder_name.endswith(suffix):
            return folder_name[:-len(suffix)]
    return folder_name


def prune_versions(root: Path, *, keep: int, current: str | None = None, only: str | None = None) -> list[Path]:
    """Delete the versions under ``root`` but the ``keep`` most recently made or fetched (``current`` among them), each
    with its ``.state`` and ``.merged`` folders; return the folders deleted. ``only`` (a sibling's suffix, ``.merged``):
    delete those folders alone, and leave the versions and their other siblings (the control host's adapters, which
    its catalog records). Links (``latest``) and the temporary folders of a save under way (``.<name>.tmp-...``) are
    left alone."""
    root = Path(root)
    if not root.is_dir():
        return []
    groups: dict[str, list[Path]] = {}
    for path in root.iterdir():
        if only is not None and not path.name.endswith(only):
            continue
        if path.is_dir() and not path.is_symlink() and not path.name.startswith("."):
            groups.setdefault(version_of(path.name), []).append(path)
    newest = sorted(groups, key=lambda v: (v == current, max(p.stat().st_mtime_ns for p in groups[v])), reverse=True)
    removed = [path for version in newest[max(keep, 1):] for path in sorted(groups[version])]
    for path in removed:
        shutil.rmtree(path, ignore_errors=True)
    return removed
