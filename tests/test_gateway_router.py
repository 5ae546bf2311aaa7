"""Gateway routing, auth and registration rules that need no vLLM."""

from __future__ import annotations

import json

import pytest
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from starlette.testclient import TestClient

from lightning_core.serving.router import (GatewayError, GatewayState, PinnedVersionGone, PolicySwitch, Router,
                                           RolloutInfo)
from lightning_core import semconv
from lightning_core.serving.app import build_app, serve
from lightning_core.serving.gateway import Gateway
from lightning_core.serving.metrics import GatewayMetrics
from lightning_core.serving.recording import SpanRecorder, parse_traceparent
from tests.helpers.fake_vllm import ThreadServer, fake_vllm


def make_router() -> Router:
    return Router(upstreams=["http://a:1/v1", "http://b:2"], base_model="base", policies=["default", "coder"])


def test_rollouts_stick_to_a_replica_every_gateway_process_agrees_on():
    # two routers = two gateway processes (or hosts) that never talk to each other
    one, other = make_router(), make_router()
    ids = [f"r{i}" for i in range(200)]
    replicas = [one.register(RolloutInfo(rollout_id=i)) for i in ids]
    assert replicas == [other.register(RolloutInfo(rollout_id=i)) for i in ids]
    assert 70 < replicas.count("http://a:1") < 130  # spread over both replicas
    info, order, _ = one.rollout("r1")
    assert order[0] == replicas[1] and sorted(order) == ["http://a:1", "http://b:2"]
    assert all(one.resolve("x", info, order).replica == replicas[1] for _ in range(5))
    # a third replica takes over only the rollouts it wins; no other rollout moves between the first two
    three = Router(upstreams=["http://a:1", "http://b:2", "http://c:3"], base_model="base", policies=["default"])
    moved = [(old, three.replicas_for(i)[0]) for i, old in zip(ids, replicas) if three.replicas_for(i)[0] != old]
    assert moved and all(new == "http://c:3" for _, new in moved)
    # a replica that refused a connection goes last for this process; its rollouts use their second choice
    one.mark_down(replicas[1])
    assert one.rollout("r1")[1] == [order[1], order[0]]
    assert (one.forget("r1"), one.forget("r1")) == (0, None)  # no span recorded for it; then not registered
    with pytest.raises(GatewayError) as err:
        one.rollout("r1")
    assert err.value.status == 404


def test_processes_sharing_a_state_file_see_each_others_registrations_and_switches(tmp_path):
    path = tmp_path / "state.sqlite"
    one, other = (Router(upstreams=["http://a:1"], base_model="base", policies=["default"], state=GatewayState(path))
                  for _ in range(2))
    one.register(RolloutInfo(rollout_id="r", run_id="run", epoch=3))
    info, _, resource = other.rollout("r")
    assert (info.run_id, info.epoch, resource.attributes["arclight.epoch"]) == ("run", 3, 3)
    one.switch("default", PolicySwitch(served_model="default-v1", version=1), keep=2)
    assert other.resolve("gpt", None, None).served_model == "default-v1"  # the very next call, no wait
    other.switch("default", PolicySwitch(served_model="default-v2", version=2), keep=2)
    assert (one.resolve("gpt", None, None).version, one.rollback("default").version) == (2, 1)
    assert other.resolve("gpt", None, None).served_model == "default-v1"
    assert other.forget("r") == 0
    with pytest.raises(GatewayError):
        one.rollout("r")


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


def test_replica_groups_send_each_policy_to_its_own_replicas_and_the_base_model_to_its_group():
    """Merged serving with a frozen agent: each policy's merged weights and the base weights run in separate vLLMs."""
    router = Router(upstreams=["writer=http://w1:1", "writer=http://w2:2/v1", "rewriter=http://r:3", "base=http://b:4"],
                    base_model="base", policies=["writer", "rewriter"])
    assert router.groups == {"writer": ["http://w1:1", "http://w2:2"], "rewriter": ["http://r:3"], "base": ["http://b:4"]}
    # every version of every policy is served as "base" in its own vLLM (weights reloaded in place)
    router.switch("writer", PolicySwitch(served_model="base", version=3), keep=2)
    router.register(RolloutInfo(rollout_id="ro1"))
    info, replicas, _ = router.rollout("ro1")
    writer = router.resolve("writer", info, replicas)
    assert (writer.served_model, writer.policy, writer.version) == ("base", "writer", 3)
    assert writer.replica in ("http://w1:1", "http://w2:2") and sorted(writer.replicas) == ["http://w1:1", "http://w2:2"]
    assert all(router.resolve("writer", info, replicas).replica == writer.replica for _ in range(5))  # sticky
    assert router.resolve("rewriter", info, replicas).replicas == ["http://r:3"]
    frozen = router.resolve("base", info, replicas)  # the frozen checker asks for the base model by name
    assert (frozen.served_model, frozen.policy, frozen.version, frozen.replicas) == ("base", None, 0, ["http://b:4"])
    production = {router.resolve("writer", None, None).replica for _ in range(4)}
    assert production == {"http://w1:1", "http://w2:2"}  # outside rollouts: round robin within the group
    assert router.group_upstreams("writer") == ["http://w1:1", "http://w2:2"]
    plain = make_router()
    assert plain.groups == {None: ["http://a:1", "http://b:2"]} and plain.group_upstreams("coder") == plain.upstreams


def test_a_rollout_keeps_the_versions_it_started_on_across_redeploys_until_they_are_unloaded():
    """Asynchronous epochs redeploy while rollouts run: each rollout's calls all go to the versions serving when it
    was registered, for every policy it calls, or fail on our side once such a version is gone."""
    router = make_router()
    router.switch("default", PolicySwitch(served_model="default-v1", version=1), keep=2)
    router.register(RolloutInfo(rollout_id="early"))
    router.switch("default", PolicySwitch(served_model="default-v2", version=2), keep=2)  # v1 kept for rollback
    router.switch("coder", PolicySwitch(served_model="coder-v5", version=5), keep=2)
    router.register(RolloutInfo(rollout_id="late"))
    early, early_replicas, _ = router.rollout("early")
    late, late_replicas, _ = router.rollout("late")
    assert early.pins == {"default": ("default-v1", 1), "coder": ("base", 0)}
    pinned = router.resolve("gpt-4o", early, early_replicas)
    assert (pinned.served_model, pinned.policy, pinned.version) == ("default-v1", "default", 1)
    assert router.resolve("gpt-4o", late, late_replicas).served_model == "default-v2"
    assert router.resolve("coder", late, late_replicas).served_model == "coder-v5"
    kept = router.resolve("coder", early, early_replicas)  # the base model stays loaded beside coder's adapters
    assert (kept.served_model, kept.policy, kept.version) == ("base", "coder", 0)
    assert router.resolve("default-v2", early, early_replicas).version == 2  # an exact version asked for by name
    router.switch("default", PolicySwitch(served_model="default-v3", version=3), keep=2)  # v1 unloaded
    with pytest.raises(PinnedVersionGone) as gone:
        router.resolve("gpt-4o", early, early_replicas)
    assert gone.value.status == 503 and (gone.value.target.served_model, gone.value.target.version) == ("default-v1", 1)
    assert router.resolve(None, None, None).version == 3  # traffic outside rollouts takes the newest
    # merged weights: every version is served under the base name, reloaded in place, so no older one stays
    merged = Router(upstreams=["http://a:1"], base_model="base", policies=["calc"])
    merged.switch("calc", PolicySwitch(served_model="base", version=1), keep=2)
    merged.register(RolloutInfo(rollout_id="r"))
    info, replicas, _ = merged.rollout("r")
    assert merged.resolve("calc", info, replicas).version == 1
    merged.switch("calc", PolicySwitch(served_model="base", version=2), keep=2)
    with pytest.raises(PinnedVersionGone, match="now version 2"):
        merged.resolve("calc", info, replicas)
    merged.register(RolloutInfo(rollout_id="r", attempt=1))  # its next attempt is pinned afresh
    assert merged.resolve("calc", *merged.rollout("r")[:2]).version == 2


def test_a_call_to_a_pinned_version_that_is_gone_is_a_503_recorded_as_our_failure():
    exporter = InMemorySpanExporter()
    app = build_app(upstreams=["http://127.0.0.1:9"], base_model="base", exporter=exporter, policies=["calc"], token="t")
    with TestClient(app, headers={"Authorization": "Bearer t"}) as client:
        assert client.post("/admin/rollouts", json={"rollout_id": "r", "run_id": "run", "epoch": 1}).status_code == 201
        app.state.router.switch("calc", PolicySwitch(served_model="base", version=1), keep=2)  # merged weights reloaded
        r = client.post("/rollout/r/v1/chat/completions", json={"model": "calc", "messages": [{"role": "user", "content": "hi"}]})
        assert r.status_code == 503 and "started on version 0 of policy 'calc'" in r.json()["error"]["message"]
        app.state.recorder.flush()
    [span] = exporter.get_finished_spans()
    assert span.attributes["arclight.llm.upstream_failed"] is True and span.attributes["arclight.policy.version"] == 0
    assert span.resource.attributes[semconv.ROLLOUT_ID] == "r" and span.status.status_code.name == "ERROR"


def _seeds_sent(exporter: InMemorySpanExporter) -> list[int]:
    return [json.loads(span.attributes[semconv.REQUEST_PARAMS])["seed"] for span in exporter.get_finished_spans()]


def test_a_repeated_call_gets_a_new_seed_whichever_gateway_process_answers_it(tmp_path):
    """``gateway.workers > 1``: the processes behind one address share one state file, and the kernel hands each
    connection to any of them. A rollout that asks the same call again (an agent drawing twice, or retrying) must get
    the next seed, not the one the process it lands on gave that call before."""
    state = tmp_path / "state.sqlite"
    exporters = [InMemorySpanExporter(), InMemorySpanExporter()]
    ask = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
    with ThreadServer(fake_vllm()) as upstream:
        apps = [build_app(upstreams=[upstream.url], base_model="base", exporter=exporter, state_path=state, token="t")
                for exporter in exporters]
        auth = {"Authorization": "Bearer t"}
        with TestClient(apps[0], headers=auth) as one, TestClient(apps[1], headers=auth) as other:
            assert one.post("/admin/rollouts", json={"rollout_id": "r", "seed": 5}).status_code == 201
            for client in (one, other, one, other):
                assert client.post("/rollout/r/v1/chat/completions", json=ask).status_code == 200
            for app in apps:
                app.state.recorder.flush()
    seeds = [_seeds_sent(exporter) for exporter in exporters]
    assert [len(s) for s in seeds] == [2, 2]
    assert len(set(seeds[0] + seeds[1])) == 4, f"the four asks of one call were sent with seeds {seeds}"


def test_a_repeated_call_never_gets_its_first_seed_again_however_many_calls_other_rollouts_make():
    """The counts of repeated calls were kept in a dict emptied past 100,000 entries, so a rollout's next ask after
    that got its first seed again. They now live as long as the rollout's registration, and go with it."""
    metrics = GatewayMetrics()
    gw = Gateway(router=make_router(), recorder=SpanRecorder(InMemorySpanExporter(), metrics), metrics=metrics,
                 token=None, upstream_timeout_s=1.0, max_body_bytes=1 << 20, keep_versions=2)
    kept, busy = RolloutInfo(rollout_id="kept", seed=7), RolloutInfo(rollout_id="busy", seed=7)
    gw.router.register(kept)
    gw.router.register(busy)
    ask = {"messages": [{"role": "user", "content": "hi"}]}
    first = gw.call_seed(kept, ask)
    busy_first = gw.call_seed(busy, {"prompt": "0"})
    for i in range(1, 100_001):
        gw.call_seed(busy, {"prompt": str(i)})
    assert gw.call_seed(kept, ask) != first
    # forgotten with its rollout: the same rollout registered again draws its first seeds again (a repeated run)
    assert gw.router.forget("busy") is not None
    gw.router.register(busy)
    assert gw.call_seed(busy, {"prompt": "0"}) == busy_first
