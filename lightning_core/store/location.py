"""Where a lake's span tables live (its own folder, or object storage shared by several hosts), and the filesystem
DuckDB connections read the files on object storage through: nothing of them is copied to local disk."""

from __future__ import annotations

import io
import json
import logging
import os
import shutil
import threading
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote

from deltalake import DeltaTable


from lightning_core.common.redact import is_secret
from lightning_core.store.delta import LakeFormatError, owner

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


_mirror_removed: set[str] = set()  # lake folders whose old read copies this process has removed


def remove_mirror(root: str | os.PathLike[str]) -> list[Path]:
    """Delete ``<lake>/_mirror``: the local copies of span files on object storage that an Arclight before
    2026-11-29 made for DuckDB (it now reads the store itself, ``attach_store``); return the files removed.
    ``snapshot`` calls this once per lake and process."""
    mirror = Path(root).resolve() / "_mirror"
    if not mirror.is_dir():
        return []
    removed = sorted(p for p in mirror.rglob("*") if p.is_file())
    shutil.rmtree(mirror, ignore_errors=True)
    if removed:
        log.info("removed %d local copies of span files from %s: DuckDB reads them from %s now",
                 len(removed), mirror, location(root).uri)
    return removed


def remove_mirror_once(root: str | os.PathLike[str]) -> None:
    if str(root) not in _mirror_removed:
        _mirror_removed.add(str(root))
        remove_mirror(root)


def readable_files(root, lane: str, table: DeltaTable, where: Location) -> list[str]:
    """The table version's data files as DuckDB names them: local paths, or the objects' ``s3://`` URIs, which a
    connection reads through the store's filesystem (``attach_store``): nothing of them is written locally."""
    if not where.uri:
        return table.file_uris()
    return [unquote(uri) for uri in table.file_uris()]  # the object's key, as the mirror named its copy


_filesystems: dict[str, object] = {}  # storage options (as JSON) -> the fsspec filesystem DuckDB reads S3 through
_filesystems_lock = threading.Lock()


def store_filesystem(where: Location):
    """An fsspec filesystem over pyarrow's S3 client for the location (its storage options and the ``AWS_*``
    environment), made once per process and options. DuckDB 2.0.0 has no ``httpfs`` here, but reads any fsspec
    filesystem registered on a connection (``attach_store``), with the same ``read_parquet`` as local files:
    projection, row groups and hive partitions are read as they are needed, with ranged GETs."""
    from fsspec.implementations.arrow import ArrowFSWrapper

    class StoreFilesystem(ArrowFSWrapper):
        def _open(self, path, mode="rb", block_size=None, seekable=True, **kwargs):
            if mode != "rb":
                raise PermissionError(f"{path}: the span store is read here, never written through DuckDB")
            return PositionalFile(self.fs.open_input_file(path), path)

    key = json.dumps(where.options or {}, sort_keys=True)
    with _filesystems_lock:
        if key not in _filesystems:
            _filesystems[key] = StoreFilesystem(arrow_filesystem(where)[0], skip_instance_cache=True)
        return _filesystems[key]


class PositionalFile(io.RawIOBase):
    """A file on the store that DuckDB's threads may share: each thread has its own position, and a read is one
    positional read (pyarrow's ``read_at``, a ranged GET). DuckDB's Python filesystem reads at an offset as
    ``seek`` then ``read`` on one handle, and pyarrow lets go of the GIL while it reads, so with one shared position
    a second thread's seek moved the first one's read: on the 1M-span pipeline the Parquet reader got bytes of
    another offset ("don't know what type", a page header read from the middle of a page)."""

    def __init__(self, native, path: str):
        super().__init__()
        self._native, self.path = native, path
        self.size = native.size()
        self._positions = threading.local()

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return getattr(self._positions, "at", 0)

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self.tell(), io.SEEK_END: self.size}[whence]
        self._positions.at = max(0, base + offset)
        return self._positions.at

    def read(self, size: int = -1) -> bytes:
        at = self.tell()
        size = self.size - at if size is None or size < 0 else min(size, self.size - at)
        data = self._native.read_at(size, at) if size > 0 else b""
        if len(data) != size:
            raise OSError(f"{self.path}: {size} bytes asked at {at}, the store gave {len(data)}")
        self._positions.at = at + size
        return data

    def readinto(self, buffer) -> int:
        data = self.read(len(buffer))
        buffer[:len(data)] = data
        return len(data)

    def close(self) -> None:
        if not self.closed:
            self._native.close()
        super().close()


def attach_store(con, root: str | os.PathLike[str]) -> None:
    """Let ``con`` read the span files of the lake at ``root`` where they live: for a lake on object storage, register
    the store's filesystem (``store_filesystem``) for ``s3://``; nothing for a lake in its folder."""
    where = location(root)
    if not where.uri:
        return
    if not where.uri.startswith("s3://"):
        raise LakeFormatError(f"lake.spans_uri {where.uri}: span tables are kept in the lake folder or on S3 "
                              "(s3://bucket/prefix)")
    if "s3" in con.list_filesystems():
        con.unregister_filesystem("s3")  # another lake's, or this one's with other options
    con.register_filesystem(store_filesystem(where))


def arrow_filesystem(where: Location):
    """A pyarrow S3 filesystem for the location, from its storage options and the AWS_* environment."""
    from lightning_core.common.published import s3_filesystem

    return s3_filesystem(where.options)
