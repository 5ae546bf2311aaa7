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

import logging
import os
import shutil
from pathlib import Path
from typing import Callable, Mapping

from lightning_core.common import published
from lightning_core.common.durable import save_atomically
from lightning_core.config import ArclightConfig

log = logging.getLogger("arclight.host_weights")

STATE, MERGED = SIBLINGS = (".state", ".merged")  # <version>.state: its optimizer state, published apart; merged weights


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


def parents_root(config: ArclightConfig, policy: str) -> Path:
    """Where a host that trains keeps the parents (and KL references) it fetched."""
    return Path(config.project_dir) / ".arclight" / "trainer" / "parents" / policy


def holds_published(config: ArclightConfig, folder: str | Path | None, *, policy: str, version: str,
                    leave_out: tuple[str, ...] = ()) -> bool:
    """Whether ``folder`` is on this disk and holds ``version`` as published under ``serving.weights_uri`` (a folder of
    that name that is not, an interrupted run's, is logged and not used)."""
    if not folder or not Path(folder).is_dir():
        return False
    if is_published_copy(Path(folder), published.join(config.serving.weights_uri, policy, version),
                         options=config.serving.weights_storage_options, leave_out=leave_out):
        return True
    log.warning("%s here is not the published %s (an interrupted run's, trained again since): fetching it", folder,
                version)
    return False


def fetch_version(config: ArclightConfig, *, policy: str, version: str,
                  with_state: bool = False) -> tuple[Path, Path | None]:
    """Fetch ``version`` from ``serving.weights_uri`` into ``parents_root``, and its optimizer state
    (``<version>.state``) when ``with_state`` and it was published; return both folders. Raises
    ``published.PublishError`` when the store does not give it."""
    uri, options = config.serving.weights_uri, config.serving.weights_storage_options
    root = parents_root(config, policy)
    fetched = published.fetch(published.join(uri, policy, version), root, options=options)
    state = None
    if with_state and published.published_manifest(published.join(uri, policy, f"{version}{STATE}"),
                                                   options=options) is not None:
        state = published.fetch(published.join(uri, policy, f"{version}{STATE}"), root, options=options)
    return fetched, state


def publish_state(config: ArclightConfig, path: Path, *, policy: str, state_file: str) -> None:
    """Publish the optimizer state (``state_file``) of the version saved at ``path`` as ``<version>.state``, for a host
    that trains its child without having trained it (the version itself is published without it: vLLM's hosts never
    read it)."""
    state = path / state_file
    name = f"{path.name}{STATE}"
    if not state.is_file():
        shutil.rmtree(path.with_name(name), ignore_errors=True)  # an interrupted run's, of other moments
        return

    def link(tmp: Path) -> None:  # made anew each time: a version trained again replaced the file it linked to
        tmp.mkdir()
        try:
            os.link(state, tmp / state_file)
        except OSError:
            shutil.copy2(state, tmp / state_file)

    folder = save_atomically(link, root=path.parent, name=name, replace=True)
    published.publish(folder, published.join(config.serving.weights_uri, policy, folder.name),
                      options=config.serving.weights_storage_options)


def settle_version(config: ArclightConfig, path: Path | None, *, policy: str, version: str,
                   parent_version: str | None, state_file: str,
                   merge: Callable[[Path, Path], Path] | None = None) -> None:
    """What a host that trains does with the version it saved at ``path`` (None: it saved none): publish its optimizer
    state; with ``merge`` (merged serving: ``merge(adapter, out)`` writes the merged weights to ``out``), merge it into
    ``<version>.merged`` and publish that; and keep ``serving.keep_versions`` of its versions and of the parents it
    fetched (every one stays in the store, and a pruned one is fetched again if it is ever asked for)."""
    if path is not None:
        publish_state(config, path, policy=policy, state_file=state_file)
        if merge is not None:
            merged = merge(path, path.with_name(f"{path.name}{MERGED}"))
            published.publish(merged, published.join(config.serving.weights_uri, policy, merged.name),
                              options=config.serving.weights_storage_options)
    keep = config.serving.keep_versions
    pruned = prune_versions(parents_root(config, policy), keep=keep, current=parent_version)
    if path is not None:
        pruned += prune_versions(path.parent, keep=keep, current=version)
    if pruned:
        log.info("pruned %d folders of older versions on this host (serving.keep_versions = %d): %s",
                 len(pruned), keep, ", ".join(p.name for p in pruned))
