"""Group commit: one thread writes the span tables of many requests to the lake in shared commits.

Requests queued while a commit runs share the next Delta commit per table (a file per partition;
``flush_interval_s`` > 0 makes each commit also wait that long for more), up to
``MAX_PARTITIONS_PER_COMMIT`` partitions per commit (each partition costs a file and its fsync).
A commit is all or nothing (``Lake.write``); when one fails, each of its requests is written again
on its own, so a request that cannot be written never fails the others.
"""

from __future__ import annotations

import concurrent.futures
import logging
import queue
import re
import threading
import time
from collections import defaultdict
from dataclasses import dataclass
from typing import Callable

import pyarrow as pa

from lightning_core.store.spans import Lake
from lightning_core.store.span_schema import Partition

log = logging.getLogger("arclight.collector")

MAX_PARTITIONS_PER_COMMIT = 256

Tables = dict[Partition, pa.Table]


@dataclass(frozen=True)
class Failing:
    """The lake refuses commits: since when (wall clock), how many commits failed since, and the last error."""

    since: float
    commits: int
    error: str

    def reason(self) -> str:
        """One line for ``/healthz`` and ``arclight status``."""
        return (f"the lake refused every commit since {time.strftime('%H:%M:%S', time.localtime(self.since))} "
                f"({self.commits} failed, spans answered 503): {self.error}")


class GroupCommitWriter:
    """One thread that writes queued span tables to the lake, sharing files across requests."""

    def __init__(self, lake: Lake, *, flush_interval_s: float, on_commit: Callable[[int, list[float]], None] | None = None):
        self.lake, self.flush_interval_s, self.on_commit = lake, flush_interval_s, on_commit
        self.failing: Failing | None = None  # set while the lake refuses commits (reset by the next one that works)
        self._queue: queue.Queue = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="arclight-lake-writer", daemon=True)
        self._thread.start()

    def submit(self, tables: Tables) -> concurrent.futures.Future:
        """Queue one request's tables; the future completes (with its row count) once they are durable."""
        future: concurrent.futures.Future = concurrent.futures.Future()
        self._queue.put((tables, future, time.monotonic()))
        return future

    def close(self) -> None:
        """Write what is queued, then stop the thread."""
        self._queue.put(None)
        self._thread.join(timeout=30)

    def _run(self) -> None:
        carry = None  # a request that did not fit into the previous commit
        while True:
            first = carry if carry is not None else self._queue.get()
            carry = None
            if first is None:
                return
            batch, partitions, stop = [first], set(first[0]), False
            deadline = time.monotonic() + self.flush_interval_s
            while True:
                remaining = deadline - time.monotonic()
                try:
                    item = self._queue.get(timeout=remaining) if remaining > 0 else self._queue.get_nowait()
                except queue.Empty:
                    break
                if item is None:
                    stop = True
                    break
                if len(partitions.union(item[0])) > MAX_PARTITIONS_PER_COMMIT:
                    carry = item
                    break
                batch.append(item)
                partitions.update(item[0])
            self._commit(batch)
            if stop:
                return

    def _commit(self, batch: list) -> None:
        # a request whose waiter was cancelled is written all the same (its spans were received), but its
        # future takes no result; the others can no longer be cancelled
        waiting = [future.set_running_or_notify_cancel() for _, future, _ in batch]
        try:
            files = len(self.lake.write(_merge([tables for tables, _, _ in batch])))
            outcomes: list[BaseException | None] = [None] * len(batch)
        except Exception as exc:
            if len(batch) == 1:
                log.error("writing a request to the lake failed: %s", exc)
                files, outcomes = 0, [exc]
            else:
                log.warning("a commit of %d requests failed (%s); writing each request on its own", len(batch), exc)
                files, outcomes = self._one_by_one(batch)
        self._note(outcomes)
        now = time.monotonic()
        if self.on_commit is not None:
            self.on_commit(files, [now - queued_at for (_, _, queued_at), error in zip(batch, outcomes) if error is None])
        for (tables, future, _), error, wanted in zip(batch, outcomes, waiting):
            if not wanted:
                continue
            if error is None:
                future.set_result(sum(t.num_rows for t in tables.values()))
            else:
                future.set_exception(error)

    def _note(self, outcomes: list[BaseException | None]) -> None:
        """Keep ``failing`` up to date: cleared by a commit that worked, counted up by one that did not."""
        errors = [e for e in outcomes if e is not None]
        if len(errors) < len(outcomes):
            if self.failing is not None:
                log.warning("the lake takes commits again after %d failed since %s", self.failing.commits,
                            time.strftime("%H:%M:%S", time.localtime(self.failing.since)))
            self.failing = None
        elif self.failing is None:
            self.failing = Failing(since=time.time(), commits=1, error=one_line(errors[-1]))
        else:
            self.failing = Failing(self.failing.since, self.failing.commits + 1, one_line(errors[-1]))

    def _one_by_one(self, batch: list) -> tuple[int, list[BaseException | None]]:
        files, outcomes = 0, []
        for tables, _, _ in batch:
            try:
                files += len(self.lake.write(tables))
                outcomes.append(None)
            except Exception as exc:
                log.error("writing a request to the lake failed: %s", exc)
                outcomes.append(exc)
        return files, outcomes


_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def one_line(exc: BaseException, limit: int = 500) -> str:
    """An error as one line: delta-rs writes its causes on separate lines, coloured, behind arrows."""
    text = _ANSI.sub("", str(exc)).replace("↳", " ")
    return " ".join(part.strip() for part in text.splitlines() if part.strip())[:limit] or type(exc).__name__


def _merge(requests: list[Tables]) -> Tables:
    """One table per partition from the tables of many requests."""
    parts: dict[Partition, list[pa.Table]] = defaultdict(list)
    for tables in requests:
        for partition, table in tables.items():
            parts[partition].append(table)
    return {partition: pa.concat_tables(tables) if len(tables) > 1 else tables[0] for partition, tables in parts.items()}
