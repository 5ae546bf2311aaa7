"""Model folders published to object storage, and fetched from it on a host that does not share the trainer's disk.

    manifest = publish(Path("checkpoints/calc/calc-v3"), "s3://bucket/weights/calc/calc-v3")
    local = fetch("s3://bucket/weights/calc/calc-v3", Path("/var/cache/arclight/weights"))   # on the vLLM host

``publish`` uploads every file of the folder, then ``manifest.json`` last: each file's size and sha256. A version
without a manifest is not (yet) published, so a reader never takes a half-uploaded one. ``fetch`` downloads a
version into a folder of its own name under ``root``, checks every file against the manifest, and renames it into
place only when all of them match. Nothing is loaded from a folder whose bytes differ from what was published.

A manifest names files by relative paths inside the version: one with an absolute path, ``..``, ``.``, an empty part
or a backslash is refused before anything is written (whoever can write a manifest can write its hashes too).

A copy fetched before is used as it is, without reading its bytes again (every deploy and restore fetches, and
merged weights are gigabytes): its ``manifest.json`` records, beside the published ``files``, each file's size and
modification time (ns) when the fetch checked it, and the copy is taken when its manifest lists the published files
and every file is there with the size and time recorded. A file replaced, rewritten or removed since changes them,
and the version is fetched again; the bytes are checked once, when they arrive.

The store is S3 (``s3://bucket/prefix``: an S3-compatible server, credentials and endpoint from the storage options
or the ``AWS_*`` environment, as the span store's) or a folder (``file:///path`` or a plain path: a shared mount).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

from lightning_core.common.durable import save_atomically
from lightning_core.names import InvalidName, check_name

MANIFEST = "manifest.json"
CHUNK = 8 << 20


class PublishError(RuntimeError):
    """A version that could not be published, fetched, or did not match its manifest; the message says which file."""


class InvalidManifest(PublishError):
    """A manifest that names a file outside its version (or an entry that is not a size and a sha256): nothing of
    that version is fetched."""


@dataclass(frozen=True)
class Manifest:
    """What was published: every file's size and sha256 (relative paths, ``/``-separated)."""

    files: dict[str, dict[str, int | str]]

    @property
    def bytes(self) -> int:
        return sum(int(f["bytes"]) for f in self.files.values())

    def to_json(self) -> str:
        return json.dumps({"files": self.files}, indent=1, sort_keys=True)

    @classmethod
    def of_folder(cls, folder: Path, *, leave_out: tuple[str, ...] = ()) -> "Manifest":
        """Every file of ``folder`` but those named in ``leave_out`` and a ``manifest.json`` at its top (a fetched copy's:
        the store keeps its own manifest under that name)."""
        return cls({p.relative_to(folder).as_posix(): {"bytes": p.stat().st_size, "sha256": sha256_of(p)}
                    for p in sorted(folder.rglob("*"))
                    if p.is_file() and p.name not in leave_out and p.relative_to(folder).as_posix() != MANIFEST})

    def check(self, uri: str) -> None:
        """Raise unless every file is a relative path inside the version with a size and a sha256 (``fetch`` writes
        ``<folder>/<key>`` for each key: an absolute key or a ``..`` would write outside it)."""
        for key, entry in self.files.items():
            parts = key.split("/") if isinstance(key, str) else [""]
            if any(part in ("", ".", "..") for part in parts) or "\\" in key or "\0" in key or key == MANIFEST:
                raise InvalidManifest(f"the manifest of {uri} names {key!r}: every file must be a relative path inside the "
                                   "version ('/'-separated, without '..', '.', empty parts, backslashes or a leading '/', "
                                   f"and not {MANIFEST}); Arclight's publish never writes such a manifest, so publish the "
                                   "version again and check who else writes to serving.weights_uri")
            if not (isinstance(entry, dict) and isinstance(entry.get("bytes"), int) and entry["bytes"] >= 0
                    and isinstance(entry.get("sha256"), str) and len(entry["sha256"]) == 64):
                raise InvalidManifest(f"the manifest of {uri} gives {key!r} as {entry!r}: expected "
                                   '{"bytes": <size>, "sha256": <64 hex digits>}; publish the version again')


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def s3_filesystem(options: Mapping[str, str] | None = None):
    """A pyarrow S3 filesystem from delta-rs style storage options (``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``, ...)
    over the ``AWS_*`` environment; return it and the endpoint (None: AWS itself)."""
    import pyarrow.fs as pafs

    merged = {k.lower(): v for k, v in os.environ.items() if k.startswith("AWS_")}
    merged.update({k.lower(): v for k, v in (options or {}).items()})
    endpoint = merged.get("aws_endpoint_url") or merged.get("endpoint_url") or merged.get("aws_endpoint")
    kwargs = {"region": merged.get("aws_region") or merged.get("region") or "us-east-1"}
    if merged.get("aws_access_key_id"):
        kwargs.update(access_key=merged["aws_access_key_id"], secret_key=merged.get("aws_secret_access_key"),
                      session_token=merged.get("aws_session_token"))
    if endpoint:
        scheme, _, host = endpoint.partition("://")
        kwargs.update(endpoint_override=host or scheme, scheme=scheme if host else "https")
    return pafs.S3FileSystem(**kwargs), endpoint


def _filesystem(uri: str, options: Mapping[str, str] | None):
    """The filesystem of ``uri`` and the path in it."""
    import pyarrow.fs as pafs

    if uri.startswith("s3://"):
        return s3_filesystem(options)[0], uri[len("s3://"):].rstrip("/")
    if "://" in uri and not uri.startswith("file://"):
        raise PublishError(f"{uri}: weights are published to s3://bucket/prefix or to a folder (file:///path)")
    return pafs.LocalFileSystem(), str(Path(uri.removeprefix("file://")).resolve())


def join(uri: str, *parts: str) -> str:
    return "/".join([uri.rstrip("/"), *parts])


def store_name(store: str) -> str:
    """``store`` (serving.weights_uri) as URIs under it begin: ``s3://bucket/prefix``, or ``file://`` and a folder's
    absolute path."""
    if store.startswith("s3://"):
        return store.rstrip("/")
    if "://" in store and not store.startswith("file://"):
        raise PublishError(f"{store}: weights are published to s3://bucket/prefix or to a folder (file:///path)")
    return "file://" + os.path.abspath(store.removeprefix("file://"))


def version_under(uri: str, store: str) -> tuple[str, str] | None:
    """The policy and version of ``uri`` when it is ``<store>/<policy>/<version>`` (a folder store's may also be named by
    its plain path); None when it is not under ``store``. Raises ``InvalidName`` when the two parts are not names
    (``..``, ``.``, an empty part, a deeper path): they become folders on the fetching host."""
    prefix = store_name(store) + "/"
    if not uri.startswith(prefix) and prefix.startswith("file://") and uri.startswith("/"):
        uri = "file://" + uri
    if not uri.startswith(prefix):
        return None
    rest = uri[len(prefix):]
    parts = (rest[:-1] if rest.endswith("/") else rest).split("/")
    if len(parts) != 2:
        raise InvalidName(f"{uri!r} is not <serving.weights_uri>/<policy>/<version>: {rest!r} has {len(parts)} parts")
    return check_name(parts[0], what="policy name"), check_name(parts[1], what="version")


def publish(folder: Path, uri: str, *, options: Mapping[str, str] | None = None,
            leave_out: tuple[str, ...] = ()) -> Manifest:
    """Upload ``folder`` to ``uri`` but the files named in ``leave_out``, its manifest last; return the manifest.
    Publishing the same folder again is a no-op when the manifest there matches (a redeploy after a restart)."""
    import pyarrow.fs as pafs

    folder = Path(folder)
    manifest = Manifest.of_folder(folder, leave_out=leave_out)
    if not manifest.files:
        raise PublishError(f"{folder} has no files to publish")
    fs, base = _filesystem(uri, options)
    try:
        if published_manifest(uri, options=options) == manifest:
            return manifest
        for name in manifest.files:
            if isinstance(fs, pafs.LocalFileSystem):  # S3 has no folders; a folder store needs them made
                fs.create_dir(f"{base}/{name}".rsplit("/", 1)[0], recursive=True)
            with open(folder / name, "rb") as src, fs.open_output_stream(f"{base}/{name}") as dst:
                while chunk := src.read(CHUNK):
                    dst.write(chunk)
        with fs.open_output_stream(f"{base}/{MANIFEST}") as dst:
            dst.write(manifest.to_json().encode())
    except OSError as exc:
        raise PublishError(f"could not publish {folder} to {uri}: {exc}") from None
    return manifest


def published_manifest(uri: str, *, options: Mapping[str, str] | None = None) -> Manifest | None:
    """The manifest published at ``uri``; None when there is none (never published, or still uploading)."""
    fs, base = _filesystem(uri, options)
    try:
        with fs.open_input_stream(f"{base}/{MANIFEST}") as src:
            return Manifest(json.loads(src.read())["files"])
    except FileNotFoundError:
        return None
    except OSError as exc:
        if "NoSuchKey" in str(exc) or "does not exist" in str(exc).lower():
            return None
        raise PublishError(f"could not read the manifest of {uri}: {exc}") from None


def fetch(uri: str, root: Path, *, options: Mapping[str, str] | None = None, timeout_s: float = 5.0) -> Path:
    """Download the version published at ``uri`` to ``root/<its last path part>`` and check it against its manifest;
    return that folder. Waits up to ``timeout_s`` for a manifest (a publish under way)."""
    deadline = time.monotonic() + timeout_s
    while (manifest := published_manifest(uri, options=options)) is None:
        if time.monotonic() > deadline:
            raise PublishError(f"nothing is published at {uri} (no {MANIFEST} after {timeout_s:.0f} s): the trainer "
                               "publishes each version there (serving.weights_uri); check the URI and its credentials")
        time.sleep(0.5)
    manifest.check(uri)
    root = Path(root)
    try:
        name = check_name(uri.rstrip("/").rsplit("/", 1)[-1], what=f"the version folder of {uri}")
    except InvalidName as exc:
        raise PublishError(str(exc)) from None
    here = root / name
    if _holds(here, manifest):
        os.utime(here)  # fetched again: the newest for prune
        return here
    fs, base = _filesystem(uri, options)

    def download(tmp: Path) -> None:
        tmp.mkdir(parents=True, exist_ok=True)
        for rel, expected in manifest.files.items():
            target = tmp / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            try:
                with fs.open_input_stream(f"{base}/{rel}") as src, open(target, "wb") as dst:
                    while chunk := src.read(CHUNK):
                        dst.write(chunk)
            except OSError as exc:
                raise PublishError(f"could not fetch {rel} of {uri}: {exc}") from None
            got = sha256_of(target)
            if got != expected["sha256"] or target.stat().st_size != int(expected["bytes"]):
                raise PublishError(f"{rel} of {uri} does not match its manifest: sha256 {got}, {target.stat().st_size} "
                                   f"bytes; published {expected['sha256']}, {expected['bytes']} bytes. Publish the "
                                   "version again (or remove the damaged copy from the store)")
        seen = {rel: [(stat := (tmp / rel).stat()).st_size, stat.st_mtime_ns] for rel in manifest.files}
        (tmp / MANIFEST).write_text(json.dumps({"files": manifest.files, "fetched": seen}, indent=1, sort_keys=True))

    root.mkdir(parents=True, exist_ok=True)
    return save_atomically(download, root=root, name=name, replace=True)


def _holds(folder: Path, manifest: Manifest) -> bool:
    """Whether ``folder`` is a copy of the published files that ``fetch`` checked, unchanged since: its manifest lists
    them, and each file has the size and modification time recorded when its bytes were checked (its bytes are not
    read again)."""
    try:
        local = json.loads((folder / MANIFEST).read_text())
        seen = local["fetched"]
        if local["files"] != manifest.files or set(seen) != set(manifest.files):
            return False
        present = {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()}
        if present != {*manifest.files, MANIFEST}:
            return False
        for rel, (size, mtime_ns) in seen.items():
            stat = (folder / rel).stat()
            if (stat.st_size, stat.st_mtime_ns) != (size, mtime_ns) or size != manifest.files[rel]["bytes"]:
                return False
    except (OSError, ValueError, KeyError, TypeError):  # none there, or a copy an older Arclight fetched: fetch it again
        return False
    return True


def prune(root: Path, *, keep: int, fetched: Path | None = None) -> list[Path]:
    """Delete the fetched versions under ``root`` but the ``keep`` most recently fetched (``fetched`` among them);
    return those deleted. A deleted one is fetched again if it is ever asked for."""
    folders = sorted((p for p in Path(root).glob("*") if p.is_dir() and not p.name.startswith(".")),
                     key=lambda p: (p == fetched, p.stat().st_mtime), reverse=True)
    removed = folders[max(keep, 1):]
    for path in removed:
        shutil.rmtree(path, ignore_errors=True)
    return removed
