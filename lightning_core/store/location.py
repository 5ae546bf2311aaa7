"""Where a lake's span tables live (its own folder, or object storage shared by several hosts), and the local copies
DuckDB reads of the files on object storage (the mirror), pruned once the store has vacuumed them."""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote

from deltalake import DeltaTable


from lightning_core.common.redact import is_secret
from lightning_core.store.delta import LakeFormatError, owner
from lightning_core.store.span_schema import LANES

log = logging.getLogger("arclight.lake")


LOCATION_FILE = "spans.location.json"
# lake folder -> the storage options this process was given for it, keys included: the folder's file keeps no key
_given: dict[str, dict[str, str]] = {}


@dataclass(frozen=True)
class Location:
    """Where a lake's span tables live: its own folder (``uri`` None) or object storage."""

    uri: str | None = None
    options: dict[str, str] | None = None  # delta-rs storage options (keys: this process's own, else AWS_* from the environment)

    def table_uri(self, root: str | os.PathLike[str], lane: str) -> str:
        return f"{self.uri.rstrip('/')}/{lane}" if self.uri else str(Path(root).resolve() / "spans" / lane)


def location(root: str | os.PathLike[str]) -> Location:
    """The span tables' location recorded in the lake folder (``set_location``), else the folder itself; its storage
    options with the keys this process was given for the lake (``set_location``), which the folder never holds."""
    record = _recorded(root)
    if record is None:
        return Location()
    return Location(record["uri"], {**(record.get("storage_options") or {}), **_given.get(os.path.abspath(root), {})})


def _recorded(root: str | os.PathLike[str]) -> dict | None:
    try:
        return json.loads((Path(root) / LOCATION_FILE).read_text())
    except FileNotFoundError:
        return None


def set_location(root: str | os.PathLike[str], uri: str | None, options: dict[str, str] | None = None) -> None:
    """Record that this lake's span tables live at ``uri`` (``lake.spans_uri``), so that every reader of the
    folder finds them; refuse to move a lake whose tables already live elsewhere.

    The folder is readable by other users of the host, so the file keeps only the options that find the store
    (endpoint, region, ``conditional_put``), never a key, a secret or a token: this process keeps the ones it was
    given (``location`` adds them back), and any other reader takes its credentials from the ``AWS_*`` environment.
    """
    if uri is None:  # the folder's own record (if any) stands: readers given only the folder find the spans
        return
    record = _recorded(root)
    if record and record["uri"].rstrip("/") != uri.rstrip("/"):
        raise LakeFormatError(f"the lake at {root} keeps its spans at {record['uri']}, not {uri}: set lake.spans_uri "
                              "to the first, or use another lake folder")
    _given[os.path.abspath(root)] = dict(options or {})
    public = {key: value for key, value in (options or {}).items() if not is_secret(key)}
    if record and record["uri"] == uri and (record.get("storage_options") or {}) == public:
        return  # (a file an older Arclight wrote with keys in it differs, and is written again without them)
    Path(root).mkdir(parents=True, exist_ok=True)
    tmp = Path(root) / f".{LOCATION_FILE}.{owner()}.tmp"
    tmp.write_text(json.dumps({"uri": uri, "storage_options": public}, indent=1))
    os.replace(tmp, Path(root) / LOCATION_FILE)


_mirror_pruned: dict[str, float] = {}  # lake folder -> when this process last pruned its mirror
PRUNE_EVERY_S = 600.0


def prune_mirror_when_due(root: str | os.PathLike[str]) -> None:
    """``prune_mirror`` at most every ``PRUNE_EVERY_S`` per lake and process (one listing of the store per lane); a
    listing that failed is tried again next time."""
    if time.monotonic() - _mirror_pruned.get(str(root), -PRUNE_EVERY_S) <= PRUNE_EVERY_S:
        return
    _mirror_pruned[str(root)] = time.monotonic()
    try:
        prune_mirror(root)
    except OSError as exc:
        log.warning("could not prune the local copies of %s: %r", location(root).uri, exc)


def prune_mirror(root: str | os.PathLike[str]) -> list[Path]:
    """Delete the local copies (``_mirror``) of object-storage files that are gone from the store; return them.

    Delta's ``vacuum`` deletes a data file only ``retention_hours`` after it left the table, so a
    copy is kept exactly as long as its original: a query that listed an older snapshot still
    reads it. ``snapshot`` runs this at most every ``PRUNE_EVERY_S`` per process (one listing of
    the store per lane). Copies half-written by a process that died (``.*.tmp``) go after an hour.
    """
    where = location(root)
    if not where.uri:
        return []
    fs, _ = arrow_filesystem(where)
    import pyarrow.fs as pafs

    removed = []
    for lane in LANES:
        mirror = Path(root).resolve() / "_mirror" / lane
        if not mirror.is_dir():
            continue
        prefix = where.table_uri(root, lane).split("://", 1)[1].rstrip("/") + "/"
        stored = {unquote(info.path[len(prefix):]) for info in fs.get_file_info(pafs.FileSelector(prefix, recursive=True))
                  if info.type == pafs.FileType.File}  # as the copies are named (``readable_files``)
        for folder, _, names_ in os.walk(mirror):
            for name in names_:
                local = Path(folder) / name
                relative = local.relative_to(mirror).as_posix()
                if name.startswith(".") and name.endswith(".tmp"):
                    stale = time.time() - local.stat().st_mtime > 3600
                else:
                    stale = relative not in stored
                if stale:
                    local.unlink(missing_ok=True)
                    removed.append(local)
    if removed:
        log.info("removed %d local copies of files vacuumed from %s", len(removed), where.uri)
    return removed


def readable_files(root, lane: str, table: DeltaTable, where: Location) -> list[str]:
    """The table version's data files as paths DuckDB can read: local files, or local copies of remote ones.

    Delta data files never change once written, so a copy made once serves every later snapshot.
    """
    uris = table.file_uris()
    if not where.uri:
        return uris
    prefix = where.table_uri(root, lane).rstrip("/") + "/"
    mirror = Path(root).resolve() / "_mirror" / lane
    missing = [(u, mirror / unquote(u[len(prefix):])) for u in uris if not (mirror / unquote(u[len(prefix):])).exists()]
    if missing:
        fs, _ = arrow_filesystem(where)
        for uri, local in missing:
            local.parent.mkdir(parents=True, exist_ok=True)
            tmp = local.with_name(f".{local.name}.{owner()}.tmp")
            with fs.open_input_stream(uri.split("://", 1)[1]) as src, open(tmp, "wb") as dst:
                while chunk := src.read(8 << 20):
                    dst.write(chunk)
            os.replace(tmp, local)
    return [str(mirror / unquote(u[len(prefix):])) for u in uris]


def arrow_filesystem(where: Location):
    """A pyarrow S3 filesystem for the location, from its storage options and the AWS_* environment."""
    from lightning_core.common.published import s3_filesystem

    return s3_filesystem(where.options)
