"""OTLP/HTTP collector: receives trace exports and appends their spans to the lake's Delta tables.

``POST /v1/traces`` takes protobuf (``application/x-protobuf``) or JSON (``application/json``),
optionally gzip-encoded. A request is acknowledged only after the Delta commit that holds its
spans is durable. Requests that arrive while a commit runs share the next commit (group commit;
``flush_interval_ms`` makes a commit wait for more), and idle partitions with many small files
are compacted in the background (Delta ``optimize``; ``vacuum`` after the retention window).

Each request is decoded and checked before it joins a commit (protobuf parses a protobuf body's outline
down to the spans and checks its wire types; compiled code reads the spans' attributes from the same
bytes, and what it cannot take is parsed whole), so a span the lake cannot store gets its own 400 and
never touches another client's request. Requests that queue for the converter thread are converted
together (``converter.Converter``), and one by one again when that fails. The
bodies held at once are bounded (``max_inflight_bytes``): beyond it requests get 503 with
Retry-After.

Status codes (see docs/collector.md): 200 stored; 400 malformed, truncated or empty body, or
invalid span data; 401 missing or wrong bearer token; 413 body over the limit (before or after
gunzip); 415 unsupported content type or encoding; 503 busy or the lake could not be written
(retry).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import json
import logging
import os
import threading
import time

import uvicorn
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from starlette.applications import Starlette
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from lightning_core.ingest import otlp_wire
from lightning_core.ingest.allocator import keep_freed_memory
from lightning_core.config import CollectorConfig
from lightning_core.ingest.converter import Converter
from lightning_core.ingest.group_commit import GroupCommitWriter
from lightning_core.common.http_guard import LOOPBACK_HOSTS, has_token, trusted
from lightning_core.store.span_schema import LANES
from lightning_core.store.spans import ConcurrentCompaction, Lake
from lightning_core.ingest.otlp_decode import JSON, PROTOBUF, RequestRejected, read_body
from lightning_core.ingest.span_rows import SpanDataError

log = logging.getLogger("arclight.collector")
LOG_CLEAN_EVERY_S = 5.0
COMPACT_CHECK_EVERY_S = 10.0

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
        self.conversion_requests = Histogram(
            "arclight_collector_requests_per_conversion", "Requests converted together (one conversion, then one commit).",
            buckets=(1, 2, 3, 4, 8, 16, 32), registry=self.registry,
        )
        self.flush_latency = Histogram(
            "arclight_collector_flush_latency_seconds", "Time from a request being parsed to its spans being durable.",
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10), registry=self.registry,
        )


class ByteBudget:
    """Bytes of request bodies held at once (as sent, and again as decoded); past the limit, 503."""

    def __init__(self, limit: int):
        self.limit, self.used = limit, 0
        self._lock = threading.Lock()

    def hold(self, held: int, total: int) -> int:
        """Grow one request's share from ``held`` to ``total`` bytes and return it; a request alone always fits."""
        with self._lock:
            others = self.used - held
            if total > held and others > 0 and self.used + total - held > self.limit:
                raise RequestRejected(
                    503, f"the collector holds {others} bytes of other requests (limit {self.limit}): retry in a second",
                    "busy", retry_after=1)
            self.used += max(total - held, 0)
        return max(total, held)

    def release(self, held: int) -> None:
        """Give back one request's share."""
        with self._lock:
            self.used -= held


class TraceReceiver:
    """The collector's request handlers, sharing one lake, its writer thread, a byte budget and the metrics."""

    def __init__(self, config: CollectorConfig, lake: Lake, token: str | None):
        self.config, self.lake, self.token = config, lake, token
        self.metrics = CollectorMetrics()
        self.budget = ByteBudget(config.max_inflight_bytes)
        self.writer: GroupCommitWriter | None = None
        self.converter: Converter | None = None

    async def traces(self, request: Request) -> Response:
        """``POST /v1/traces``: store an OTLP export; answer once its spans are durable."""
        content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
        held = [0]

        def hold(total: int) -> None:
            held[0] = self.budget.hold(held[0], total)

        try:
            _check_token(request, self.token)
            body = await read_body(request, self.config.max_body_bytes, hold=hold)
            self.metrics.bytes.inc(len(body))
            encoding = request.headers.get("content-encoding", "").lower()
            # converted off the event loop by one thread (conversions hold the GIL anyway), several queued
            # requests at once; answered once the commit holding the spans is durable
            n_spans, durable = await asyncio.wrap_future(self.converter.submit(body, content_type, encoding, hold))
            if durable is not None:
                await self._wait_durable(durable)
        except RequestRejected as exc:
            self.metrics.rejected.labels(reason=exc.label).inc()
            return _error(exc.status, exc.reason, content_type, retry_after=exc.retry_after)
        except SpanDataError as exc:
            self.metrics.rejected.labels(reason="invalid_span").inc()
            return _error(400, str(exc), content_type)
        except ClientDisconnect:
            self.metrics.rejected.labels(reason="disconnect").inc()
            return Response(status_code=400)
        finally:
            self.budget.release(held[0])
        self.metrics.requests.inc()
        self.metrics.spans.inc(n_spans)
        if content_type == JSON:
            return JSONResponse({})
        return Response(ExportTraceServiceResponse().SerializeToString(), media_type=PROTOBUF)

    async def _wait_durable(self, durable: concurrent.futures.Future) -> None:
        try:
            await asyncio.wrap_future(durable)
        except Exception as exc:
            raise RequestRejected(503, f"spans could not be written to the lake ({exc}); retry later", "lake_write",
                                  retry_after=5) from None

    def _committed(self, files: int, latencies: list[float]) -> None:
        self.metrics.files.inc(files)
        for seconds in latencies:
            self.metrics.flush_latency.observe(seconds)

    async def healthz(self, request: Request) -> Response:
        """``GET /healthz``: 200 ``ok``, or 503 ``unhealthy`` with the reason while the lake refuses commits (the
        reason, the lake path and where its span tables are only for a loopback client with no token set, or with the token)."""
        failing = self.writer.failing if self.writer is not None else None
        body = {"status": "ok" if failing is None else "unhealthy"}
        if trusted(request, self.token):
            body["lake"] = str(self.lake.root)
            body["spans"] = self.lake.location.table_uri(self.lake.root, "").rstrip("/")  # a folder or s3://...
            if failing is not None:
                body["reason"] = failing.reason()
        return JSONResponse(body, status_code=200 if failing is None else 503)

    async def prometheus(self, request: Request) -> Response:
        """``GET /metrics``: Prometheus text."""
        return Response(generate_latest(self.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    async def compact_loop(self) -> None:
        """Merge the small files of idle (or crowded) partitions and keep the span tables' log short, forever."""
        config = self.config
        compact_every = max(1.0, min(config.compact_idle_s / 2, COMPACT_CHECK_EVERY_S))  # a crowded partition needs no idle time
        due = time.monotonic() + compact_every
        while True:  # the log is cleaned every few seconds, whatever compact_idle_s says: every commit lists it
            await asyncio.sleep(min(compact_every, LOG_CLEAN_EVERY_S))
            try:
                if time.monotonic() < due:
                    await asyncio.to_thread(self.lake.clean_logs)
                    continue
                due = time.monotonic() + compact_every
                merged = await asyncio.to_thread(self.lake.compact, min_files=config.compact_min_files,
                                                 idle_s=config.compact_idle_s, max_files=config.compact_max_files)
                self.metrics.compactions.inc(merged)
            except ConcurrentCompaction as exc:
                log.error("%s", exc)
            except Exception:
                log.exception("compaction or log cleanup failed; the small files and the log entries are kept")

    @contextlib.asynccontextmanager
    async def lifespan(self, app: Starlette):
        """Run the writer thread and the compactor while the app serves."""
        for lane in LANES:  # created (or opened) before the first request, which would otherwise wait for it
            await asyncio.to_thread(self.lake.table, lane)
        await asyncio.to_thread(otlp_wire.warm_up)  # the request reader compiled, or loaded from numba's cache
        self.writer = GroupCommitWriter(self.lake, flush_interval_s=self.config.flush_interval_ms / 1000, on_commit=self._committed)
        self.converter = Converter(self.writer.submit, max_body_bytes=self.config.max_body_bytes,
                                   max_partitions=self.config.max_partitions_per_request,
                                   on_batch=self.metrics.conversion_requests.observe)
        # one compactor per table: delta-rs lets two concurrent compactions both commit (rows stored twice), so
        # several collector processes (or hosts) leave compaction to one `arclight compact`
        compacts = self.config.compact and self.config.workers == 1 and not self.lake.location.uri
        if self.config.compact and not compacts:
            log.warning("this collector does not compact (collector.workers > 1 or span tables on object storage): "
                        "run `arclight compact` from one place, for example every few minutes (it also keeps the "
                        "span tables' log short, which every commit lists)")
        compactor = asyncio.create_task(self.compact_loop()) if compacts else None
        try:
            yield
        finally:
            if compactor is not None:
                compactor.cancel()
            self.converter.close()
            self.writer.close()


def build_app(config: CollectorConfig, lake_root: str | os.PathLike[str]) -> Starlette:
    """Build the collector's ASGI app writing into the lake at ``lake_root``."""
    token = config.token or os.environ.get("ARCLIGHT_COLLECTOR_TOKEN") or None
    if config.host not in LOOPBACK_HOSTS and not token:
        raise ValueError(
            f"collector bound to {config.host!r} (not loopback) needs a bearer token: "
            "set collector.token in the config or ARCLIGHT_COLLECTOR_TOKEN"
        )
    lake = Lake(lake_root, retention_hours=config.retention_hours, log_retention_s=config.log_retention_s,
                checkpoint_interval=config.checkpoint_interval)
    receiver = TraceReceiver(config, lake, token)
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
    if token is not None and not has_token(request, token):
        raise RequestRejected(401, "missing or wrong bearer token: send 'Authorization: Bearer <collector token>'", "unauthorized")


def _error(status: int, reason: str, content_type: str, *, retry_after: int | None = None) -> Response:
    headers = {"Retry-After": str(retry_after)} if retry_after is not None else None
    if content_type == PROTOBUF:
        # OTLP clients expect a google.rpc.Status body; the reason is in the message field.
        from google.rpc.status_pb2 import Status

        return Response(Status(code=status, message=reason).SerializeToString(), status_code=status, media_type=PROTOBUF,
                        headers=headers)
    return JSONResponse({"error": reason}, status_code=status, headers=headers)


SETTINGS_ENV = "ARCLIGHT_COLLECTOR_SETTINGS"


def app_from_environment() -> Starlette:
    """The app of one collector worker process (uvicorn's factory; ``serve`` puts the settings in the environment)."""
    settings = json.loads(os.environ[SETTINGS_ENV])
    keep_freed_memory()
    return build_app(CollectorConfig.model_validate(settings["config"]), settings["lake_root"])


def serve(config: CollectorConfig, lake_root: str | os.PathLike[str], *, log_level: str = "info") -> None:
    """Run the collector in the foreground until interrupted.

    ``config.workers`` > 1 runs that many processes on one socket (uvicorn's worker processes); each
    decodes its own requests and commits to the same Delta tables (appends do not conflict).
    """
    options = {"host": config.host, "port": config.port, "log_level": log_level, "access_log": False,
               "timeout_graceful_shutdown": 10}
    if config.workers == 1:
        keep_freed_memory()  # a request's conversion buffers reuse the last one's pages
        uvicorn.run(build_app(config, lake_root), **options)
        return
    build_app(config, lake_root)  # refuse a bad setting (an open host without a token) before any worker starts
    os.environ[SETTINGS_ENV] = json.dumps({"config": config.model_dump(mode="json"), "lake_root": str(lake_root)})
    uvicorn.run("lightning_core.ingest.collector:app_from_environment", factory=True, workers=config.workers, **options)
