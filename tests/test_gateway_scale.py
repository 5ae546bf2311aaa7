"""The gateway as several processes on one port: shared registrations and policies, sticky replicas, one flush
that reaches every process; and the span encoder the gateway exports with."""

from __future__ import annotations

import collections
import json
import random

import httpx
import pytest
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.trace import SpanContext, SpanKind, TraceFlags
from opentelemetry.trace.status import Status, StatusCode

from lightning_core import semconv
from lightning_core.common.http_guard import bearer
from lightning_core.store.catalog import Catalog
from lightning_core.serving.recording import SCOPE
from lightning_core.serving.router import Router
from lightning_core.serving.vllm import start_gateway
from lightning_core.serving.span_export import encode_request
from tests.conftest import make_config
from tests.helpers.fake_vllm import ThreadServer, fake_vllm

WORKERS = 3


@pytest.fixture(scope="module")
def replicas():
    with ThreadServer(fake_vllm()) as a, ThreadServer(fake_vllm()) as b:
        yield [a, b]


@pytest.fixture(scope="module")
def workers_config(tmp_path_factory, collector_config):
    # spans wait up to 10 s for their batch, so only a flush that reaches every process makes them readable at once
    return make_config(tmp_path_factory.mktemp("gw-workers"), f"gateway.workers={WORKERS}", "model.served_name=tiny-base",
                       "gateway.export_delay_ms=10000",
                       f"collector.endpoint={collector_config.collector.url}")


@pytest.fixture(scope="module")
def multi_gateway(workers_config, replicas, collector):
    service = start_gateway(workers_config, upstreams=[r.url for r in replicas], collector_url=collector.url)
    yield service
    service.stop()


def _call(url: str, rollout: str, content: str = "hi") -> dict:
    # a new connection per call, so the kernel hands the calls to different gateway processes
    r = httpx.post(f"{url}/rollout/{rollout}/v1/chat/completions", timeout=30, headers={"Connection": "close"},
                   json={"model": "calc", "messages": [{"role": "user", "content": content}], "max_tokens": 4})
    assert r.status_code == 200, r.text
    return r.json()


def test_processes_share_registrations_route_rollouts_alike_and_switch_together(multi_gateway, replicas, collector_config):
    url, auth = multi_gateway.url, bearer(multi_gateway.token)
    port_of = {r.url: f"port-{r.port}" for r in replicas}
    expected = Router(upstreams=[r.url for r in replicas], base_model="x", policies=["default"])  # a router that never saw a call
    rollouts = [f"scale-{i}" for i in range(24)]
    registered = {}
    for rid in rollouts:
        r = httpx.post(f"{url}/admin/rollouts", headers={"Connection": "close", **auth}, timeout=30,
                       json={"rollout_id": rid, "run_id": "scale", "epoch": 0, "task_id": f"t{rid}"})
        assert r.status_code == 201
        registered[rid] = r.json()["replica"]
        assert registered[rid] == expected.replicas_for(rid)[0]
    assert set(registered.values()) == {r.url for r in replicas}  # both replicas take rollouts

    answered = collections.defaultdict(set)
    for _ in range(4):
        for rid in rollouts:
            answer = _call(url, rid)
            answered[rid].add(answer["system_fingerprint"])
            assert answer["model"] == "tiny-base"  # nothing deployed: the base model
    assert {rid: seen for rid, seen in answered.items()} == {rid: {port_of[registered[rid]]} for rid in rollouts}

    # a switch through one process is what every process serves from the next call on to the rollouts registered
    # after it; those registered before it keep the version they started on (pinned), whichever process serves them
    r = httpx.put(f"{url}/admin/policies/default", json={"served_model": "base", "version": 1}, timeout=30, headers=auth)
    assert r.status_code == 200, r.text
    assert {_call(url, rid)["model"] for rid in rollouts} == {"tiny-base"}
    later = [f"scale-late-{i}" for i in range(8)]
    for rid in later:
        r = httpx.post(f"{url}/admin/rollouts", headers={"Connection": "close", **auth}, timeout=30,
                       json={"rollout_id": rid, "run_id": "scale", "epoch": 0, "task_id": f"t{rid}"})
        assert r.status_code == 201
        registered[rid] = r.json()["replica"]
    assert {_call(url, rid)["model"] for rid in later} == {"base"}

    # one flush reaches every process: all 24 x 6 calls are in the lake right after it, from several processes
    r = httpx.post(f"{url}/admin/flush", timeout=60, headers=auth)
    assert r.status_code == 200 and r.json() == {"flushed": True}
    # no polling: the collector acknowledges an export once it is durable, and the flush returns after every
    # process's export was acknowledged
    with Catalog.from_config(collector_config).read() as con:
        rows = con.execute("""SELECT rollout_id, json_extract_string(attributes, '$."arclight.llm.replica"'),
                                     json_extract_string(resource, '$."service.instance.id"'),
                                     json_extract(attributes, '$."arclight.policy.version"')::INT
                              FROM spans WHERE run_id = 'scale'""").fetchall()
    assert len(rows) == len(rollouts) * 5 + len(later)
    assert {(rid, replica) for rid, replica, _, _ in rows} == set(registered.items())
    assert len({instance for _, _, instance, _ in rows}) >= 2  # the calls were served by more than one process
    assert sorted(collections.Counter(version for *_, version in rows).items()) == [(0, 5 * 24), (1, len(later))]


def test_a_forgotten_rollout_is_gone_for_every_process(multi_gateway):
    url, auth = multi_gateway.url, bearer(multi_gateway.token)
    assert httpx.post(f"{url}/admin/rollouts", json={"rollout_id": "gone-1"}, headers=auth).status_code == 201
    for _ in range(2 * WORKERS):  # answered by several processes; forgetting it answers the spans all of them recorded
        _call(url, "gone-1")
    forgotten = httpx.delete(f"{url}/admin/rollouts/gone-1", headers={"Connection": "close", **auth})
    assert (forgotten.status_code, forgotten.json()) == (200, {"rollout_id": "gone-1", "recorded_spans": 2 * WORKERS})
    for _ in range(2 * WORKERS):
        r = httpx.post(f"{url}/rollout/gone-1/v1/chat/completions", headers={"Connection": "close"},
                       json={"model": "m", "messages": [{"role": "user", "content": "hi"}]})
        assert r.status_code == 404


def _span(i: int, resource: Resource, attributes: dict) -> ReadableSpan:
    context = SpanContext(random.getrandbits(128), random.getrandbits(64), is_remote=False,
                          trace_flags=TraceFlags(TraceFlags.SAMPLED))
    parent = SpanContext(context.trace_id, random.getrandbits(64), is_remote=True) if i % 2 else None
    return ReadableSpan(name=f"chat m{i}", context=context, parent=parent, resource=resource, attributes=attributes,
                        kind=SpanKind.CLIENT, start_time=1_000 + i, end_time=2_000 + i, instrumentation_scope=SCOPE,
                        status=Status(StatusCode.ERROR, "boom") if i % 3 == 0 else Status(StatusCode.UNSET))


def test_the_bulk_encoder_gives_exactly_the_sdks_request():
    rng = random.Random(0)
    resources = [Resource.create({semconv.ROLLOUT_ID: f"r{k}", semconv.EPOCH: k}) for k in range(3)]
    spans = []
    for i in range(40):
        attributes = {
            semconv.PROMPT_TOKEN_IDS: [rng.randrange(0, 50_000) for _ in range(rng.randrange(0, 300))],
            semconv.RESPONSE_TOKEN_IDS: [rng.randrange(0, 2**40) for _ in range(rng.randrange(1, 40))],
            semconv.RESPONSE_LOGPROBS: [-rng.random() * 5 for _ in range(rng.randrange(0, 40))],
            "negative": [-1, -(2**40), 3] * 4,
            "varint_edges": [0, 127, 128, 16_383, 16_384, 2**63 - 1, -(2**63)],
            "bools_among_ints": [1, True, 0, False],
            "one_int": 127 + i, "one_negative": -i,
            "flags": [True, False, True],
            "names": ["a", "ß", "日本"],
            semconv.REQUEST_MESSAGES: json.dumps([{"role": "user", "content": "ünïcode ✓"}], ensure_ascii=False),
            semconv.POLICY_VERSION: i, semconv.LLM_STREAMED: bool(i % 2), semconv.LLM_LATENCY_MS: 1.5 * i,
            "empty": [],
        }
        spans.append(_span(i, resources[i % 3], attributes))
    ours, sdk = ExportTraceServiceRequest(), ExportTraceServiceRequest()
    ours.ParseFromString(encode_request(spans))
    sdk.ParseFromString(encode_spans(spans).SerializePartialToString())
    assert ours == sdk and len(sdk.resource_spans) == 3
