"""The gateway's request handlers: completions (plain and streamed) forwarded to the rollout's replica and recorded,
the models list, the admin endpoints (rollouts, policies, flush), health and metrics."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import sqlite3
import time
from pathlib import Path
from typing import Any, AsyncIterator

import aiohttp
import orjson
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import ValidationError
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from lightning_core import semconv
from lightning_core.common.http_guard import foreign_browser, has_token, json_depth_over, trusted
from lightning_core.serving.metrics import GatewayMetrics
from lightning_core.serving.recording import Call, SpanRecorder, parse_traceparent
from lightning_core.serving.router import GatewayError, PinnedVersionGone, PolicySwitch, ReplicaRefused, RolloutInfo, Router

log = logging.getLogger("arclight.gateway")


MAX_JSON_DEPTH = 100


JSON_HEADERS = {"content-type": "application/json"}


UPSTREAM_KEEPALIVE_S = 4.0  # under vLLM's own keep-alive (5 s)


def _without_call_ids(messages: Any) -> Any:
    """``messages`` without the ids that pair a tool call with its result (``tool_calls[].id``, ``tool_call_id``):
    what a call asks, as the model sees it, whatever ids an earlier reply was given."""
    if not isinstance(messages, list):
        return messages
    out = []
    for message in messages:
        if isinstance(message, dict):
            message = {k: v for k, v in message.items() if k != "tool_call_id"}
            if isinstance(message.get("tool_calls"), list):
                message["tool_calls"] = [{k: v for k, v in c.items() if k != "id"} if isinstance(c, dict) else c
                                         for c in message["tool_calls"]]
        out.append(message)
    return out


class Gateway:
    """The gateway's request handlers, sharing the router, the metrics, the span recorder and one HTTP client."""

    def __init__(self, *, router: Router, recorder: SpanRecorder, metrics: GatewayMetrics, token: str | None,
                 upstream_timeout_s: float, max_body_bytes: int, keep_versions: int,
                 weights_dir: str | None = None, agent_token: str | None = None, weights_uri: str | None = None):
        # token: the admin routes'; agent_token: what the model routes take besides it (None: they take any caller, a
        # loopback gateway without gateway.token)
        self.router, self.recorder, self.metrics, self.token = router, recorder, metrics, token
        self.agent_token = agent_token
        self.upstream_timeout_s, self.max_body_bytes, self.keep_versions = upstream_timeout_s, max_body_bytes, keep_versions
        self.weights_dir = weights_dir  # where POST /admin/weights fetches to (its storage's credentials: AWS_*)
        self.weights_uri = weights_uri  # serving.weights_uri: the only store POST /admin/weights fetches from
        self.client: aiohttp.ClientSession | None = None
        self.flushed = 0

    @contextlib.asynccontextmanager
    async def lifespan(self, app: Starlette) -> AsyncIterator[None]:
        """Hold one pooled HTTP client to the upstreams while the app serves; flush spans at the end."""
        # aiohttp rather than httpx: httpx's pool scans every connection per request (profiled: 1.4M is_idle
        # calls for 1,400 requests at 16 clients), which capped the gateway at a few hundred calls/s
        # an idle pooled connection is dropped before vLLM's server closes it (VLLM_HTTP_TIMEOUT_KEEP_ALIVE, 5 s): with
        # 60 s, a call that reused a connection as vLLM closed it failed ("Can not write request body"; twice in a
        # 16-epoch make train, rollouts run again as our failures)
        connector = aiohttp.TCPConnector(limit=0, keepalive_timeout=UPSTREAM_KEEPALIVE_S, enable_cleanup_closed=True)
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
        """The model routes: raise a 401 unless the request carries the agent token or the admin token (when the
        gateway has an agent token; without one, as on a loopback gateway with no gateway.token, anyone may call)."""
        if self.agent_token is not None and not (has_token(request, self.agent_token) or has_token(request, self.token)):
            raise GatewayError(401, "missing or wrong bearer token: send 'Authorization: Bearer <agent token>' (the "
                                    "OpenAI client sends its api_key this way; Arclight gives its agents the token, made "
                                    "from gateway.token)", "authentication_error")

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
        """The admin routes: the admin token only (the agent token opens none of them). A gateway ``serve`` runs always
        has one; an app built without one (in a test's process) makes the browser checks of a loopback server."""
        if self.token is not None and not has_token(request, self.token):
            raise GatewayError(401, "missing or wrong admin token: the admin routes (/admin/...) take only the gateway's "
                                    "admin token ('Authorization: Bearer <gateway.token>'; a gateway a flow starts without "
                                    "gateway.token makes up its own and gives it to the flow's runners only); an agent's "
                                    "token opens none of them", "authentication_error")
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
                if response.status == 404 and b"does not exist" in await response.read():
                    # a replica restarted after the redeploy has no adapter of this version yet: the next one may
                    # have; with none left, the version the gateway routes to is missing on our side, not the agent's
                    response.release()
                    if i + 1 == len(replicas):
                        raise GatewayError(503, f"vLLM at {replica} does not serve {call.target.served_model} (restarted "
                                                "and not yet given it back?)", "upstream_unavailable")
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
        origin = {"parent": parse_traceparent(request.headers.get("traceparent")), "client": _client(request)}
        try:
            self.authorize(request)
            rollout_id = request.path_params.get("rollout_id")
            info, replicas, resource = router.rollout(rollout_id) if rollout_id is not None else (None, None, router.production_resource)
            body = await self.read_json(request)
            validate_request(body, operation)
            if info is not None and info.seed is not None and body.get("seed") is None:
                body["seed"] = self.call_seed(info, body)
            target = router.resolve(body.get("model"), info, replicas)
        except PinnedVersionGone as exc:  # recorded as a call our side failed: the rollout is not the agent's failure
            self.finish(Call(operation=operation, body=body, target=exc.target, resource=resource, start_ns=start_ns,
                             started=started, **origin),
                        endpoint, str(exc.status), error=exc.message, upstream_failed=True)
            return error_response(exc)
        except GatewayError as exc:
            self.metrics.requests.labels(endpoint, str(exc.status)).inc()
            return error_response(exc)
        call = Call(operation=operation, body=body, target=target, resource=resource, start_ns=start_ns, started=started, **origin)
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

    def call_seed(self, info: RolloutInfo, body: dict[str, Any]) -> int:
        """The seed a rollout's call is sampled with: a hash of the rollout's seed and what the call asks (its messages or
        prompt), so a repeated run gets the same seed for the same call whatever order the calls arrive in, across
        rollouts running at once. The same call asked again by the rollout with the same seed (an agent drawing twice, or
        retrying; each attempt has its own seed) gets the next seed, counted in the state every process of the gateway
        shares (``gateway.workers``), and forgotten with the rollout. Tool-call ids are left out: the server makes
        them up anew in every run (``chatcmpl-tool-<random>``), and they only pair a call with its result."""
        asked = orjson.dumps([_without_call_ids(body.get("messages")), body.get("prompt")], option=orjson.OPT_SORT_KEYS)
        digest = hashlib.blake2b(asked, digest_size=16).digest()
        count = self.router.state.count_call(info.rollout_id, info.seed, digest)
        mixed = hashlib.blake2b(digest + info.seed.to_bytes(8, "little") + count.to_bytes(8, "little"), digest_size=8)
        return int.from_bytes(mixed.digest(), "little") >> 1  # vLLM takes a signed 64-bit seed

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
            done = False
            try:
                async for raw in upstream.content:
                    line = raw.strip()
                    if not line.startswith(b"data:"):
                        continue
                    payload = line[5:].strip()
                    if payload == b"[DONE]":  # sent once the call is recorded: a rollout that ends on it has it counted
                        done = True
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
            if done:
                yield b"data: [DONE]\n\n"

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
        recorded = 0
        for attributes in call.span_attributes(latency_ms=elapsed * 1000, error=error, upstream_failed=upstream_failed):
            self.recorder.record(name=f"{call.operation} {call.target.served_model}", resource=call.resource, parent=call.parent,
                                 start_ns=call.start_ns, end_ns=end_ns, attributes=attributes, error=error)
            recorded += 1
        rollout_id = call.resource.attributes.get(semconv.ROLLOUT_ID)
        if rollout_id is not None and recorded:  # what the lake should hold for it: forgetting it answers the count
            self.router.state.count_recorded(rollout_id, recorded)

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
        """``DELETE /admin/rollouts/{id}``: 200 with the model-call spans recorded for it since its (latest)
        registration, ``{"rollout_id", "recorded_spans"}``; 404 when it is not registered."""
        try:
            self.authorize_admin(request)
        except GatewayError as exc:
            return error_response(exc)
        rollout_id = request.path_params["rollout_id"]
        recorded = self.router.forget(rollout_id)
        if recorded is None:
            return Response(status_code=404)
        return JSONResponse({"rollout_id": rollout_id, "recorded_spans": recorded})

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

    async def fetch_weights(self, request: Request) -> Response:
        """``POST /admin/weights`` ``{"uri": ...}``: fetch a version the trainer published (``serving.weights_uri``) to
        this host's disk, checked file by file against its manifest, for the vLLM beside the gateway to load; answer
        the folder it is in, its size and its manifest. Each policy (the URI's folder above the version) keeps its
        ``keep_versions`` + 1 newest fetched versions: vLLM reads a loaded adapter's folder again when it reloads it."""
        from lightning_core.common.published import InvalidManifest, PublishError, fetch, prune, store_name, version_under
        from lightning_core.names import InvalidName, inside

        try:
            self.authorize_admin(request)
            uri = (await self.read_json(request)).get("uri")
            if not isinstance(uri, str):
                raise GatewayError(422, 'POST /admin/weights needs {"uri": "<serving.weights_uri>/<policy>/<version>"}')
            if not self.weights_uri or not self.weights_dir:
                raise GatewayError(409, "this gateway fetches no weights: it was started without serving.weights_uri "
                                        "(start_gateway passes it, with --weights-dir, when the config sets it)")
            try:
                found = version_under(uri, self.weights_uri)
            except InvalidName as exc:
                raise GatewayError(422, f"{uri}: {exc}") from None
            if found is None:
                raise GatewayError(403, f"{uri} is not under this gateway's serving.weights_uri "
                                        f"{store_name(self.weights_uri)}: it fetches <serving.weights_uri>/<policy>/"
                                        "<version> only", "permission_error")
            started = time.perf_counter()
            policy_dir = inside(self.weights_dir, Path(self.weights_dir) / found[0], what="policy folder")
            try:
                folder = await asyncio.to_thread(fetch, uri, policy_dir)
            except InvalidManifest as exc:  # the version asked for is not one: nothing was written
                raise GatewayError(422, str(exc)) from None
            except PublishError as exc:
                raise GatewayError(502, str(exc)) from None
            await asyncio.to_thread(prune, policy_dir, keep=self.keep_versions + 1, fetched=folder)
        except GatewayError as exc:
            return error_response(exc)
        manifest = json.loads((folder / "manifest.json").read_text())["files"]
        log.info("fetched %s to %s (%d files, %d bytes) in %.2f s", uri, folder, len(manifest),
                 sum(f["bytes"] for f in manifest.values()), time.perf_counter() - started)
        return JSONResponse({"path": str(folder), "bytes": sum(f["bytes"] for f in manifest.values()),
                             "files": manifest, "seconds": round(time.perf_counter() - started, 3)})

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
        """``GET /healthz``; the upstream URLs only with the admin token, or for a loopback client when the gateway takes
        calls without a token."""
        if not (has_token(request, self.token) or trusted(request, self.token if self.agent_token else None)):
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


def _client(request: Request) -> str | None:
    """The caller's address (``client.address`` on its spans): on several hosts, the machine that ran the agent."""
    return request.client.host if request.client is not None else None


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
