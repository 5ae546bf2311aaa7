"""OpenAI-compatible gateway in front of vLLM that records every model call as a span.

Agents point their OpenAI client at ``{gateway}/rollout/{rollout_id}/v1`` (training rollouts) or
``{gateway}/v1`` (production traffic); nothing else changes. For each call the gateway

- maps the client's ``model`` to the policy version serving now (``Router.resolve``),
- asks vLLM for token ids and logprobs, and strips from the answer what the client did not ask for,
- sends every call of one rollout to the same replica,
- records one span per call (per choice when ``n > 1``) with the exact token ids and logprobs.

Admin endpoints (bearer token when one is set): ``POST /admin/rollouts`` registers a rollout
(unknown rollout ids get 404), ``DELETE /admin/rollouts/{id}`` forgets it, ``GET /admin/policies``
lists policy versions, ``PUT /admin/policies/{name}`` switches a policy to a loaded adapter
atomically, ``POST /admin/policies/{name}/rollback`` switches back. See docs/serving.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import itertools
import json
import logging
import os
import random
import socket
import sqlite3
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, AsyncIterator, Iterator

import aiohttp
import orjson
import uvicorn
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import SpanContext, SpanKind, TraceFlags
from opentelemetry.trace.status import Status, StatusCode
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from lightning_core import names, semconv
from lightning_core.http_guard import LOOPBACK_HOSTS, foreign_browser, has_token, json_depth_over, trusted

log = logging.getLogger("arclight.gateway")

SERVICE_NAME = "arclight-gateway"
SCOPE = InstrumentationScope("arclight.gateway", "0.1.0")
MAX_JSON_DEPTH = 100
JSON_HEADERS = {"content-type": "application/json"}
SAMPLING_KEYS = ("temperature", "top_p", "top_k", "min_p", "max_tokens", "max_completion_tokens", "n", "seed",
                 "stop", "presence_penalty", "frequency_penalty", "repetition_penalty", "logit_bias")


class GatewayError(Exception):
    """A request the gateway answers with an OpenAI-style error body."""

    def __init__(self, status: int, message: str, kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.kind = status, message, kind


class ReplicaRefused(GatewayError):
    """A vLLM replica that refused the connection (down or restarting), as opposed to one that is slow or failing."""


class RolloutInfo(BaseModel):
    """A registered rollout: where its spans belong and which policy it samples from."""

    model_config = ConfigDict(extra="forbid")
    rollout_id: str
    run_id: str | None = None
    epoch: int | None = None
    task_id: str | None = Field(None, max_length=1024)
    attempt: int | None = None
    policy: str | None = Field(None, description="Policy every call of this rollout uses; default by model name.")

    # these values name lake folders or BIGINT columns: one bad one would make the collector
    # refuse every export batch that carries it, with other rollouts' spans in it
    _rollout_id = field_validator("rollout_id", mode="before")(lambda v: names.check_rollout_id(v))
    _run_id = field_validator("run_id", mode="before")(lambda v: None if v is None else names.check_run_id(v))
    _epoch = field_validator("epoch", mode="before")(lambda v: None if v is None else names.check_epoch(v))
    _attempt = field_validator("attempt", mode="before")(lambda v: None if v is None else names.check_count(v, what="attempt"))


class PolicySwitch(BaseModel):
    """Make ``served_model`` (an adapter loaded on every replica) the current version of a policy."""

    model_config = ConfigDict(extra="forbid")
    served_model: str = Field(min_length=1)
    version: int = Field(ge=0)


@dataclass
class PolicyState:
    """A policy's current served model and the earlier versions still loaded (newest first)."""

    name: str
    served_model: str | None = None
    version: int = 0
    history: list[tuple[str, int]] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        """Return the state as JSON-ready data."""
        return {"name": self.name, "served_model": self.served_model, "version": self.version,
                "history": [{"served_model": m, "version": v} for m, v in self.history]}


@dataclass
class Target:
    """Where one call goes: the served model name, its policy and version, the replica, and the replicas to fail over to."""

    served_model: str
    policy: str | None
    version: int
    replica: str
    replicas: list[str] = field(default_factory=list)


class GatewayState:
    """Rollout registrations and the policy table in SQLite, shared by every gateway process that opens the same file.

    One process uses an in-memory database. Several processes behind one address (``gateway.workers``) open one
    file: a registration or a policy switch made through any of them is seen by all, since every call reads its
    rollout by primary key and reloads the (small) policy table whenever another process committed
    (``PRAGMA data_version``). Registrations live as long as the gateway; nothing here needs to survive it.
    """

    def __init__(self, path: str | os.PathLike | None = None):
        self.path = str(path) if path else ":memory:"
        self.db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False, timeout=30)
        if self.path != ":memory:":
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA synchronous=NORMAL")  # WAL: no fsync per registration; the state dies with the gateway
        self.db.execute("CREATE TABLE IF NOT EXISTS rollouts (rollout_id TEXT PRIMARY KEY, info TEXT NOT NULL)")
        self.db.execute("CREATE TABLE IF NOT EXISTS policies (name TEXT PRIMARY KEY, served_model TEXT, "
                        "version INTEGER NOT NULL, history TEXT NOT NULL)")
        # flush requests reach every process: /admin/flush raises the generation, each process flushes and acks it
        self.db.execute("CREATE TABLE IF NOT EXISTS processes (instance TEXT PRIMARY KEY, flushed INTEGER NOT NULL, "
                        "seen REAL NOT NULL)")
        self.db.execute("CREATE TABLE IF NOT EXISTS flushes (id INTEGER PRIMARY KEY CHECK (id = 0), generation INTEGER)")
        self.db.execute("INSERT OR IGNORE INTO flushes VALUES (0, 0)")
        self._seen: dict[str, int] = {}

    def changed(self, reader: str = "policies") -> bool:
        """True when another connection committed since ``reader`` last asked."""
        version = self.db.execute("PRAGMA data_version").fetchone()[0]
        changed, self._seen[reader] = version != self._seen.get(reader), version
        return changed

    def flush_generation(self) -> int:
        return self.db.execute("SELECT generation FROM flushes").fetchone()[0]

    def request_flush(self) -> int:
        """Ask every process to flush; the generation they ack."""
        return self.db.execute("UPDATE flushes SET generation = generation + 1 RETURNING generation").fetchone()[0]

    def ack(self, instance: str, generation: int) -> None:
        """``instance`` is alive and has flushed up to ``generation``."""
        self.db.execute("INSERT INTO processes VALUES (?, ?, ?) ON CONFLICT (instance) DO UPDATE SET "
                        "flushed = max(flushed, excluded.flushed), seen = excluded.seen", (instance, generation, time.time()))

    def unflushed(self, generation: int, *, alive_s: float) -> list[str]:
        """The live processes (seen within ``alive_s``) that have not flushed ``generation`` yet."""
        return [r[0] for r in self.db.execute("SELECT instance FROM processes WHERE flushed < ? AND seen > ?",
                                              (generation, time.time() - alive_s)).fetchall()]

    def leave(self, instance: str) -> None:
        self.db.execute("DELETE FROM processes WHERE instance = ?", (instance,))

    def put_rollout(self, info: RolloutInfo) -> None:
        self.db.execute("INSERT OR REPLACE INTO rollouts VALUES (?, ?)", (info.rollout_id, info.model_dump_json()))

    def get_rollout(self, rollout_id: str) -> str | None:
        row = self.db.execute("SELECT info FROM rollouts WHERE rollout_id = ?", (rollout_id,)).fetchone()
        return row[0] if row else None

    def delete_rollout(self, rollout_id: str) -> bool:
        return self.db.execute("DELETE FROM rollouts WHERE rollout_id = ?", (rollout_id,)).rowcount > 0

    def count_rollouts(self) -> int:
        return self.db.execute("SELECT count(*) FROM rollouts").fetchone()[0]

    def load_policies(self) -> dict[str, PolicyState]:
        rows = self.db.execute("SELECT name, served_model, version, history FROM policies").fetchall()
        return {name: PolicyState(name, model, version, [tuple(h) for h in json.loads(history)])
                for name, model, version, history in rows}

    @contextlib.contextmanager
    def policy_update(self) -> Iterator[dict[str, PolicyState]]:
        """Read, change and write the policy table as one transaction (two processes switching never interleave)."""
        self.db.execute("BEGIN IMMEDIATE")
        try:
            policies = self.load_policies()
            yield policies
            self.db.executemany("INSERT OR REPLACE INTO policies VALUES (?, ?, ?, ?)",
                                [(p.name, p.served_model, p.version, json.dumps(p.history)) for p in policies.values()])
            self.db.execute("COMMIT")
        except BaseException:
            self.db.execute("ROLLBACK")
            raise


class Router:
    """Maps rollouts to replicas and client model names to the policy versions serving now.

    A rollout's replica is a pure function of its id and the upstream list (rendezvous hashing), so every gateway
    process, on any host, sends a rollout's calls to the same replica without asking the others; when a replica
    cannot be reached its rollouts move to their next replica in the same order. Registrations and the policy
    table live in a ``GatewayState`` (shared by the processes of one gateway).
    """

    DOWN_FOR_S = 5.0  # an unreachable replica is skipped this long before it is tried again

    def __init__(self, *, upstreams: list[str], base_model: str, policies: list[str], state: GatewayState | None = None):
        if not upstreams:
            raise ValueError("the gateway needs at least one vLLM upstream URL")
        # "NAME=URL" puts a replica in the group of the policy (or the base model) NAME: that target's calls go
        # only to its group (merged weights per policy, base weights for frozen agents); plain URLs serve the rest
        self.groups: dict[str | None, list[str]] = {}
        for spec in upstreams:
            group, url = spec.split("=", 1) if "=" in spec.split("://", 1)[0] else (None, spec)
            self.groups.setdefault(group, []).append(url.rstrip("/").removesuffix("/v1"))
        self.upstreams = [u for urls in self.groups.values() for u in urls]
        self.default_upstreams = self.groups.get(None) or self.upstreams
        self.base_model = base_model
        self.state = state or GatewayState()
        with self.state.policy_update() as table:
            for name in policies or ["default"]:
                table.setdefault(name, PolicyState(name))
        self.policies = table
        self.default_policy = (policies or ["default"])[0]
        self._resources: dict[str, tuple[str, RolloutInfo, Resource]] = {}
        self._down: dict[str, float] = {}
        self._round_robin = itertools.cycle(self.default_upstreams)
        self._calls = itertools.count()
        self.instance = f"{socket.gethostname()}:{os.getpid()}"
        self.production_resource = Resource.create({semconv.SERVICE_NAME: SERVICE_NAME, semconv.SERVICE_INSTANCE_ID: self.instance})

    def refresh(self) -> None:
        """Reload the policy table when another gateway process changed the shared state."""
        if self.state.changed():
            self.policies = self.state.load_policies()

    def replicas_for(self, rollout_id: str, upstreams: list[str] | None = None) -> list[str]:
        """The rollout's replicas (of ``upstreams``, default the ungrouped ones) in preference order: highest
        ``blake2b(replica, rollout id)`` first."""
        return sorted(upstreams or self.default_upstreams, reverse=True,
                      key=lambda u: hashlib.blake2b(f"{u}\0{rollout_id}".encode(), digest_size=8).digest())

    def group_upstreams(self, name: str | None) -> list[str]:
        """The replicas that serve policy (or base model) ``name``: its group, else the ungrouped ones."""
        return self.groups.get(name) or self.default_upstreams if name is not None else self.default_upstreams

    def _in_group(self, target: "Target", rollout: RolloutInfo | None) -> "Target":
        """``target`` sent to the replicas of its policy's group (the base model's for a call of the base model)."""
        group = target.policy if target.policy is not None else self.base_model
        if group not in self.groups:
            return target
        urls = self.groups[group]
        if rollout is not None:
            replicas = self.live(self.replicas_for(rollout.rollout_id, urls))
        else:  # production traffic: round robin over the group
            first = next(self._calls) % len(urls)
            replicas = self.live(urls[first:] + urls[:first])
        return Target(target.served_model, target.policy, target.version, replicas[0], replicas)

    def live(self, candidates: list[str]) -> list[str]:
        """``candidates`` with the replicas marked down moved to the end (they are still tried last)."""
        now = time.monotonic()
        down = [u for u in candidates if self._down.get(u, 0.0) > now]
        return [u for u in candidates if u not in down] + down

    def mark_down(self, replica: str) -> None:
        """Skip ``replica`` for ``DOWN_FOR_S`` (it refused a connection); its rollouts use their next replica."""
        if self._down.get(replica, 0.0) <= time.monotonic():
            log.warning("vLLM replica %s cannot be reached: its rollouts go to their next replica for %.0f s",
                        replica, self.DOWN_FOR_S)
        self._down[replica] = time.monotonic() + self.DOWN_FOR_S

    def register(self, info: RolloutInfo) -> str:
        """Register (or re-register) a rollout; return the replica its calls will stick to."""
        self.refresh()
        if info.policy is not None and info.policy not in self.policies:
            raise GatewayError(400, f"policy {info.policy!r} is not served here; known policies: {sorted(self.policies)}")
        self.state.put_rollout(info)
        return self.live(self.replicas_for(info.rollout_id))[0]

    def forget(self, rollout_id: str) -> bool:
        """Forget a rollout; later calls with its id get 404 (from every process of the gateway)."""
        self._resources.pop(rollout_id, None)
        return self.state.delete_rollout(rollout_id)

    def rollout(self, rollout_id: str) -> tuple[RolloutInfo, list[str], Resource]:
        """Return a registered rollout, its replicas in preference order and its span resource, or raise 404."""
        text = self.state.get_rollout(rollout_id)
        if text is None:
            self._resources.pop(rollout_id, None)
            raise GatewayError(404, f"rollout {rollout_id!r} is not registered: POST /admin/rollouts first "
                                    "(or use /v1/... for traffic outside rollouts)", "not_found_error")
        cached = self._resources.get(rollout_id)
        if cached is None or cached[0] != text:
            info = RolloutInfo.model_validate_json(text)
            attrs = {semconv.SERVICE_NAME: SERVICE_NAME, semconv.SERVICE_INSTANCE_ID: self.instance,
                     semconv.ROLLOUT_ID: info.rollout_id}
            for key, value in ((semconv.RUN_ID, info.run_id), (semconv.EPOCH, info.epoch),
                               (semconv.TASK_ID, info.task_id), (semconv.ATTEMPT, info.attempt)):
                if value is not None:
                    attrs[key] = value
            if len(self._resources) > 100_000:
                self._resources.clear()
            cached = self._resources[rollout_id] = (text, info, Resource.create(attrs))
        return cached[1], self.live(self.replicas_for(rollout_id)), cached[2]

    def resolve(self, requested: Any, rollout: RolloutInfo | None, replicas: list[str] | None) -> Target:
        """Pick the served model: an exact loaded version, the rollout's policy, a policy named by ``model``, or the default."""
        self.refresh()
        if not replicas:
            first = next(self._round_robin)
            replicas = self.live([first, *(u for u in self.upstreams if u != first)])
        if isinstance(requested, str):
            if requested == self.base_model:
                return self._in_group(Target(self.base_model, None, 0, replicas[0], replicas), rollout)
            for state in self.policies.values():
                if requested == state.served_model:
                    return self._in_group(Target(requested, state.name, state.version, replicas[0], replicas), rollout)
                for model, version in state.history:
                    if requested == model:
                        return self._in_group(Target(requested, state.name, version, replicas[0], replicas), rollout)
        name = (rollout.policy if rollout is not None and rollout.policy else None) \
            or (requested if requested in self.policies else self.default_policy)
        state = self.policies[name]
        return self._in_group(Target(state.served_model or self.base_model, name, state.version, replicas[0], replicas), rollout)

    def switch(self, policy: str, update: PolicySwitch, *, keep: int) -> PolicyState:
        """Make ``update`` the policy's current version; the old one becomes the first rollback."""
        with self.state.policy_update() as table:
            state = table.setdefault(policy, PolicyState(policy))
            if state.served_model is not None and state.served_model != update.served_model:
                state.history.insert(0, (state.served_model, state.version))
            state.history = [(m, v) for m, v in state.history if m != update.served_model][: max(keep - 1, 0)]
            state.served_model, state.version = update.served_model, update.version
        self.policies = table
        return state

    def rollback(self, policy: str) -> PolicyState:
        """Switch a policy back to its previous version (still loaded); 409 when there is none."""
        with self.state.policy_update() as table:
            state = table.get(policy)
            if state is None:
                raise GatewayError(404, f"policy {policy!r} is not served here", "not_found_error")
            if not state.history:
                raise GatewayError(409, f"policy {policy!r} has no earlier version loaded to roll back to", "conflict")
            model, version = state.history.pop(0)
            state.served_model, state.version = model, version
        self.policies = table
        return state


class GatewayMetrics:
    """Prometheus metrics of one gateway, in their own registry."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("arclight_gateway_requests", "Model calls answered.", ["endpoint", "status"], registry=self.registry)
        self.latency = Histogram(
            "arclight_gateway_request_latency_seconds", "Time from request to the last byte of the answer.", ["endpoint"],
            buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120), registry=self.registry,
        )
        self.tokens = Counter("arclight_gateway_tokens", "Tokens processed.", ["kind"], registry=self.registry)
        self.in_flight = Gauge("arclight_gateway_in_flight", "Calls being answered now.", registry=self.registry)
        self.spans = Counter("arclight_gateway_spans_recorded", "LLM-call spans handed to the exporter.", registry=self.registry)
        self.rollouts = Gauge("arclight_gateway_rollouts", "Registered rollouts.", registry=self.registry)
        self.policy_version = Gauge("arclight_gateway_policy_version", "Current version per policy.", ["policy"], registry=self.registry)


@dataclass
class Capture:
    """What one model call produced, gathered from a JSON answer or an SSE stream."""

    response_id: str | None = None
    response_model: str | None = None
    prompt_token_ids: list[int] | None = None
    choices: dict[int, dict[str, Any]] = field(default_factory=dict)
    usage: dict[str, Any] | None = None

    def choice(self, index: int) -> dict[str, Any]:
        """Return the accumulator of one choice."""
        return self.choices.setdefault(index, {"token_ids": [], "logprobs": [], "text": [], "tool_calls": [], "finish_reason": None})


class SpanRecorder:
    """Builds one span per model call and exports it in batches (resources carry the rollout context)."""

    def __init__(self, exporter: SpanExporter, metrics: GatewayMetrics, *, delay_ms: int = 200):
        self.processor = BatchSpanProcessor(exporter, max_queue_size=65536, max_export_batch_size=1024,
                                            schedule_delay_millis=delay_ms)
        self.metrics = metrics

    def record(self, *, name: str, resource: Resource, parent: SpanContext | None, start_ns: int, end_ns: int,
               attributes: dict[str, Any], error: str | None = None) -> None:
        """Hand one finished span to the batch exporter."""
        trace_id = parent.trace_id if parent is not None else random.getrandbits(128)
        context = SpanContext(trace_id, random.getrandbits(64), is_remote=False, trace_flags=TraceFlags(TraceFlags.SAMPLED))
        status = Status(StatusCode.ERROR, error) if error else Status(StatusCode.UNSET)
        span = ReadableSpan(
            name=name, context=context, parent=parent, resource=resource, attributes=attributes,
            kind=SpanKind.CLIENT, status=status, start_time=start_ns, end_time=end_ns, instrumentation_scope=SCOPE,
        )
        self.processor.on_end(span)
        self.metrics.spans.inc()

    def flush(self, timeout_s: float = 10.0) -> bool:
        """Export every recorded span now."""
        return self.processor.force_flush(int(timeout_s * 1000))

    def shutdown(self) -> None:
        """Flush and stop the exporter."""
        self.processor.shutdown()


def parse_traceparent(header: str | None) -> SpanContext | None:
    """Return the caller's span context from a W3C ``traceparent`` header, if it has a valid one."""
    if not header:
        return None
    parts = header.strip().split("-")
    if len(parts) < 4 or len(parts[1]) != 32 or len(parts[2]) != 16:
        return None
    try:
        trace_id, span_id, flags = int(parts[1], 16), int(parts[2], 16), int(parts[3][:2], 16)
    except ValueError:
        return None
    if not trace_id or not span_id:
        return None
    return SpanContext(trace_id, span_id, is_remote=True, trace_flags=TraceFlags(flags))


class Gateway:
    """The gateway's request handlers, sharing the router, the metrics, the span recorder and one HTTP client."""

    def __init__(self, *, router: Router, recorder: SpanRecorder, metrics: GatewayMetrics, token: str | None,
                 upstream_timeout_s: float, max_body_bytes: int, keep_versions: int):
        self.router, self.recorder, self.metrics, self.token = router, recorder, metrics, token
        self.upstream_timeout_s, self.max_body_bytes, self.keep_versions = upstream_timeout_s, max_body_bytes, keep_versions
        self.client: aiohttp.ClientSession | None = None
        self.flushed = 0

    @contextlib.asynccontextmanager
    async def lifespan(self, app: Starlette) -> AsyncIterator[None]:
        """Hold one pooled HTTP client to the upstreams while the app serves; flush spans at the end."""
        # aiohttp rather than httpx: httpx's pool scans every connection per request (profiled: 1.4M is_idle
        # calls for 1,400 requests at 16 clients), which capped the gateway at a few hundred calls/s
        connector = aiohttp.TCPConnector(limit=0, keepalive_timeout=60, enable_cleanup_closed=True)
        self.client = aiohttp.ClientSession(
            connector=connector, json_serialize=lambda v: orjson.dumps(v).decode(), read_bufsize=1 << 20,
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=10.0, sock_read=self.upstream_timeout_s))
        state, instance = self.router.state, self.router.instance
        state.ack(instance, state.flush_generation())
        watcher = asyncio.create_task(self.watch_flushes())
        try:
            yield
        finally:
            watcher.cancel()
            await self.client.close()
            self.recorder.shutdown()
            state.leave(instance)

    async def watch_flushes(self) -> None:
        """Flush when another process of this gateway was asked to (``/admin/flush``), and say this process is alive."""
        state, instance = self.router.state, self.router.instance
        beat = 0.0
        while True:
            await asyncio.sleep(0.05)
            try:
                if state.changed("flushes"):
                    generation = state.flush_generation()
                    if generation > self.flushed:
                        await asyncio.to_thread(self.recorder.flush)
                        self.flushed = generation
                        state.ack(instance, generation)
                if time.monotonic() - beat > 1.0:
                    beat = time.monotonic()
                    state.ack(instance, self.flushed)
            except sqlite3.Error as exc:  # a busy file: try again on the next tick
                log.warning("gateway state: %s", exc)

    def authorize(self, request: Request) -> None:
        """Raise a 401 unless the request carries the bearer token (when one is set)."""
        if self.token is not None and not has_token(request, self.token):
            raise GatewayError(401, "missing or wrong bearer token: send 'Authorization: Bearer <gateway token>' "
                                    "(the OpenAI client sends its api_key this way)", "authentication_error")

    async def read_json(self, request: Request) -> dict[str, Any]:
        """Return the body as a JSON object, or raise 413 (checked while it streams in) or 400."""
        limit = self.max_body_bytes
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > limit:
            raise GatewayError(413, f"body of {declared} bytes is over the limit of {limit} bytes")
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise GatewayError(413, f"body is over the limit of {limit} bytes")
            chunks.append(chunk)
        raw = b"".join(chunks)
        try:
            data = orjson.loads(raw)
        except orjson.JSONDecodeError as exc:
            if "depth limit" in str(exc):
                raise GatewayError(400, f"body is nested more than {MAX_JSON_DEPTH} levels deep") from None
            raise GatewayError(400, f"body is not valid JSON: {exc}") from None
        # nesting cannot be deeper than the number of brackets: count them in C before walking the tree
        if raw.count(b"[") + raw.count(b"{") > MAX_JSON_DEPTH and json_depth_over(data, MAX_JSON_DEPTH):
            raise GatewayError(400, f"body is nested more than {MAX_JSON_DEPTH} levels deep")
        if not isinstance(data, dict):
            raise GatewayError(400, f"body must be a JSON object, found {type(data).__name__}")
        return data

    def authorize_admin(self, request: Request) -> None:
        """The token check, and without a token the browser checks of a loopback server (Origin, Host)."""
        self.authorize(request)
        reason = foreign_browser(request) if self.token is None else None
        if reason is not None:
            raise GatewayError(403, reason, "permission_error")

    async def post_upstream(self, call: "Call", path: str, body: bytes) -> aiohttp.ClientResponse:
        """POST to the call's replica; a replica that refuses the connection is marked down and the next one of the
        rollout's replicas is tried (the same order in every gateway process). The caller releases the response."""
        replicas = call.target.replicas or [call.target.replica]
        for i, replica in enumerate(replicas):
            call.target.replica = replica
            try:
                response = await self.client.post(f"{replica}/v1/{path}", data=body, headers=JSON_HEADERS)
                if response.status == 404 and i + 1 < len(replicas) and b"does not exist" in await response.read():
                    # a replica restarted after the redeploy has no adapter of this version yet: the next one has
                    response.release()
                    log.warning("vLLM replica %s does not serve %s (restarted since the redeploy?): the call goes to %s",
                                replica, call.target.served_model, replicas[i + 1])
                    continue
                return response
            except aiohttp.ClientConnectorError as exc:
                self.router.mark_down(replica)
                if i + 1 == len(replicas):
                    raise GatewayError(502, f"vLLM at {replica} could not be reached: {exc!r}", "upstream_unavailable") from None
            except (asyncio.TimeoutError, aiohttp.ServerTimeoutError):
                raise GatewayError(504, f"vLLM at {replica} did not answer within {self.upstream_timeout_s:.0f} s",
                                   "upstream_timeout") from None
            except aiohttp.ClientError as exc:
                raise GatewayError(502, f"vLLM at {replica} could not be reached: {exc!r}", "upstream_unavailable") from None
        raise AssertionError("unreachable")

    async def completions(self, request: Request) -> Response:
        """``POST [/rollout/{id}]/v1/chat/completions`` and ``.../v1/completions``: forward, strip, record."""
        operation = "chat" if request.url.path.endswith("/chat/completions") else "text_completion"
        endpoint = "chat" if operation == "chat" else "completions"
        start_ns, started = time.time_ns(), time.perf_counter()
        router = self.router
        try:
            self.authorize(request)
            rollout_id = request.path_params.get("rollout_id")
            info, replicas, resource = router.rollout(rollout_id) if rollout_id is not None else (None, None, router.production_resource)
            body = await self.read_json(request)
            validate_request(body, operation)
            target = router.resolve(body.get("model"), info, replicas)
        except GatewayError as exc:
            self.metrics.requests.labels(endpoint, str(exc.status)).inc()
            return error_response(exc)
        call = Call(operation=operation, body=body, target=target, resource=resource, start_ns=start_ns, started=started,
                    parent=parse_traceparent(request.headers.get("traceparent")))
        upstream_body = orjson.dumps(call.upstream_body())
        path = "chat/completions" if operation == "chat" else "completions"
        self.metrics.in_flight.inc()
        if body.get("stream"):
            return await self.stream(call, path, upstream_body, endpoint)
        try:
            try:
                upstream = await self.post_upstream(call, path, upstream_body)
                async with upstream:
                    content = await upstream.read()
            except (asyncio.TimeoutError, aiohttp.ServerTimeoutError):
                raise GatewayError(504, f"vLLM at {target.replica} did not answer within {self.upstream_timeout_s:.0f} s",
                                   "upstream_timeout") from None
            except aiohttp.ClientError as exc:
                raise GatewayError(502, f"vLLM at {target.replica} broke off its answer: {exc!r}", "upstream_unavailable") from None
            if upstream.status != 200:
                raise GatewayError(upstream.status, f"vLLM answered {upstream.status}: {upstream_message(content)}",
                                   "upstream_error")
            data = _json_object(content, target.replica)
            try:
                call.capture_json(data)
                call.strip_json(data)
            except (AttributeError, TypeError, ValueError, KeyError) as exc:
                raise GatewayError(502, f"vLLM at {target.replica} answered 200 with a JSON object that is not a "
                                        f"completion ({exc!r})", "upstream_error") from None
            self.finish(call, endpoint, "200")
            return Response(orjson.dumps(data), media_type="application/json")
        except GatewayError as exc:
            self.finish(call, endpoint, str(exc.status), error=exc.message, upstream_failed=exc.status >= 500)
            return error_response(exc)
        finally:
            self.metrics.in_flight.dec()

    async def stream(self, call: "Call", path: str, upstream_body: bytes, endpoint: str) -> Response:
        """Forward a streaming call: SSE chunks are captured and stripped on their way to the client."""
        metrics = self.metrics
        try:
            upstream = await self.post_upstream(call, path, upstream_body)
        except GatewayError as err:
            metrics.in_flight.dec()
            self.finish(call, endpoint, str(err.status), error=err.message, upstream_failed=err.status >= 500)
            return error_response(err)
        if upstream.status != 200:
            content = await upstream.read()
            upstream.release()
            metrics.in_flight.dec()
            err = GatewayError(upstream.status, f"vLLM answered {upstream.status}: {upstream_message(content)}", "upstream_error")
            self.finish(call, endpoint, str(upstream.status), error=err.message, upstream_failed=upstream.status >= 500)
            return error_response(err)

        async def events() -> AsyncIterator[bytes]:
            error: str | None = None
            upstream_failed = True  # an error below is vLLM's (a broken or malformed stream) unless the client left
            try:
                async for raw in upstream.content:
                    line = raw.strip()
                    if not line.startswith(b"data:"):
                        continue
                    payload = line[5:].strip()
                    if payload == b"[DONE]":
                        yield b"data: [DONE]\n\n"
                        continue
                    try:
                        chunk = _json_object(payload, call.target.replica)
                        if "error" in chunk and "choices" not in chunk:
                            error = f"vLLM stream error: {upstream_message(payload)}"
                        call.capture_chunk(chunk)
                        keep = call.strip_chunk(chunk)
                    except (GatewayError, AttributeError, TypeError, ValueError, KeyError) as exc:
                        # never pass a line the client cannot parse: end the stream with an error event
                        err = exc if isinstance(exc, GatewayError) else GatewayError(
                            502, f"vLLM at {call.target.replica} sent a stream chunk that is not a completion chunk ({exc!r})",
                            "upstream_error")
                        error = err.message
                        yield b"data: " + orjson.dumps(error_body(err)) + b"\n\n"
                        break
                    if keep:
                        yield b"data: " + orjson.dumps(chunk) + b"\n\n"
            except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
                error = f"vLLM stream from {call.target.replica} broke off: {exc!r}"
                raise
            except asyncio.CancelledError:
                error, upstream_failed = "client disconnected before the stream ended", False
                raise
            finally:
                upstream.release()
                metrics.in_flight.dec()
                self.finish(call, endpoint, "200" if error is None else "stream_error", error=error,
                            upstream_failed=error is not None and upstream_failed)

        return StreamingResponse(events(), media_type="text/event-stream", headers={"cache-control": "no-cache"})

    def finish(self, call: "Call", endpoint: str, status: str, *, error: str | None = None,
               upstream_failed: bool = False) -> None:
        """Count the call and record its span(s); ``upstream_failed``: our side failed it (vLLM unreachable, too slow,
        a 5xx or a broken stream), not the client's request -- the rollout's data is then not the agent's."""
        metrics = self.metrics
        elapsed = time.perf_counter() - call.started
        metrics.requests.labels(endpoint, status).inc()
        metrics.latency.labels(endpoint).observe(elapsed)
        usage = call.capture.usage or {}
        metrics.tokens.labels("prompt").inc(usage.get("prompt_tokens") or 0)
        metrics.tokens.labels("completion").inc(usage.get("completion_tokens") or 0)
        end_ns = call.start_ns + int(elapsed * 1e9)
        for attributes in call.span_attributes(latency_ms=elapsed * 1000, error=error, upstream_failed=upstream_failed):
            self.recorder.record(name=f"{call.operation} {call.target.served_model}", resource=call.resource, parent=call.parent,
                                 start_ns=call.start_ns, end_ns=end_ns, attributes=attributes, error=error)

    async def get_upstream(self, replica: str, path: str) -> tuple[int, bytes]:
        """GET from one replica; its status and body."""
        try:
            async with self.client.get(f"{replica}{path}", timeout=aiohttp.ClientTimeout(total=30)) as r:
                return r.status, await r.read()
        except aiohttp.ClientConnectorError as exc:
            raise ReplicaRefused(502, f"vLLM at {replica} could not be reached: {exc!r}", "upstream_unavailable") from None
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
            raise GatewayError(502, f"vLLM at {replica} could not be reached: {exc!r}", "upstream_unavailable") from None

    async def models(self, request: Request) -> Response:
        """``GET [/rollout/{id}]/v1/models``: the replica's models plus one entry per policy."""
        router = self.router
        try:
            self.authorize(request)
            rollout_id = request.path_params.get("rollout_id")
            replica = router.rollout(rollout_id)[1][0] if rollout_id is not None else router.live(router.upstreams)[0]
            data = _json_object((await self.get_upstream(replica, "/v1/models"))[1], replica)
        except GatewayError as exc:
            return error_response(exc)
        router.refresh()
        created = int(time.time())
        data.setdefault("data", []).extend(
            {"id": name, "object": "model", "created": created, "owned_by": "arclight", "root": s.served_model or router.base_model}
            for name, s in router.policies.items()
        )
        return JSONResponse(data)

    async def register_rollout(self, request: Request) -> Response:
        """``POST /admin/rollouts``: register a rollout; answer with its base URL."""
        try:
            self.authorize_admin(request)
            info = RolloutInfo.model_validate(await self.read_json(request))
            replica = self.router.register(info)
        except ValidationError as exc:
            return error_response(GatewayError(422, f"rollout registration is invalid: {exc.errors()[0]['loc']}: {exc.errors()[0]['msg']}"))
        except GatewayError as exc:
            return error_response(exc)
        base = str(request.base_url).rstrip("/")
        return JSONResponse({"rollout_id": info.rollout_id, "base_url": f"{base}/rollout/{info.rollout_id}/v1", "replica": replica},
                            status_code=201)

    async def forget_rollout(self, request: Request) -> Response:
        """``DELETE /admin/rollouts/{id}``."""
        try:
            self.authorize_admin(request)
        except GatewayError as exc:
            return error_response(exc)
        known = self.router.forget(request.path_params["rollout_id"])
        return Response(status_code=204 if known else 404)

    async def list_policies(self, request: Request) -> Response:
        """``GET /admin/policies``."""
        try:
            self.authorize_admin(request)
        except GatewayError as exc:
            return error_response(exc)
        router = self.router
        return JSONResponse({"base_model": router.base_model, "upstreams": router.upstreams,
                             "groups": {name: urls for name, urls in router.groups.items() if name is not None},
                             "policies": {n: s.as_dict() for n, s in router.policies.items()}})

    async def switch_policy(self, request: Request) -> Response:
        """``PUT /admin/policies/{name}``: switch to an adapter every replica has loaded."""
        name = request.path_params["policy"]
        try:
            self.authorize_admin(request)
            update = PolicySwitch.model_validate(await self.read_json(request))
            await self.check_loaded(update.served_model, replicas=self.router.group_upstreams(name))
            policy = self.router.switch(name, update, keep=self.keep_versions)
        except ValidationError as exc:
            return error_response(GatewayError(422, f"policy switch is invalid: {exc.errors()[0]['loc']}: {exc.errors()[0]['msg']}"))
        except GatewayError as exc:
            return error_response(exc)
        self.metrics.policy_version.labels(name).set(policy.version)
        log.info("policy %s now serves %s (version %d)", name, policy.served_model, policy.version)
        return JSONResponse(policy.as_dict())

    async def rollback_policy(self, request: Request) -> Response:
        """``POST /admin/policies/{name}/rollback``."""
        name = request.path_params["policy"]
        try:
            self.authorize_admin(request)
            policy = self.router.rollback(name)
        except GatewayError as exc:
            return error_response(exc)
        self.metrics.policy_version.labels(name).set(policy.version)
        return JSONResponse(policy.as_dict())

    async def check_loaded(self, served_model: str, *, replicas: list[str]) -> None:
        """Refuse to switch to a model that some of the policy's reachable replicas does not serve.

        A replica that refuses the connection (down, restarting) is skipped when another one serves the model: a
        redeploy must not wait for a dead replica, and calls fall over from a replica without the model. One that
        answers too slowly or with an error still refuses the switch.
        """
        serving = 0
        for replica in replicas:
            try:
                status, content = await self.get_upstream(replica, "/v1/models")
            except ReplicaRefused as exc:  # a slow or failing replica is not skipped: it may lack the model
                log.warning("switching to %s without vLLM replica %s: %s", served_model, replica, exc)
                self.router.mark_down(replica)
                continue
            try:
                listed = orjson.loads(content) if status == 200 else None
                names = {m.get("id") for m in listed.get("data", [])}
            except (orjson.JSONDecodeError, AttributeError, TypeError) as exc:
                raise GatewayError(502, f"vLLM at {replica} could not be asked for its models: {status} {exc!r}",
                                   "upstream_unavailable") from None
            if served_model not in names:
                raise GatewayError(409, f"{served_model!r} is not loaded on {replica} (it serves {sorted(names)}): "
                                        "load the adapter on every replica first", "conflict")
            serving += 1
        if not serving:
            raise GatewayError(502, f"none of the replicas {replicas} could be reached to check that they serve {served_model!r}",
                               "upstream_unavailable")

    async def healthz(self, request: Request) -> Response:
        """``GET /healthz``; the upstream URLs only for a loopback client (no token set) or with the token."""
        if not trusted(request, self.token):
            return JSONResponse({"status": "ok"})
        return JSONResponse({"status": "ok", "upstreams": self.router.upstreams})

    async def prometheus(self, request: Request) -> Response:
        """``GET /metrics``: Prometheus text (the registered-rollout count is taken now, not on every registration)."""
        self.metrics.rollouts.set(self.router.state.count_rollouts())
        return Response(generate_latest(self.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    async def flush(self, request: Request) -> Response:
        """``POST /admin/flush``: export every recorded span now."""
        try:
            self.authorize_admin(request)
        except GatewayError as exc:
            return error_response(exc)
        state, instance = self.router.state, self.router.instance
        generation = state.request_flush()
        ok = await asyncio.to_thread(self.recorder.flush)
        self.flushed = max(self.flushed, generation)
        state.ack(instance, self.flushed)
        # the other processes of this gateway flush within their next tick (50 ms) plus their export
        deadline = time.monotonic() + 30
        while (waiting := state.unflushed(generation, alive_s=5.0)) and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        ok = ok and not waiting
        body = {"flushed": ok} if not waiting else {"flushed": False, "not_flushed": waiting}
        return JSONResponse(body, status_code=200 if ok else 503)



def error_body(exc: GatewayError) -> dict[str, Any]:
    """An OpenAI-style error object."""
    return {"error": {"message": exc.message, "type": exc.kind, "code": exc.status}}


def error_response(exc: GatewayError) -> JSONResponse:
    """An OpenAI-style error body with the error's status."""
    return JSONResponse(error_body(exc), status_code=exc.status)


def _json_object(content: bytes, replica: str) -> dict[str, Any]:
    """An upstream answer (or stream chunk) as a JSON object; anything else is a 502."""
    try:
        data = orjson.loads(content)
    except orjson.JSONDecodeError:
        data = None
    if not isinstance(data, dict):
        raise GatewayError(502, f"vLLM at {replica} answered 200 with a body that is not a JSON object: "
                                f"{content[:200].decode(errors='replace')!r}", "upstream_error")
    return data


def build_app(
    *,
    upstreams: list[str],
    base_model: str,
    policies: list[str] | None = None,
    exporter: SpanExporter,
    token: str | None = None,
    upstream_timeout_s: float = 600.0,
    max_body_bytes: int = 8 * 1024 * 1024,
    keep_versions: int = 2,
    state_path: str | os.PathLike | None = None,
    export_delay_ms: int = 200,
) -> Starlette:
    """Return the gateway's Starlette app (spans go to ``exporter``; registrations and policies to ``state_path``,
    which every process of one gateway shares, or to memory)."""
    metrics = GatewayMetrics()
    router = Router(upstreams=upstreams, base_model=base_model, policies=policies or ["default"], state=GatewayState(state_path))
    gw = Gateway(router=router,
                 recorder=SpanRecorder(exporter, metrics, delay_ms=export_delay_ms), metrics=metrics, token=token,
                 upstream_timeout_s=upstream_timeout_s, max_body_bytes=max_body_bytes, keep_versions=keep_versions)
    routes = [
        Route("/rollout/{rollout_id}/v1/chat/completions", gw.completions, methods=["POST"]),
        Route("/rollout/{rollout_id}/v1/completions", gw.completions, methods=["POST"]),
        Route("/rollout/{rollout_id}/v1/models", gw.models, methods=["GET"]),
        Route("/v1/chat/completions", gw.completions, methods=["POST"]),
        Route("/v1/completions", gw.completions, methods=["POST"]),
        Route("/v1/models", gw.models, methods=["GET"]),
        Route("/admin/rollouts", gw.register_rollout, methods=["POST"]),
        Route("/admin/rollouts/{rollout_id}", gw.forget_rollout, methods=["DELETE"]),
        Route("/admin/policies", gw.list_policies, methods=["GET"]),
        Route("/admin/policies/{policy}", gw.switch_policy, methods=["PUT"]),
        Route("/admin/policies/{policy}/rollback", gw.rollback_policy, methods=["POST"]),
        Route("/admin/flush", gw.flush, methods=["POST"]),
        Route("/healthz", gw.healthz, methods=["GET"]),
        Route("/metrics", gw.prometheus, methods=["GET"]),
    ]
    app = Starlette(routes=routes, lifespan=gw.lifespan)
    app.state.router, app.state.metrics, app.state.recorder = gw.router, gw.metrics, gw.recorder
    return app


def validate_request(body: dict[str, Any], operation: str) -> None:
    """Raise a 400 for requests vLLM would misread or that cannot be recorded."""
    if operation == "chat":
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages or not all(isinstance(m, dict) for m in messages):
            raise GatewayError(400, "'messages' must be a non-empty list of message objects")
    elif not isinstance(body.get("prompt"), (str, list)) or body.get("prompt") in ("", []):
        raise GatewayError(400, "'prompt' must be a non-empty string or list")
    if "model" in body and not isinstance(body["model"], str):
        raise GatewayError(400, f"'model' must be a string, found {type(body['model']).__name__}")
    n = body.get("n", 1)
    if n is not None and (not isinstance(n, int) or isinstance(n, bool) or n < 1):
        raise GatewayError(400, f"'n' must be a positive integer, found {n!r}")


def upstream_message(content: bytes) -> str:
    """Return the error message inside a vLLM error body (or the body itself, shortened)."""
    try:
        data = json.loads(content)
        err = data.get("error", data)
        message = err.get("message") if isinstance(err, dict) else err
        return str(message or data)[:2000]
    except (ValueError, AttributeError):
        return content.decode(errors="replace")[:2000]


@dataclass
class Call:
    """One model call in flight: what the client asked for, what vLLM is asked, what came back."""

    operation: str
    body: dict[str, Any]
    target: Target
    resource: Resource
    start_ns: int
    started: float
    parent: SpanContext | None
    capture: Capture = field(default_factory=Capture)

    @property
    def wants_token_ids(self) -> bool:
        """True when the client asked vLLM for token ids itself."""
        return bool(self.body.get("return_token_ids"))

    @property
    def wants_logprobs(self) -> bool:
        """True when the client asked for logprobs itself."""
        value = self.body.get("logprobs")
        return bool(value) if self.operation == "chat" else value is not None

    @property
    def wants_usage(self) -> bool:
        """True when a streaming client asked for the usage chunk."""
        return bool((self.body.get("stream_options") or {}).get("include_usage"))

    def upstream_body(self) -> dict[str, Any]:
        """Return the request sent to vLLM: the client's, plus token ids, logprobs and usage."""
        body = dict(self.body)
        body["model"] = self.target.served_model
        body["return_token_ids"] = True
        if not self.wants_logprobs:
            if self.operation == "chat":
                body["logprobs"], body["top_logprobs"] = True, 0
            else:
                body["logprobs"] = 0
        if body.get("stream"):
            body["stream_options"] = {**(body.get("stream_options") or {}), "include_usage": True}
        return body

    def capture_json(self, data: dict[str, Any]) -> None:
        """Gather ids, token ids, logprobs, text and usage from a non-streaming answer."""
        self.capture_chunk(data, streamed=False)

    def capture_chunk(self, data: dict[str, Any], *, streamed: bool = True) -> None:
        """Gather what one answer or SSE chunk carries."""
        cap = self.capture
        cap.response_id = cap.response_id or data.get("id")
        cap.response_model = cap.response_model or data.get("model")
        if data.get("prompt_token_ids") is not None:
            cap.prompt_token_ids = data["prompt_token_ids"]
        if data.get("usage"):
            cap.usage = data["usage"]
        for choice in data.get("choices") or []:
            acc = cap.choice(choice.get("index", 0))
            if choice.get("prompt_token_ids") is not None:
                cap.prompt_token_ids = choice["prompt_token_ids"]
            acc["token_ids"].extend(choice.get("token_ids") or [])
            acc["logprobs"].extend(_sampled_logprobs(choice.get("logprobs"), self.operation))
            if self.operation == "chat":
                message = choice.get("delta" if streamed else "message") or {}
                if message.get("content"):
                    acc["text"].append(message["content"])
                if message.get("tool_calls"):
                    acc["tool_calls"].extend(message["tool_calls"])
            elif choice.get("text"):
                acc["text"].append(choice["text"])
            if choice.get("finish_reason"):
                acc["finish_reason"] = choice["finish_reason"]

    def strip_json(self, data: dict[str, Any]) -> None:
        """Remove from an answer what the client did not ask for."""
        self.strip_chunk(data)

    def strip_chunk(self, data: dict[str, Any]) -> bool:
        """Remove what the client did not ask for; False when the whole chunk should be dropped."""
        if not self.wants_token_ids:
            data.pop("prompt_token_ids", None)
            for choice in data.get("choices") or []:
                choice.pop("token_ids", None)
                choice.pop("prompt_token_ids", None)
        if not self.wants_logprobs:
            for choice in data.get("choices") or []:
                if "logprobs" in choice:
                    choice["logprobs"] = None
        if self.body.get("stream") and not self.wants_usage:
            if data.get("usage") is not None and not data.get("choices"):
                return False
            data.pop("usage", None)
        return True

    def span_attributes(self, *, latency_ms: float, error: str | None, upstream_failed: bool = False) -> list[dict[str, Any]]:
        """Return the attributes of this call's span(s): one per choice (one when there is none)."""
        cap, body, target = self.capture, self.body, self.target
        base: dict[str, Any] = {
            semconv.SPAN_KIND: semconv.KIND_LLM,
            semconv.GEN_AI_OPERATION_NAME: self.operation,
            semconv.GEN_AI_SYSTEM: "vllm",
            semconv.SERVED_MODEL: target.served_model,
            semconv.POLICY_VERSION: target.version,
            semconv.LLM_REPLICA: target.replica,
            semconv.LLM_LATENCY_MS: round(latency_ms, 3),
            semconv.LLM_STREAMED: bool(body.get("stream")),
            semconv.REQUEST_PARAMS: _dumps({k: body[k] for k in SAMPLING_KEYS if k in body}),
        }
        if isinstance(body.get("model"), str):
            base[semconv.GEN_AI_REQUEST_MODEL] = body["model"]
        if target.policy is not None:
            base[semconv.POLICY_NAME] = target.policy
        if self.operation == "chat":
            base[semconv.REQUEST_MESSAGES] = _dumps(body.get("messages"))
        else:
            prompt = body.get("prompt")
            base[semconv.REQUEST_PROMPT] = prompt if isinstance(prompt, str) else json.dumps(prompt)
        if cap.response_id:
            base[semconv.GEN_AI_RESPONSE_ID] = cap.response_id
        if cap.response_model:
            base[semconv.GEN_AI_RESPONSE_MODEL] = cap.response_model
        if cap.usage:
            base[semconv.GEN_AI_USAGE_INPUT_TOKENS] = int(cap.usage.get("prompt_tokens") or 0)
            base[semconv.GEN_AI_USAGE_OUTPUT_TOKENS] = int(cap.usage.get("completion_tokens") or 0)
        if cap.prompt_token_ids:
            base[semconv.PROMPT_TOKEN_IDS] = [int(t) for t in cap.prompt_token_ids]
        if error:
            base[semconv.ERROR_TYPE] = error[:2000]
        if upstream_failed:
            base[semconv.LLM_UPSTREAM_FAILED] = True
        if not cap.choices:
            return [base]
        spans = []
        for index in sorted(cap.choices):
            acc = cap.choices[index]
            attrs = dict(base)
            attrs[semconv.RESPONSE_TOKEN_IDS] = [int(t) for t in acc["token_ids"]]
            attrs[semconv.RESPONSE_LOGPROBS] = [float(x) for x in acc["logprobs"]]
            attrs[semconv.RESPONSE_TEXT] = "".join(acc["text"])
            if acc["tool_calls"]:
                attrs[semconv.RESPONSE_TOOL_CALLS] = json.dumps(acc["tool_calls"], ensure_ascii=False)
            if acc["finish_reason"]:
                attrs[semconv.GEN_AI_RESPONSE_FINISH_REASONS] = [str(acc["finish_reason"])]
            if len(cap.choices) > 1:
                attrs[semconv.CHOICE_INDEX] = index
            spans.append(attrs)
        return spans


def _dumps(value: Any) -> str:
    """JSON text of a request value for a span attribute (orjson; the json module for what orjson refuses, such as
    integers beyond 64 bits)."""
    try:
        return orjson.dumps(value, default=str).decode()
    except TypeError:
        return json.dumps(value, ensure_ascii=False, default=str)


def _sampled_logprobs(logprobs: Any, operation: str) -> list[float]:
    """Return the sampled tokens' logprobs from a chat or completions ``logprobs`` object."""
    if not logprobs:
        return []
    if operation == "chat":
        return [float(item["logprob"]) for item in logprobs.get("content") or [] if item.get("logprob") is not None]
    return [float(x) if x is not None else float("nan") for x in logprobs.get("token_logprobs") or []]


SETTINGS_ENV = "ARCLIGHT_GATEWAY_SETTINGS"


def _app(settings: dict[str, Any]) -> Starlette:
    """Build the app with an OTLP exporter to the collector from ``serve``'s settings."""
    # the span exporter's thread encodes batches while the event loop answers calls: hand the GIL back to the
    # loop after 0.5 ms rather than Python's 5 ms (p99 at one client 12.4 -> 6.3 ms in benchmarks/gateway_bench.py)
    sys.setswitchinterval(0.0005)
    from lightning_core.span_export import GatewaySpanExporter

    collector_token = settings.get("collector_token")
    headers = {"Authorization": f"Bearer {collector_token}"} if collector_token else None
    exporter = GatewaySpanExporter(f"{settings['collector_url'].rstrip('/')}/v1/traces", headers=headers)
    return build_app(upstreams=settings["upstreams"], base_model=settings["base_model"], policies=settings["policies"],
                     exporter=exporter, token=settings.get("token"), upstream_timeout_s=settings["upstream_timeout_s"],
                     max_body_bytes=settings["max_body_bytes"], keep_versions=settings["keep_versions"],
                     state_path=settings.get("state_path"), export_delay_ms=settings.get("export_delay_ms", 200))


def app_from_environment() -> Starlette:
    """The app of one gateway worker process (uvicorn's factory; ``serve`` puts the settings in the environment)."""
    logging.getLogger("httpx").setLevel(logging.WARNING)
    return _app(json.loads(os.environ[SETTINGS_ENV]))


def serve(
    *,
    host: str,
    port: int,
    upstreams: list[str],
    base_model: str,
    policies: list[str],
    collector_url: str,
    token: str | None = None,
    collector_token: str | None = None,
    upstream_timeout_s: float = 600.0,
    max_body_bytes: int = 8 * 1024 * 1024,
    keep_versions: int = 2,
    log_level: str = "info",
    workers: int = 1,
    state_path: str | os.PathLike | None = None,
    export_delay_ms: int = 200,
) -> None:
    """Run the gateway in the foreground until interrupted; spans go to the collector at ``collector_url``.

    ``workers`` > 1 runs that many processes on one socket (uvicorn's worker processes); they share rollout
    registrations and the policy table through the SQLite file ``state_path`` (a temporary one by default), and
    route a rollout to the same replica because the replica is a hash of the rollout id.
    """
    token = token or os.environ.get("ARCLIGHT_GATEWAY_TOKEN") or None
    if host not in LOOPBACK_HOSTS and not token:
        raise ValueError(f"gateway.host {host!r} is reachable from other machines: set gateway.token "
                         "(or $ARCLIGHT_GATEWAY_TOKEN) or bind to 127.0.0.1")
    if workers < 1:
        raise ValueError(f"gateway.workers must be at least 1, found {workers}")
    settings = {"upstreams": upstreams, "base_model": base_model, "policies": policies, "collector_url": collector_url,
                "token": token, "collector_token": collector_token or os.environ.get("ARCLIGHT_COLLECTOR_TOKEN") or None,
                "upstream_timeout_s": upstream_timeout_s, "max_body_bytes": max_body_bytes, "keep_versions": keep_versions,
                "state_path": str(state_path) if state_path else None, "export_delay_ms": export_delay_ms}
    options = {"host": host, "port": port, "log_level": log_level, "access_log": False, "timeout_graceful_shutdown": 10}
    if workers == 1:
        logging.getLogger("httpx").setLevel(logging.WARNING)
        uvicorn.run(_app(settings), **options)
        return
    with tempfile.TemporaryDirectory(prefix="arclight-gateway-") as tmp:
        settings["state_path"] = settings["state_path"] or str(Path(tmp) / "state.sqlite")
        GatewayState(settings["state_path"]).db.close()  # the schema exists before the workers open it
        os.environ[SETTINGS_ENV] = json.dumps(settings)
        uvicorn.run("lightning_core.gateway:app_from_environment", factory=True, workers=workers, **options)
