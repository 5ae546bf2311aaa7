"""Gateway routing, auth and registration rules that need no vLLM."""

from __future__ import annotations

import pytest
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from starlette.testclient import TestClient

from lightning_core.gateway import GatewayError, PolicySwitch, Router, RolloutInfo, build_app, parse_traceparent, serve


def make_router() -> Router:
    return Router(upstreams=["http://a:1/v1", "http://b:2"], base_model="base", policies=["default", "coder"])


def test_rollouts_stick_to_the_least_loaded_replica():
    router = make_router()
    replicas = [router.register(RolloutInfo(rollout_id=f"r{i}")) for i in range(4)]
    assert replicas == ["http://a:1", "http://b:2", "http://a:1", "http://b:2"]
    info, replica, _ = router.rollout("r1")
    assert all(router.resolve("x", info, replica).replica == "http://b:2" for _ in range(5))
    assert router.forget("r1") and not router.forget("r1")
    with pytest.raises(GatewayError) as err:
        router.rollout("r1")
    assert err.value.status == 404


def test_model_names_resolve_to_versions_policies_or_the_default():
    router = make_router()
    assert router.resolve("gpt-4o", None, None).served_model == "base"  # nothing deployed yet
    router.switch("default", PolicySwitch(served_model="default-v1", version=1), keep=2)
    router.switch("default", PolicySwitch(served_model="default-v2", version=2), keep=2)
    router.switch("coder", PolicySwitch(served_model="coder-v7", version=7), keep=2)
    assert (router.resolve("gpt-4o", None, None).served_model, router.resolve("gpt-4o", None, None).version) == ("default-v2", 2)
    assert router.resolve("coder", None, None).served_model == "coder-v7"
    assert router.resolve("default-v1", None, None).version == 1  # an exact loaded version
    assert router.resolve("base", None, None).served_model == "base"
    pinned = RolloutInfo(rollout_id="r", policy="coder")
    assert router.resolve("gpt-4o", pinned, None).served_model == "coder-v7"


def test_switch_keeps_only_the_configured_rollbacks_and_rollback_goes_back():
    router = make_router()
    for v in (1, 2, 3):
        router.switch("default", PolicySwitch(served_model=f"default-v{v}", version=v), keep=2)
    assert router.policies["default"].history == [("default-v2", 2)]
    state = router.rollback("default")
    assert (state.served_model, state.version, state.history) == ("default-v2", 2, [])
    with pytest.raises(GatewayError) as err:
        router.rollback("default")
    assert err.value.status == 409


def test_token_is_required_everywhere_but_health_and_metrics():
    app = build_app(upstreams=["http://127.0.0.1:9"], base_model="base", exporter=InMemorySpanExporter(), token="s3cret")
    with TestClient(app) as client:
        r = client.post("/admin/rollouts", json={"rollout_id": "r"})
        assert r.status_code == 401 and "Bearer" in r.json()["error"]["message"]
        assert client.post("/v1/chat/completions", json={}).status_code == 401
        assert client.post("/admin/rollouts", json={"rollout_id": "r"}, headers={"Authorization": "Bearer s3cret"}).status_code == 201
        assert client.get("/healthz").status_code == 200 and client.get("/metrics").status_code == 200


def test_unreachable_upstream_is_a_502_with_an_error_span():
    exporter = InMemorySpanExporter()
    app = build_app(upstreams=["http://127.0.0.1:9"], base_model="base", exporter=exporter)
    with TestClient(app) as client:
        r = client.post("/v1/chat/completions", json={"model": "m", "messages": [{"role": "user", "content": "hi"}]})
        assert r.status_code == 502 and "could not be reached" in r.json()["error"]["message"]
        app.state.recorder.flush()
    [span] = exporter.get_finished_spans()
    assert span.status.status_code.name == "ERROR" and "could not be reached" in span.attributes["error.type"]


def test_serving_off_loopback_without_a_token_is_refused():
    with pytest.raises(ValueError, match="gateway.token"):
        serve(host="0.0.0.0", port=0, upstreams=["http://x"], base_model="b", policies=["default"], collector_url="http://c")


def test_traceparent_parent_is_parsed_and_junk_ignored():
    ctx = parse_traceparent("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01")
    assert ctx is not None and ctx.trace_id == 0x0AF7651916CD43DD8448EB211C80319C and ctx.span_id == 0xB7AD6B7169203331
    assert parse_traceparent("garbage") is None and parse_traceparent(None) is None
