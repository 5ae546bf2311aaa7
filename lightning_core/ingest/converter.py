"""The collector's converter thread: request bodies into span tables, several protobuf requests at a time.

A conversion has a fixed cost whatever its size (some 45 Arrow and numpy calls: a request of 1,050 spans
takes ~5.4 ms alone, ~4.6 ms each two at a time). Requests that queue while the thread converts the ones
before them are converted together: each body's outline is parsed and checked on its own
(``parse_outline``, so a malformed body never merges into another), then the bodies, concatenated, are
converted once (two serialised requests one after the other are one valid request: their
``resource_spans`` in order). The batch's tables go to the lake writer as one unit, and every request of
it is acknowledged when that commit is durable. The joined copy of the bodies (at most
``MAX_BATCH_BYTES``) lives only while the batch converts; ``max_inflight_bytes`` counts the bodies.

A batch whose conversion fails in any way (a bad span, too many partitions, an attribute protobuf refuses) is
converted again request by request, so a bad request gets its own error and never fails the others.
JSON and gzip-encoded requests are decoded first; JSON requests are converted alone.
"""

from __future__ import annotations

import concurrent.futures
import functools
import logging
import queue
import threading
from dataclasses import dataclass, field
from typing import Callable

import pyarrow as pa

from lightning_core.ingest.otlp_decode import PROTOBUF, decode_body, outline_unchecked, parse, parse_outline
from lightning_core.store.span_schema import Partition
from lightning_core.ingest.span_rows import SpanDataError
from lightning_core.ingest.tables import request_to_tables

log = logging.getLogger("arclight.collector")

Tables = dict[Partition, pa.Table]
MAX_BATCH_BYTES = 16 << 20  # bodies converted at once (a batch takes requests until it passes this)
MAX_BATCH_REQUESTS = 32
# How long a lone protobuf request waits for a second one to be converted with, when the converter's last batch
# held several requests and the writer is committing others. With four senders the requests then travel in
# pairs, one pair converting while the other commits: each conversion and each commit is shared by two requests,
# and the two stages overlap (docs/measurement-log.md: +11% acknowledged spans/s, 3 ms less CPU a request). With
# one or two senders the batches hold one request (one converts while the other commits), and no request waits:
# a wait would only put both in the same stage. Nor does one that arrives while nothing is being committed.
JOIN_WAIT_S = 0.003


@dataclass
class _Request:
    body: bytes
    content_type: str
    encoding: str
    hold: Callable[[int], None]
    future: concurrent.futures.Future = field(default_factory=concurrent.futures.Future)
    parsed: object = None  # the request parsed (and checked): a protobuf body's outline, or the JSON request


class Converter:
    """One thread that converts queued requests and submits their tables to ``store`` (the lake writer's
    ``submit``). A request's future gives ``(spans, durable)``: its span count and a future of its own that
    completes when the commit holding its spans is durable (None when it has no spans), or the error the
    request is answered with."""

    def __init__(self, store: Callable[[Tables], concurrent.futures.Future], *, max_body_bytes: int, max_partitions: int,
                 on_batch: Callable[[int], None] | None = None):
        self.store, self.max_body_bytes, self.max_partitions = store, max_body_bytes, max_partitions
        self.on_batch = on_batch  # told the number of requests of each batch converted together
        self._queue: queue.Queue[_Request | None] = queue.Queue()
        self._committing = 0  # commits handed to the writer and not yet done
        self._lock = threading.Lock()
        self._last_batch = 0  # requests in the batch converted last
        self._thread = threading.Thread(target=self._run, name="arclight-convert", daemon=True)
        self._thread.start()

    def submit(self, body: bytes, content_type: str, encoding: str, hold: Callable[[int], None]) -> concurrent.futures.Future:
        request = _Request(body, content_type, encoding, hold)
        self._queue.put(request)
        return request.future

    def close(self) -> None:
        """Convert what is queued, then stop the thread."""
        self._queue.put(None)
        self._thread.join(timeout=30)

    def _run(self) -> None:
        while True:
            first = self._queue.get()
            if first is None:
                return
            batch, size, stop = [first], len(first.body), False
            wait = first.content_type == PROTOBUF and self._last_batch > 1 and self._committing > 0
            while len(batch) < MAX_BATCH_REQUESTS and size < MAX_BATCH_BYTES:
                try:
                    item = self._queue.get(timeout=JOIN_WAIT_S) if wait and len(batch) == 1 else self._queue.get_nowait()
                except queue.Empty:
                    break
                if item is None:
                    stop = True
                    break
                batch.append(item)
                size += len(item.body)
            self._last_batch = len(batch)
            # a request whose handler went away (cancelled) is dropped; the others can no longer be cancelled
            batch = [request for request in batch if request.future.set_running_or_notify_cancel()]
            if self.on_batch is not None and batch:
                self.on_batch(len(batch))
            try:
                self._convert(batch)
            except BaseException as exc:  # never leave a request waiting
                log.exception("the converter failed")
                for request in batch:
                    if not request.future.done():
                        request.future.set_exception(exc)
            if stop:
                return

    def _convert(self, batch: list[_Request]) -> None:
        together: list[_Request] = []
        for request in batch:
            try:
                body = decode_body(request.body, request.encoding, self.max_body_bytes)
                if body is not request.body:
                    request.hold(len(request.body) + len(body))
                    request.body = body
                if request.content_type == PROTOBUF:
                    request.parsed = parse_outline(body)
                    together.append(request)
                    continue
                request.parsed = parse(body, request.content_type)
            except Exception as exc:
                request.future.set_exception(exc)
                continue
            self._convert_alone(request)
        if len(together) > 1:
            body = b"".join(r.body for r in together)
            try:
                tables = self._tables(outline_unchecked(body), body)
            except Exception as exc:  # someone's request cannot be stored as it is: find whose, one by one
                log.debug("a batch of %d requests is converted one by one: %s", len(together), exc)
            else:
                self._finish(together, tables)
                return
        for request in together:
            self._convert_alone(request)

    def _convert_alone(self, request: _Request) -> None:
        try:
            tables = self._tables(request.parsed, request.body if request.content_type == PROTOBUF else None)
        except Exception as exc:
            request.future.set_exception(exc)
        else:
            self._finish([request], tables)

    def _tables(self, request, body: bytes | None) -> Tables:
        try:
            return request_to_tables(request, body=body, max_partitions=self.max_partitions)
        except RecursionError:
            raise SpanDataError("an attribute value is nested too deeply: flatten it") from None

    def _finish(self, requests: list[_Request], tables: Tables) -> None:
        """Hand the tables to the writer once, and give each request its own future of that commit (a handler
        that is cancelled cancels only its own)."""
        rows = sum(t.num_rows for t in tables.values())
        commit = self.store(tables) if rows else None
        if commit is not None:
            with self._lock:
                self._committing += 1
            commit.add_done_callback(self._committed)
        for request in requests:
            durable = None
            if commit is not None:
                durable = concurrent.futures.Future()
                commit.add_done_callback(functools.partial(_pass_on, durable))
            request.future.set_result((rows if len(requests) == 1 else _span_count(request.parsed), durable))

    def _committed(self, commit: concurrent.futures.Future) -> None:
        with self._lock:
            self._committing -= 1


def _pass_on(durable: concurrent.futures.Future, commit: concurrent.futures.Future) -> None:
    """Complete one request's ``durable`` future as the shared ``commit`` completed (unless it was cancelled)."""
    if not durable.set_running_or_notify_cancel():
        return
    error = commit.exception()
    if error is None:
        durable.set_result(commit.result())
    else:
        durable.set_exception(error)


def _span_count(outline) -> int:
    return sum(len(scope.spans) for resource in outline.resource_spans for scope in resource.scope_spans)
