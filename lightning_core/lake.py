"""The Parquet lake: one row per span, hive-partitioned by run and epoch (or date in production).

Layout under the lake root::

    spans/training/run_id=<run>/epoch=<n>/part-<ns>-<uuid>.parquet
    spans/production/date=<YYYY-MM-DD>/part-<ns>-<uuid>.parquet

Files are written to a temporary name, fsynced and renamed into place, so a reader never sees
a half-written file and a writer that returns has made its rows durable. The partition values
come from the folder names; every other column is inside the file (``SPAN_SCHEMA``).
"""

from __future__ import annotations

import datetime as dt
import json
import os
import re
import socket
import time
import uuid
from collections import defaultdict
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator

import pyarrow as pa
import pyarrow.parquet as pq
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue
from opentelemetry.proto.trace.v1.trace_pb2 import Span as PbSpan, Status as PbStatus

from lightning_core import names, semconv
from lightning_core.durable import fsync_dir as _fsync_dir

SPAN_SCHEMA = pa.schema(
    [
        ("trace_id", pa.string()),
        ("span_id", pa.string()),
        ("parent_id", pa.string()),
        ("name", pa.string()),
        ("kind", pa.string()),
        ("start_ns", pa.int64()),
        ("end_ns", pa.int64()),
        ("status_code", pa.string()),
        ("status_message", pa.string()),
        ("attributes", pa.string()),  # JSON object, key order as sent
        ("events", pa.string()),  # JSON list of {name, time_ns, attributes}
        ("links", pa.string()),  # JSON list of {trace_id, span_id, attributes}
        ("resource", pa.string()),  # JSON object of resource attributes
        ("scope_name", pa.string()),
        ("scope_version", pa.string()),
        ("service_name", pa.string()),
        ("rollout_id", pa.string()),
        ("task_id", pa.string()),
        ("attempt", pa.int64()),
        ("received_ns", pa.int64()),
        # Promoted at ingest (``promoted_columns``): copies of the keys every query filters on...
        ("span_kind", pa.string()),  # arclight.span.kind
        ("agent_name", pa.string()),  # agent.name
        ("response_id", pa.string()),  # gen_ai.response.id
        ("reward_value", pa.float64()),  # arclight.reward.value (else agentlightning.reward.0.value)
        # ...and the gateway's training arrays, moved out of ``attributes`` and stored only here.
        ("prompt_token_ids", pa.list_(pa.int64())),  # arclight.llm.prompt_token_ids
        ("response_token_ids", pa.list_(pa.int64())),  # arclight.llm.response_token_ids
        ("response_logprobs", pa.list_(pa.float64())),  # arclight.llm.response_logprobs
    ]
)

# attribute key -> (column, element type, allowed range or None); these keys leave the attributes
# JSON at ingest. Token ids must fit 32 bits: the triplets store them as INTEGER[] (sql/llm_spans.sql).
TOKEN_ID_RANGE = (0, 2**31 - 1)
PROMOTED_ARRAYS = {
    semconv.PROMPT_TOKEN_IDS: ("prompt_token_ids", int, TOKEN_ID_RANGE),
    semconv.RESPONSE_TOKEN_IDS: ("response_token_ids", int, TOKEN_ID_RANGE),
    semconv.RESPONSE_LOGPROBS: ("response_logprobs", float, None),
}

# Times are int64 nanoseconds in the lake, and DuckDB reads 2^63-1 as the infinite timestamp.
MAX_TIME_NS = 2**63 - 2
MAX_VALUE_DEPTH = 32
_ZERO_TRACE_ID, _ZERO_SPAN_ID = bytes(16), bytes(8)

_KIND_NAMES = {v: k.removeprefix("SPAN_KIND_") for k, v in PbSpan.SpanKind.items()}
_STATUS_NAMES = {v: k.removeprefix("STATUS_CODE_") for k, v in PbStatus.StatusCode.items()}


class SpanDataError(ValueError):
    """A span payload that cannot be stored; the message names the span and the field."""


@dataclass(frozen=True)
class Partition:
    """One lake folder: a training (run, epoch) or a production date."""

    run_id: str | None
    epoch: int | None
    date: str | None = None

    def relative_dir(self) -> Path:
        """Return this partition's folder relative to the lake root."""
        if self.run_id is None:
            return Path("spans", "production", f"date={self.date}")
        return Path("spans", "training", f"run_id={self.run_id}", f"epoch={self.epoch}")


def any_value(value: AnyValue, depth: int = 0) -> Any:
    """Convert an OTLP ``AnyValue`` to a JSON-able Python value (nested at most ``MAX_VALUE_DEPTH`` deep)."""
    which = value.WhichOneof("value")
    if which is None:
        return None
    if which in ("array_value", "kvlist_value") and depth >= MAX_VALUE_DEPTH:
        raise SpanDataError(f"an attribute value is nested more than {MAX_VALUE_DEPTH} levels deep: flatten it")
    if which == "array_value":
        return [any_value(v, depth + 1) for v in value.array_value.values]
    if which == "kvlist_value":
        return {kv.key: any_value(kv.value, depth + 1) for kv in value.kvlist_value.values}
    if which == "bytes_value":
        return value.bytes_value.hex()
    return getattr(value, which)


def key_values(items: Iterable[KeyValue]) -> dict[str, Any]:
    """Convert OTLP attributes to a dict, keeping the order they were sent in."""
    return {kv.key: any_value(kv.value) for kv in items}


def _dumps(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False, allow_nan=True)


def _typed_list(value: Any, element: type, allowed: tuple[int, int] | None = None) -> list | None:
    """Return ``value`` (a list, or JSON text of one) as a list of ``element`` within ``allowed``; None if it is not one."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError:
            return None
    if not isinstance(value, list) or any(isinstance(v, (list, dict, str, bool)) for v in value):
        return None
    try:
        typed = [None if v is None else element(v) for v in value]
    except (TypeError, ValueError, OverflowError):
        return None
    if allowed is not None and any(v is not None and not allowed[0] <= v <= allowed[1] for v in typed):
        return None
    return typed


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or value is None:
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def promoted_columns(attributes: dict[str, Any]) -> dict[str, Any]:
    """Return a span's typed columns and its ``attributes`` JSON (without the promoted arrays).

    The collector and the embedded exporter both store spans through this, so their rows are
    identical. An array that is not a list of numbers (token ids: integers in ``TOKEN_ID_RANGE``)
    stays in the JSON and its column is NULL.
    """
    columns: dict[str, Any] = {
        "span_kind": _as_str(attributes.get(semconv.SPAN_KIND)),
        "agent_name": _as_str(attributes.get(semconv.AGENT_NAME)),
        "response_id": _as_str(attributes.get(semconv.GEN_AI_RESPONSE_ID)),
        "reward_value": _number(attributes.get(semconv.REWARD_VALUE, attributes.get(semconv.AGENTLIGHTNING_REWARD_0_VALUE))),
    }
    kept = attributes
    for key, (column, element, allowed) in PROMOTED_ARRAYS.items():
        columns[column] = None
        if key in attributes:
            typed = _typed_list(attributes[key], element, allowed)
            if typed is not None:
                if kept is attributes:
                    kept = dict(attributes)
                del kept[key]
                columns[column] = typed
    columns["attributes"] = _dumps(kept)
    return columns


def request_to_rows(request: ExportTraceServiceRequest, *, received_ns: int | None = None) -> dict[Partition, list[dict[str, Any]]]:
    """Flatten an OTLP trace export request into span rows grouped by lake partition."""
    received_ns = received_ns if received_ns is not None else time.time_ns()
    grouped: dict[Partition, list[dict[str, Any]]] = defaultdict(list)
    for resource_spans in request.resource_spans:
        resource = key_values(resource_spans.resource.attributes)
        resource_json = _dumps(resource)
        partition_of = _partitioner(resource)
        service_name = _as_str(resource.get(semconv.SERVICE_NAME))
        # Agent Lightning's exporter names the rollout in its own resource attribute
        rollout_id = _as_str(resource.get(semconv.ROLLOUT_ID, resource.get(semconv.AGENTLIGHTNING_ROLLOUT_ID)))
        task_id = _as_str(resource.get(semconv.TASK_ID))
        attempt = _as_int(resource.get(semconv.ATTEMPT), semconv.ATTEMPT)
        for scope_spans in resource_spans.scope_spans:
            scope_name, scope_version = scope_spans.scope.name, scope_spans.scope.version
            for span in scope_spans.spans:
                _check_span(span)
                attributes = key_values(span.attributes)
                grouped[partition_of(span.start_time_unix_nano)].append(
                    {
                        "trace_id": span.trace_id.hex(),
                        "span_id": span.span_id.hex(),
                        "parent_id": span.parent_span_id.hex() if span.parent_span_id.strip(b"\0") else None,
                        "name": span.name,
                        "kind": _KIND_NAMES.get(span.kind, str(span.kind)),
                        "start_ns": span.start_time_unix_nano,
                        "end_ns": span.end_time_unix_nano,
                        "status_code": _STATUS_NAMES.get(span.status.code, str(span.status.code)),
                        "status_message": span.status.message or None,
                        **promoted_columns(attributes),
                        "events": _dumps(
                            [
                                {"name": e.name, "time_ns": e.time_unix_nano, "attributes": key_values(e.attributes)}
                                for e in span.events
                            ]
                        ),
                        "links": _dumps(
                            [
                                {"trace_id": l.trace_id.hex(), "span_id": l.span_id.hex(), "attributes": key_values(l.attributes)}
                                for l in span.links
                            ]
                        ),
                        "resource": resource_json,
                        "scope_name": scope_name or None,
                        "scope_version": scope_version or None,
                        "service_name": service_name,
                        # a sender that serves many rollouts from one resource (a gateway) puts them on the span
                        "rollout_id": rollout_id or _as_str(attributes.get(semconv.ROLLOUT_ID)),
                        "task_id": task_id or _as_str(attributes.get(semconv.TASK_ID)),
                        "attempt": attempt if attempt is not None else _span_attempt(attributes),
                        "received_ns": received_ns,
                    }
                )
    return grouped


def _check_span(span: PbSpan) -> None:
    """Refuse a span whose ids or times the lake cannot store (OTLP: all-zero ids are invalid)."""
    if len(span.trace_id) != 16 or len(span.span_id) != 8 or len(span.parent_span_id) not in (0, 8):
        raise SpanDataError(
            f"span {span.name!r}: trace_id must be 16 bytes, span_id 8 bytes and parent_span_id 0 or 8 bytes, "
            f"found {len(span.trace_id)}, {len(span.span_id)} and {len(span.parent_span_id)}"
        )
    if span.trace_id == _ZERO_TRACE_ID or span.span_id == _ZERO_SPAN_ID:
        raise SpanDataError(f"span {span.name!r}: trace_id and span_id must not be all zeros (OTLP marks such ids invalid)")
    if span.start_time_unix_nano > MAX_TIME_NS or span.end_time_unix_nano > MAX_TIME_NS:
        raise SpanDataError(
            f"span {span.name!r}: start and end times must be at most {MAX_TIME_NS} ns (year 2262), "
            f"found {span.start_time_unix_nano} and {span.end_time_unix_nano}"
        )


def request_to_tables(
    request: ExportTraceServiceRequest, *, received_ns: int | None = None, max_partitions: int | None = None
) -> dict[Partition, pa.Table]:
    """Flatten an export request into one Arrow table per lake partition.

    Every value is converted here, so a span the lake cannot store raises ``SpanDataError`` for
    its own request and never reaches a write shared with other requests.
    """
    grouped = request_to_rows(request, received_ns=received_ns)
    if max_partitions is not None and len(grouped) > max_partitions:
        raise SpanDataError(
            f"the request's spans fall into {len(grouped)} lake partitions (run and epoch, or date), over the limit of "
            f"{max_partitions}: export each run's spans separately"
        )
    try:
        return {partition: rows_to_table(rows) for partition, rows in grouped.items()}
    except (pa.ArrowException, OverflowError, UnicodeError, TypeError, ValueError) as exc:
        raise SpanDataError(f"a span value cannot be stored: {exc}") from None


def _span_attempt(attributes: dict[str, Any]) -> int | None:
    """The span's own ``arclight.attempt`` (NULL, not an error, when it is not an integer)."""
    try:
        return _as_int(attributes.get(semconv.ATTEMPT), semconv.ATTEMPT)
    except SpanDataError:
        return None


def _partitioner(resource: dict[str, Any]):
    run_id = resource.get(semconv.RUN_ID)
    if run_id is None or run_id == "":
        return lambda start_ns: Partition(None, None, _utc_date(start_ns))
    if isinstance(run_id, int) and not isinstance(run_id, bool):
        run_id = str(run_id)
    try:
        names.check_run_id(run_id, what=f"resource attribute {semconv.RUN_ID}")
    except names.InvalidName as exc:
        raise SpanDataError(str(exc)) from None
    epoch = _as_int(resource.get(semconv.EPOCH), semconv.EPOCH)
    partition = Partition(run_id, epoch if epoch is not None else 0)
    return lambda start_ns: partition


def _utc_date(ns: int) -> str:
    return dt.datetime.fromtimestamp((ns or time.time_ns()) / 1e9, tz=dt.timezone.utc).strftime("%Y-%m-%d")


def _as_str(value: Any) -> str | None:
    return None if value is None else str(value)


def _as_int(value: Any, key: str) -> int | None:
    """A resource attribute that must be a whole number 0 <= n < 2^63 (it becomes a folder or a BIGINT)."""
    if value is None or value == "":
        return None
    try:
        return names.check_count(value, what=f"resource attribute {key}")
    except names.InvalidName as exc:
        raise SpanDataError(str(exc)) from None


def rows_to_table(rows: list[dict[str, Any]]) -> pa.Table:
    """Build an Arrow table with ``SPAN_SCHEMA`` from span rows."""
    return pa.Table.from_pylist(rows, schema=SPAN_SCHEMA)


class Lake:
    """Writes span rows into the lake folder atomically, and compacts small files."""

    def __init__(self, root: str | os.PathLike[str]):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        ensure_schema_files(self.root)

    def write(self, tables: dict[Partition, pa.Table]) -> list[Path]:
        """Write each partition's table to a new fsynced Parquet file; all files become visible, or none."""
        staged: list[tuple[Path, Path]] = []  # (temporary, final)
        try:
            for partition, table in tables.items():
                if table.num_rows:
                    folder = self._folder(partition)
                    name = _part_name()
                    staged.append((_write_synced(folder, name, table), folder / name))
            for tmp, final in staged:
                os.replace(tmp, final)
            for folder in {final.parent for _, final in staged}:
                _fsync_dir(folder)
        except BaseException:
            for tmp, final in staged:  # nothing was acknowledged: take every file of this write back
                tmp.unlink(missing_ok=True)
                final.unlink(missing_ok=True)
            raise
        return [final for _, final in staged]

    def write_table(self, partition: Partition, table: pa.Table) -> Path:
        """Write one Arrow table into ``partition`` durably (temp file, fsync, rename, fsync dir)."""
        return _durable_write(self._folder(partition), _part_name(), table)

    def _folder(self, partition: Partition) -> Path:
        folder = names.inside(self.root / "spans", self.root / partition.relative_dir(), what="partition folder")
        folder.mkdir(parents=True, exist_ok=True)
        return folder

    def partitions(self) -> list[Path]:
        """Return every partition folder that holds span files."""
        spans = self.root / "spans"
        return sorted({p.parent for p in spans.rglob("part-*.parquet")})

    def compact(self, *, min_files: int = 16, idle_s: float = 10.0, now: float | None = None) -> int:
        """Merge the files of each idle partition that has at least ``min_files``; return merges done.

        A partition is idle when its newest file is older than ``idle_s`` seconds. One compactor
        at a time works on a partition: it claims the folder's ``.compacting`` marker, writes the
        merged file, records the swap in the marker (merged file, small files), renames the merged
        file into place and removes the small ones. A compactor killed at any point is settled by
        ``recover``: forward when the merged file is in place, back otherwise, so every row ends
        up in the folder exactly once. A partition under a live ``read_lease`` is left alone: its
        reader finds rows again by file and row number.
        """
        now = now if now is not None else time.time()
        self.recover()
        return sum(self._merge(folder, min_files=min_files, idle_s=idle_s, now=now) for folder in self.partitions())

    def _merge(self, folder: Path, *, min_files: int, idle_s: float, now: float) -> bool:
        files = sorted(folder.glob("part-*.parquet"))
        if len(files) < min_files or self._leased(folder) or now - max(f.stat().st_mtime for f in files) < idle_s:
            return False
        marker = _claim(folder)
        if marker is None:  # another compactor works here
            return False
        try:
            files = sorted(folder.glob("part-*.parquet"))  # listed again, under the claim
            if len(files) < min_files:
                return False
            table = pa.concat_tables([pq.read_table(f, schema=SPAN_SCHEMA) for f in files])
            table = table.sort_by([("start_ns", "ascending")])
            name = _part_name().replace(".parquet", "-c.parquet")
            tmp = _write_synced(folder, name, table)
            # from here readers wait the swap out; a reader that took its lease while the merged
            # file was written wins, and the merge is dropped
            _write_marker(marker, {"phase": "swapping", "merged": name, "tmp": tmp.name, "sources": [f.name for f in files]})
            if self._leased(folder):
                return False
            os.replace(tmp, folder / name)
            return True
        finally:
            _settle(marker)

    def recover(self) -> int:
        """Settle compactions and remove temporary files left by processes that died; return files removed."""
        removed = 0
        for dirpath, _, filenames in os.walk(self.root / "spans"):
            folder = Path(dirpath)
            if COMPACTING_MARKER in filenames and not _live(folder / COMPACTING_MARKER):
                removed += _settle(folder / COMPACTING_MARKER)
            for name in filenames:
                if name.startswith(".part-") and name.endswith(".tmp") and not _live(folder / name, TEMP_MAX_AGE_S):
                    (folder / name).unlink(missing_ok=True)
                    removed += 1
        return removed

    def _leased(self, folder: Path) -> bool:
        """Whether a live reader holds a lease on ``folder`` or a folder above it in the lake."""
        root = self.root.resolve()
        folder = folder.resolve()
        for scope in (folder, *folder.parents):
            if any(_live(lease, READ_LEASE_MAX_AGE_S) for lease in scope.glob(f"{READ_LEASE_PREFIX}*")):
                return True
            if scope == root:
                break
        return False


# A reader that lists a partition's files and later re-reads rows by file and row number (the
# SQL pipeline) holds a lease on it; compaction skips leased partitions. Leases, markers and
# temporary files name their host and process: one of a process that has ended on this host is
# stale at once, one of another host after its maximum age (a compaction marker: while merging
# an hour, while swapping COMPACTING_MAX_AGE_S).
READ_LEASE_PREFIX = ".reading-"
READ_LEASE_MAX_AGE_S = 6 * 3600.0
COMPACTING_MARKER = ".compacting"
COMPACTING_MAX_AGE_S = 120.0
MERGING_MAX_AGE_S = 3600.0
TEMP_MAX_AGE_S = 3600.0


def span_scope(root: str | os.PathLike[str], *, run_id: str | None, epoch: int | None) -> Path:
    """Return the lake folder that holds the spans of (run_id, epoch): a run, an epoch, or production."""
    spans = Path(root) / "spans"
    if run_id is None:
        return spans / "production"
    run = spans / "training" / f"run_id={names.check_run_id(run_id)}"
    return names.inside(spans, run if epoch is None else run / f"epoch={names.check_epoch(epoch)}", what="span folder")


@contextmanager
def read_lease(folder: str | os.PathLike[str], *, wait_s: float = 60.0) -> Iterator[Path | None]:
    """Keep compaction away from ``folder`` and the partitions below it while the block runs.

    Waits (up to ``wait_s``) for a compaction that is swapping files below ``folder`` to finish,
    so the reader's file listing is stable from then on. A folder that does not exist holds no
    files to compact: no lease is taken.
    """
    folder = Path(folder)
    if not folder.is_dir():
        yield None
        return
    lease = folder / f"{READ_LEASE_PREFIX}{_owner()}-{uuid.uuid4().hex[:12]}"
    lease.write_text(_owner())
    try:
        # listed once: a compaction that starts its swap after this finds the lease and backs off
        swapping = list(folder.rglob(COMPACTING_MARKER))  # the folder itself included
        for marker in swapping:
            if not _live(marker):  # a compactor died here: settle its swap before the files are listed
                _settle(marker)
        deadline = time.monotonic() + wait_s
        while any(_marker_phase(m) == "swapping" and _live(m) for m in swapping):
            if time.monotonic() > deadline:
                raise TimeoutError(f"a compaction below {folder} has been swapping files for over {wait_s:.0f}s; "
                                   f"if no collector is compacting, remove the stale {COMPACTING_MARKER} file")
            time.sleep(0.01)
        yield lease
    finally:
        lease.unlink(missing_ok=True)


def _owner() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


def _live(path: Path, max_age_s: float | None = None) -> bool:
    """Whether a lease, marker or temporary file still has a live owner; a stale lease is removed.

    The owner (host-pid) is a lease's text, a marker's ``owner`` and a temporary file's name part
    before ``.tmp``; ``max_age_s`` defaults to the marker's phase limit.
    """
    try:
        text = "" if path.name.endswith(".tmp") else path.read_text()
        age = time.time() - path.stat().st_mtime
    except FileNotFoundError:
        return False
    if path.name == COMPACTING_MARKER:
        record = _marker_record(text)
        owner = record.get("owner", "")
        max_age_s = max_age_s or (MERGING_MAX_AGE_S if record.get("phase") == "merging" else COMPACTING_MAX_AGE_S)
    elif path.name.endswith(".tmp"):
        owner = path.name[:-len(".tmp")].partition(".parquet.")[2]  # .part-<ns>-<id>.parquet.<host>-<pid>.tmp
    else:
        owner = text
    host, _, pid = owner.rpartition("-")
    stale = age > (max_age_s or COMPACTING_MAX_AGE_S)
    if not stale and host == socket.gethostname() and pid.isdigit():
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            stale = True
        except PermissionError:
            pass  # alive, another user's
    if stale and path.name.startswith(READ_LEASE_PREFIX):
        path.unlink(missing_ok=True)
    return not stale


def _marker_record(text: str) -> dict[str, Any]:
    """A compaction marker's record; a marker of an older Arclight holds only its owner (and swaps)."""
    try:
        record = json.loads(text)
    except ValueError:
        record = None
    return record if isinstance(record, dict) else {"owner": text.strip(), "phase": "swapping"}


def _marker_phase(marker: Path) -> str | None:
    try:
        return _marker_record(marker.read_text()).get("phase")
    except FileNotFoundError:
        return None


def _claim(folder: Path) -> Path | None:
    """Create the folder's compaction marker for this process; None when a live compactor holds it."""
    marker = folder / COMPACTING_MARKER
    for _ in range(2):
        try:
            fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            if _live(marker):
                return None
            _settle(marker)  # its compactor died
            continue
        with os.fdopen(fd, "w") as fh:
            json.dump({"owner": _owner(), "phase": "merging"}, fh)
        return marker
    return None


def _write_marker(marker: Path, fields: dict[str, Any]) -> None:
    """Record the swap about to happen in the marker, durably, before any file moves."""
    tmp = marker.with_name(f"{COMPACTING_MARKER}.{_owner()}.new")
    with open(tmp, "w") as fh:
        json.dump({"owner": _owner(), **fields}, fh)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, marker)
    _fsync_dir(marker.parent)


def _settle(marker: Path) -> int:
    """Finish or undo the swap recorded in ``marker`` so each row is in the folder once; drop the marker.

    The merged file in place means the swap had begun: the small files it replaces go. Otherwise
    the merged file is removed and the small files stay. Returns the files removed.
    """
    folder = marker.parent
    try:
        record = _marker_record(marker.read_text())
    except FileNotFoundError:
        return 0
    removed = 0
    if record.get("phase") == "swapping" and record.get("merged"):
        merged_in_place = (folder / record["merged"]).exists()
        doomed = record.get("sources", []) if merged_in_place else [record.get("tmp", "")]
        for name in doomed:  # plain span file names only: a marker never deletes outside its folder
            if isinstance(name, str) and re.fullmatch(r"\.?part-[^/]+", name) and (folder / name).exists():
                (folder / name).unlink(missing_ok=True)
                removed += 1
    _fsync_dir(folder)
    marker.unlink(missing_ok=True)
    _fsync_dir(folder)
    return removed


def _part_name() -> str:
    return f"part-{time.time_ns()}-{uuid.uuid4().hex[:12]}.parquet"


def _write_synced(folder: Path, name: str, table: pa.Table) -> Path:
    """Write ``table`` to a hidden temporary file next to ``name`` and fsync it; return that file."""
    tmp = folder / f".{name}.{_owner()}.tmp"  # its owner: recover() removes it once that process is gone
    try:
        with open(tmp, "wb") as fh:
            pq.write_table(table, fh, compression="zstd", row_group_size=128 * 1024)
            fh.flush()
            os.fsync(fh.fileno())
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return tmp


def _durable_write(folder: Path, name: str, table: pa.Table) -> Path:
    final = folder / name
    os.replace(_write_synced(folder, name, table), final)
    _fsync_dir(folder)
    return final


SCHEMA_RUN = "_schema"


def ensure_schema_files(root: Path) -> None:
    """Place an empty file of the current ``SPAN_SCHEMA`` in each glob so views work on an empty lake."""
    for partition in (Partition(SCHEMA_RUN, -1), Partition(None, None, "1970-01-01")):
        folder = root / partition.relative_dir()
        target = folder / "part-0-schema.parquet"
        if not target.exists() or not pq.read_schema(target).equals(SPAN_SCHEMA, check_metadata=False):
            folder.mkdir(parents=True, exist_ok=True)
            _durable_write(folder, target.name, SPAN_SCHEMA.empty_table())
