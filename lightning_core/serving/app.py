"""OpenAI-compatible gateway in front of vLLM that records every model call as a span.

Agents point their OpenAI client at ``{gateway}/rollout/{rollout_id}/v1`` (training rollouts) or
``{gateway}/v1`` (production traffic); nothing else changes. For each call the gateway

- maps the client's ``model`` to the policy version serving now (``Router.resolve``),
- asks vLLM for token ids and logprobs, and strips from the answer what the client did not ask for,
- sends every call of one rollout to the same replica,
- records one span per call (per choice when ``n > 1``) with the exact token ids and logprobs.

Two tokens: the admin token opens the admin endpoints and nothing else does; agents get the agent token
(``http_guard.agent_token``, made from ``gateway.token``), which reaches the model routes only. A loopback gateway
without ``gateway.token`` takes model calls from any local caller, and its admin token is one ``serve`` is given by
whoever started it (the flow's stack), or makes up. Admin endpoints: ``POST /admin/rollouts`` registers a rollout
(unknown rollout ids get 404), ``DELETE /admin/rollouts/{id}`` forgets it, ``GET /admin/policies``
lists policy versions, ``PUT /admin/policies/{name}`` switches a policy to a loaded adapter
atomically, ``POST /admin/policies/{name}/rollback`` switches back, ``POST /admin/weights`` fetches a published
version to this host for the vLLM beside it (``serving.weights_uri``). See docs/serving.md.

This module only wires the routes to the handlers (``gateway.Gateway``) and runs the server's
processes; ``router`` decides where a call goes and ``recording`` what its span holds.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import sys
import tempfile
from pathlib import Path
from typing import Any

import uvicorn
from opentelemetry.sdk.trace.export import SpanExporter
from starlette.applications import Starlette
from starlette.routing import Route

from lightning_core.common.http_guard import LOOPBACK_HOSTS, agent_token, bearer
from lightning_core.serving.gateway import Gateway
from lightning_core.serving.metrics import GatewayMetrics
from lightning_core.serving.recording import SpanRecorder
from lightning_core.serving.router import GatewayState, Router

log = logging.getLogger("arclight.gateway")



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
    weights_dir: str | os.PathLike | None = None,
    weights_uri: str | None = None,
    models_open: bool = False,
) -> Starlette:
    """Return the gateway's Starlette app (spans go to ``exporter``; registrations and policies to ``state_path``,
    which every process of one gateway shares, or to memory).

    ``token`` is the admin token; the model routes take it or the agent token made from it, or, with ``models_open``,
    any caller. Without a token (an app built in a test's process) every route is open to loopback callers.
    ``POST /admin/weights`` fetches versions under ``weights_uri`` into ``weights_dir``, and refuses without them."""
    metrics = GatewayMetrics()
    router = Router(upstreams=upstreams, base_model=base_model, policies=policies or ["default"], state=GatewayState(state_path))
    gw = Gateway(router=router,
                 recorder=SpanRecorder(exporter, metrics, delay_ms=export_delay_ms), metrics=metrics, token=token,
                 upstream_timeout_s=upstream_timeout_s, max_body_bytes=max_body_bytes, keep_versions=keep_versions,
                 weights_dir=str(weights_dir) if weights_dir else None, weights_uri=weights_uri,
                 agent_token=agent_token(token) if token is not None and not models_open else None)
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
        Route("/admin/weights", gw.fetch_weights, methods=["POST"]),
        Route("/healthz", gw.healthz, methods=["GET"]),
        Route("/metrics", gw.prometheus, methods=["GET"]),
    ]
    app = Starlette(routes=routes, lifespan=gw.lifespan)
    app.state.router, app.state.metrics, app.state.recorder = gw.router, gw.metrics, gw.recorder
    return app


SETTINGS_ENV = "ARCLIGHT_GATEWAY_SETTINGS"
CLIENT_KEEPALIVE_S = 65  # seconds an idle client connection stays open (above every common client's own expiry)


def _app(settings: dict[str, Any]) -> Starlette:
    """Build the app with an OTLP exporter to the collector from ``serve``'s settings."""
    # the span exporter's thread encodes batches while the event loop answers calls: hand the GIL back to the
    # loop after 0.5 ms rather than Python's 5 ms (p99 at one client 12.4 -> 6.3 ms in benchmarks/gateway_bench.py)
    sys.setswitchinterval(0.0005)
    from lightning_core.serving.span_export import GatewaySpanExporter

    collector_token = settings.get("collector_token")
    exporter = GatewaySpanExporter(f"{settings['collector_url'].rstrip('/')}/v1/traces", headers=bearer(collector_token) or None)
    return build_app(upstreams=settings["upstreams"], base_model=settings["base_model"], policies=settings["policies"],
                     exporter=exporter, token=settings.get("token"), upstream_timeout_s=settings["upstream_timeout_s"],
                     max_body_bytes=settings["max_body_bytes"], keep_versions=settings["keep_versions"],
                     state_path=settings.get("state_path"), export_delay_ms=settings.get("export_delay_ms", 200),
                     weights_dir=settings.get("weights_dir"), weights_uri=settings.get("weights_uri"),
                     models_open=settings.get("models_open", False))


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
    weights_dir: str | os.PathLike | None = None,
    weights_uri: str | None = None,
    admin_token: str | None = None,
) -> None:
    """Run the gateway in the foreground until interrupted; spans go to the collector at ``collector_url``.

    ``token`` (gateway.token, else ``$ARCLIGHT_GATEWAY_TOKEN``) is the admin token, and agents call the model routes with
    the agent token made from it. Without one (loopback only) the model routes take any local caller, and the admin
    routes take ``admin_token`` (``$ARCLIGHT_GATEWAY_ADMIN_TOKEN``: whoever started the gateway made it up and keeps it)
    or, without that either, a random token no one holds: they are never open.

    ``workers`` > 1 runs that many processes on one socket (uvicorn's worker processes); they share rollout
    registrations and the policy table through the SQLite file ``state_path`` (a temporary one by default), and
    route a rollout to the same replica because the replica is a hash of the rollout id.
    """
    token = token or os.environ.get("ARCLIGHT_GATEWAY_TOKEN") or None
    if host not in LOOPBACK_HOSTS and not token:
        raise ValueError(f"gateway.host {host!r} is reachable from other machines: set gateway.token "
                         "(or $ARCLIGHT_GATEWAY_TOKEN) or bind to 127.0.0.1")
    admin = token or admin_token or os.environ.get("ARCLIGHT_GATEWAY_ADMIN_TOKEN") or None
    if admin is None:
        log.warning("no gateway.token: the admin routes (/admin/...) take a token made up for this gateway alone; set "
                    "gateway.token to call them from elsewhere (arclight redeploy, a flow attached by gateway.endpoint)")
        admin = secrets.token_urlsafe(32)
    if workers < 1:
        raise ValueError(f"gateway.workers must be at least 1, found {workers}")
    settings = {"upstreams": upstreams, "base_model": base_model, "policies": policies, "collector_url": collector_url,
                "token": admin, "models_open": token is None, "weights_uri": weights_uri,
                "collector_token": collector_token or os.environ.get("ARCLIGHT_COLLECTOR_TOKEN") or None,
                "upstream_timeout_s": upstream_timeout_s, "max_body_bytes": max_body_bytes, "keep_versions": keep_versions,
                "state_path": str(state_path) if state_path else None, "export_delay_ms": export_delay_ms,
                "weights_dir": str(weights_dir) if weights_dir else None}
    # idle client connections are kept longer than clients keep them (httpx, so the OpenAI SDK: 5 s; aiohttp: 15 s),
    # so a client never sends on a connection the gateway is closing: at uvicorn's 5 s, a rollout client idle for
    # about 5 s got "Server disconnected without sending a response" (an OpenAI client with max_retries=0 failed)
    options = {"host": host, "port": port, "log_level": log_level, "access_log": False, "timeout_graceful_shutdown": 10,
               "timeout_keep_alive": CLIENT_KEEPALIVE_S}
    if workers == 1:
        logging.getLogger("httpx").setLevel(logging.WARNING)
        uvicorn.run(_app(settings), **options)
        return
    with tempfile.TemporaryDirectory(prefix="arclight-gateway-") as tmp:
        settings["state_path"] = settings["state_path"] or str(Path(tmp) / "state.sqlite")
        GatewayState(settings["state_path"]).db.close()  # the schema exists before the workers open it
        os.environ[SETTINGS_ENV] = json.dumps(settings)
        uvicorn.run("lightning_core.serving.app:app_from_environment", factory=True, workers=workers, **options)
