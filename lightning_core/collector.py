"""OTLP/HTTP collector: receives trace exports and appends their spans to the Parquet lake.

``POST /v1/traces`` takes protobuf (``application/x-protobuf``) or JSON (``application/json``),
optionally gzip-encoded. A request is acknowledged only after its spans are in a fsynced
Parquet file. Requests that arrive within ``flush_interval_ms`` of each other share one file
(group commit), and idle partitions with many small files are compacted in the background.

Status codes (see docs/collector.md): 200 stored; 400 malformed, truncated or empty body, or
invalid span data; 401 missing or wrong bearer token; 413 body over the limit (before or after
gunzip); 415 unsupported content type or encoding; 503 the lake could not be written (retry).
"""

from __future__ import annotations

import asyncio
import base64
import concurrent.futures
import contextlib
import json
import logging
import os
import queue
import threading
import time
import zlib
from collections import defaultdict
from typing import Any

import uvicorn
from google.protobuf import json_format
from google.protobuf.message import DecodeError
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from starlette.applications import Starlette
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from lightning_core.config import CollectorConfig
from lightning_core.lake import Lake, Partition, SpanDataError, request_to_rows

log = logging.getLogger("arclight.collector")

LOOPBACK_HOSTS = {"127.0.0.1", "localhost", "::1"}
PROTOBUF = "application/x-protobuf"
JSON = "application/json"


class RequestRejected(Exception):
    """A request the collector answers with a 4xx status and a reason."""

    def __init__(self, status: int, reason: str, label: str):
        super().__init__(reason)
        self.status, self.reason, self.label = status, reason, label


class CollectorMetrics:
    """Prometheus metrics of one collector, in their own registry."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.spans = Counter("arclight_collector_spans_received", "Spans stored in the lake.", registry=self.registry)
        self.requests = Counter("arclight_collector_requests", "Export requests accepted.", registry=self.registry)
        self.rejected = Counter("arclight_collector_requests_rejected", "Requests answered with an error.", ["reason"], registry=self.registry)
        self.bytes = Counter("arclight_collector_bytes_received", "Request body bytes received (as sent).", registry=self.registry)
        self.files = Counter("arclight_collector_files_written", "Parquet files written.", registry=self.registry)
        self.compactions = Counter("arclight_collector_compactions", "Partitions compacted.", registry=self.registry)
        self.flush_latency = Histogram(
            "arclight_collector_flush_latency_seconds", "Time from a request being parsed to its spans being durable.",
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10), registry=self.registry,
        )


class GroupCommitWriter:
    """One thread that writes queued span batches to the lake, sharing files across requests."""

    def __init__(self, lake: Lake, *, flush_interval_s: float, metrics: CollectorMetrics):
        self.lake, self.flush_interval_s, self.metrics = lake, flush_interval_s, metrics
        self._queue: queue.Queue = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="arclight-lake-writer", daemon=True)
        self._stopping = False
        self._thread.start()

    def submit(self, grouped: dict[Partition, list[dict[str, Any]]]) -> concurrent.futures.Future:
        """Queue rows for writing; the future completes once they are durable."""
        future: concurrent.futures.Future = concurrent.futures.Future()
        self._queue.put((grouped, future, time.monotonic()))
        return future

    def close(self) -> None:
        """Write what is queued, then stop the thread."""
        self._stopping = True
        self._queue.put(None)
        self._thread.join(timeout=30)

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            batch = [item]
            deadline = time.monotonic() + self.flush_interval_s
            while True:
                remaining = deadline - time.monotonic()
                try:
                    nxt = self._queue.get(timeout=max(remaining, 0)) if remaining > 0 else self._queue.get_nowait()
                except queue.Empty:
                    break
                if nxt is None:
                    self._flush(batch)
                    return
                batch.append(nxt)
            self._flush(batch)

    def _flush(self, batch: list) -> None:
        merged: dict[Partition, list[dict[str, Any]]] = defaultdict(list)
        for grouped, _, _ in batch:
            for partition, rows in grouped.items():
                merged[partition].extend(rows)
        try:
            files = self.lake.write(merged)
        except Exception as exc:  # disk full, permissions: every waiting request gets a 503
            log.exception("writing %d requests to the lake failed", len(batch))
            for _, future, _ in batch:
                future.set_exception(exc)
            return
        self.metrics.files.inc(len(files))
        now = time.monotonic()
        for grouped, future, queued_at in batch:
            self.metrics.flush_latency.observe(now - queued_at)
            future.set_result(sum(len(rows) for rows in grouped.values()))


class TraceReceiver:
    """The collector's request handlers, sharing one lake, its writer thread and the metrics."""

    def __init__(self, config: CollectorConfig, lake: Lake, token: str | None):
        self.config, self.lake, self.token = config, lake, token
        self.metrics = CollectorMetrics()
        self.writer: GroupCommitWriter | None = None

    async def traces(self, request: Request) -> Response:
        """``POST /v1/traces``: store an OTLP export; answer once its spans are durable."""
        config, metrics = self.config, self.metrics
        content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
        try:
            _check_token(request, self.token)
            body = await _read_body(request, config.max_body_bytes)
            metrics.bytes.inc(len(body))
            body = _decode_body(body, request.headers.get("content-encoding", "").lower(), config.max_body_bytes)
            export = _parse(body, content_type)
            grouped = request_to_rows(export)
        except RequestRejected as exc:
            metrics.rejected.labels(reason=exc.label).inc()
            return _error(exc.status, exc.reason, content_type)
        except SpanDataError as exc:
            metrics.rejected.labels(reason="invalid_span").inc()
            return _error(400, str(exc), content_type)
        except ClientDisconnect:
            metrics.rejected.labels(reason="disconnect").inc()
            return Response(status_code=400)
        n_spans = sum(len(rows) for rows in grouped.values())
        if n_spans:
            try:
                await asyncio.wrap_future(self.writer.submit(grouped))
            except Exception as exc:
                metrics.rejected.labels(reason="lake_write").inc()
                return _error(503, f"spans could not be written to the lake ({exc}); retry later", content_type)
        metrics.requests.inc()
        metrics.spans.inc(n_spans)
        if content_type == JSON:
            return JSONResponse({})
        return Response(ExportTraceServiceResponse().SerializeToString(), media_type=PROTOBUF)

    async def healthz(self, request: Request) -> Response:
        """``GET /healthz``."""
        return JSONResponse({"status": "ok", "lake": str(self.lake.root)})

    async def prometheus(self, request: Request) -> Response:
        """``GET /metrics``: Prometheus text."""
        return Response(generate_latest(self.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    async def compact_loop(self) -> None:
        """Merge the small files of idle partitions, forever."""
        config = self.config
        while True:
            await asyncio.sleep(max(1.0, config.compact_idle_s / 2))
            try:
                merged = await asyncio.to_thread(self.lake.compact, min_files=config.compact_min_files, idle_s=config.compact_idle_s)
                self.metrics.compactions.inc(merged)
            except Exception:
                log.exception("compaction failed; the small files are kept")

    @contextlib.asynccontextmanager
    async def lifespan(self, app: Starlette):
        """Run the writer thread and the compactor while the app serves."""
        self.writer = GroupCommitWriter(self.lake, flush_interval_s=self.config.flush_interval_ms / 1000, metrics=self.metrics)
        compactor = asyncio.create_task(self.compact_loop())
        try:
            yield
        finally:
            compactor.cancel()
            self.writer.close()


def build_app(config: CollectorConfig, lake_root: str | os.PathLike[str]) -> Starlette:
    """Build the collector's ASGI app writing into the lake at ``lake_root``."""
    token = config.token or os.environ.get("ARCLIGHT_COLLECTOR_TOKEN") or None
    if config.host not in LOOPBACK_HOSTS and not token:
        raise ValueError(
            f"collector bound to {config.host!r} (not loopback) needs a bearer token: "
            "set collector.token in the config or ARCLIGHT_COLLECTOR_TOKEN"
        )
    receiver = TraceReceiver(config, Lake(lake_root), token)
    app = Starlette(
        routes=[
            Route("/v1/traces", receiver.traces, methods=["POST"]),
            Route("/healthz", receiver.healthz, methods=["GET"]),
            Route("/metrics", receiver.prometheus, methods=["GET"]),
        ],
        lifespan=receiver.lifespan,
    )
    app.state.metrics = receiver.metrics
    app.state.lake = receiver.lake
    return app


def _check_token(request: Request, token: str | None) -> None:
    if token is None:
        return
    header = request.headers.get("authorization", "")
    if header != f"Bearer {token}":
        raise RequestRejected(401, "missing or wrong bearer token: send 'Authorization: Bearer <collector token>'", "unauthorized")


async def _read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise RequestRejected(413, f"body of {declared} bytes is over the limit of {limit} bytes: export smaller batches", "too_large")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise RequestRejected(413, f"body is over the limit of {limit} bytes: export smaller batches", "too_large")
        chunks.append(chunk)
    return b"".join(chunks)


def _decode_body(body: bytes, encoding: str, limit: int) -> bytes:
    if encoding in ("", "identity"):
        return body
    if encoding != "gzip":
        raise RequestRejected(415, f"content-encoding {encoding!r} is not supported: use gzip or none", "encoding")
    inflater = zlib.decompressobj(wbits=16 + zlib.MAX_WBITS)
    try:
        out = inflater.decompress(body, limit + 1)
    except zlib.error as exc:
        raise RequestRejected(400, f"gzip body could not be decompressed: {exc}", "bad_gzip") from None
    if len(out) > limit or inflater.unconsumed_tail:
        raise RequestRejected(413, f"body decompresses to more than the limit of {limit} bytes: export smaller batches", "too_large")
    if not inflater.eof:
        raise RequestRejected(400, "gzip body is truncated", "bad_gzip")
    return out


def _parse(body: bytes, content_type: str) -> ExportTraceServiceRequest:
    if not body:
        raise RequestRejected(400, "empty body: expected an OTLP ExportTraceServiceRequest", "empty")
    export = ExportTraceServiceRequest()
    if content_type == PROTOBUF:
        try:
            export.ParseFromString(body)
        except DecodeError as exc:
            raise RequestRejected(400, f"body is not a valid OTLP protobuf ExportTraceServiceRequest: {exc}", "malformed") from None
        return export
    if content_type == JSON:
        try:
            data = json.loads(body)
            _hex_ids_to_base64(data)
            json_format.ParseDict(data, export, ignore_unknown_fields=True)
        except (ValueError, json_format.ParseError, TypeError, AttributeError) as exc:
            raise RequestRejected(400, f"body is not a valid OTLP/JSON ExportTraceServiceRequest: {exc}", "malformed") from None
        return export
    raise RequestRejected(
        415, f"content-type {content_type or '(none)'!r} is not supported: use {PROTOBUF} or {JSON}", "content_type"
    )


_ID_FIELDS = ("traceId", "spanId", "parentSpanId", "trace_id", "span_id", "parent_span_id")


def _hex_ids_to_base64(data: Any) -> None:
    """OTLP/JSON encodes ids as hex; protobuf's JSON parser expects base64 for bytes fields."""
    if not isinstance(data, dict):
        raise TypeError(f"expected a JSON object, found {type(data).__name__}")
    for resource_spans in data.get("resourceSpans", data.get("resource_spans", [])) or []:
        for scope_spans in resource_spans.get("scopeSpans", resource_spans.get("scope_spans", [])) or []:
            for span in scope_spans.get("spans", []) or []:
                _convert_ids(span)
                for link in span.get("links", []) or []:
                    _convert_ids(link)


def _convert_ids(obj: dict[str, Any]) -> None:
    for key in _ID_FIELDS:
        value = obj.get(key)
        if isinstance(value, str) and value:
            try:
                obj[key] = base64.b64encode(bytes.fromhex(value)).decode()
            except ValueError:
                raise ValueError(f"{key} {value!r} is not hex") from None


def _error(status: int, reason: str, content_type: str) -> Response:
    if content_type == PROTOBUF:
        # OTLP clients expect a google.rpc.Status body; the reason is in the message field.
        from google.rpc.status_pb2 import Status

        return Response(Status(code=status, message=reason).SerializeToString(), status_code=status, media_type=PROTOBUF)
    return JSONResponse({"error": reason}, status_code=status)


def serve(config: CollectorConfig, lake_root: str | os.PathLike[str], *, log_level: str = "info") -> None:
    """Run the collector in the foreground until interrupted."""
    app = build_app(config, lake_root)
    uvicorn.run(app, host=config.host, port=config.port, log_level=log_level, access_log=False, timeout_graceful_shutdown=10)
