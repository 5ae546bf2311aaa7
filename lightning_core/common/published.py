"""Model folders published to object storage, and fetched from it on a host that does not share the trainer's disk.

    manifest = publish(Path("checkpoints/calc/calc-v3"), "s3://bucket/weights/calc/calc-v3")
    local = fetch("s3://bucket/weights/calc/calc-v3", Path("/var/cache/arclight/weights"))   # on the vLLM host

``publish`` uploads every file of the folder, then ``manifest.json`` last: each file's size and sha256. A version
without a manifest is not (yet) published, so a reader never takes a half-uploaded one. ``fetch`` downloads a
version into a folder of its own name under ``root``, checks every file against the manifest, and renames it into
place only when all of them match; a copy that is already there and matches is used as it is. Nothing is loaded
from a folder whose bytes differ from what was published.

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

MANIFEST = "manifest.json"
CHUNK = 8 << 20


class PublishError(RuntimeError):
    """A version that could not be published, fetched, or did not match its manifest; the message says which file."""


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
        return cls({p.relative_to(folder).as_posix(): {"bytes": p.stat().st_size, "sha256": sha256_of(p)}
                    for p in sorted(folder.rglob("*")) if p.is_file() and p.name not in leave_out})


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
    root = Path(root)
    name = uri.rstrip("/").rsplit("/", 1)[-1]
    here = root / name
    if _holds(here, manifest):
        os.utime(here)  # fetched again: the newest for prune
        return here
    fs, base = _filesystem(uri, options)

    def download(tmp: Path) -> None:
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
        (tmp / MANIFEST).write_text(manifest.to_json())

    root.mkdir(parents=True, exist_ok=True)
    return save_atomically(download, root=root, name=name, replace=True)


def _holds(folder: Path, manifest: Manifest) -> bool:
    """Whether ``folder`` holds exactly the published files, byte for byte (a copy fetched before)."""
    if not (folder / MANIFEST).is_file():
        return False
    here = Manifest.of_folder(folder).files
    here.pop(MANIFEST)
    return here == manifest.files


def prune(root: Path, *, keep: int, fetched: Path | None = None) -> list[Path]:
    """Delete the fetched versions under ``root`` but the ``keep`` most recently fetched (``fetched`` among them);
    return those deleted. A deleted one is fetched again if it is ever asked for."""
    folders = sorted((p for p in Path(root).glob("*") if p.is_dir() and not p.name.startswith(".")),
                     key=lambda p: (p == fetched, p.stat().st_mtime), reverse=True)
    removed = folders[max(keep, 1):]
    for path in removed:
        shutil.rmtree(path, ignore_errors=True)
    return removed
