"""The gateway against a misbehaving upstream and hostile clients (issue 15, items 4 and 9), with a
fake vLLM (tests/helpers/fake_vllm.py) and spans kept in memory or sent to a real collector."""

from __future__ import annotations

import json
import socket

import httpx
import pytest
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from starlette.testclient import TestClient

from lightning_core import semconv
from lightning_core.store.catalog import Catalog
from lightning_core.serving.app import build_app
from tests.helpers.fake_vllm import ThreadServer, fake_vllm

MAX_BODY = 1024 * 1024


@pytest.fixture(scope="module")
def upstream():
    with ThreadServer(fake_vllm()) as server:
        yield server


@pytest.fixture(scope="module")
def gateway(upstream):
    """A loopback gateway without a token in front of the fake vLLM; spans kept in memory."""
    memory = InMemorySpanExporter()
    app = build_app(upstreams=[upstream.url], base_model="base", exporter=memory, max_body_bytes=MAX_BODY)
    with ThreadServer(app) as server:
        server.memory, server.app = memory, app
        yield server


def _chat(gateway, rollout: str | None, content: str, **extra) -> httpx.Response:
    prefix = f"/rollout/{rollout}" if rollout else ""
    return httpx.post(f"{gateway.url}{prefix}/v1/chat/completions", timeout=30,
                      json={"model": "m", "messages": [{"role": "user", "content": content}], **extra})


def _spans(gateway, rollout: str) -> list:
    assert gateway.app.state.recorder.flush()
    return [s for s in gateway.memory.get_finished_spans() if s.resource.attributes.get(semconv.ROLLOUT_ID) == rollout]


def _register(gateway, **body) -> httpx.Response:
    return httpx.post(f"{gateway.url}/admin/rollouts", json=body, timeout=30)


def test_a_normal_call_is_answered_stripped_and_recorded(gateway):
    assert _register(gateway, rollout_id="plain-1", run_id="gw", epoch=2).status_code == 201
    r = _chat(gateway, "plain-1", "hello")
    assert r.status_code == 200
    data = r.json()
    assert data["choices"][0]["message"]["content"] == "four" and "token_ids" not in data["choices"][0]
    [span] = _spans(gateway, "plain-1")
    assert list(span.attributes[semconv.RESPONSE_TOKEN_IDS]) == [7, 8]
    streamed = _chat(gateway, "plain-1", "hello", stream=True)
    assert streamed.status_code == 200 and streamed.text.endswith("data: [DONE]\n\n")
    assert len(_spans(gateway, "plain-1")) == 2


def test_forgetting_a_rollout_answers_the_spans_recorded_since_its_latest_registration(gateway):
    """What the lake must hold for the rollout's last attempt (the flow stores it as rollouts.gateway_spans): each
    attempt registers again and counts from 0; a call our side failed is recorded, a request refused unread is not."""
    assert _register(gateway, rollout_id="count-1", attempt=0).status_code == 201
    assert _chat(gateway, "count-1", "hello").status_code == 200
    assert _register(gateway, rollout_id="count-1", attempt=1).status_code == 201
    assert _chat(gateway, "count-1", "hello").status_code == 200
    assert _chat(gateway, "count-1", "hello", stream=True).status_code == 200
    assert _chat(gateway, "count-1", "broken json").status_code == 502
    assert httpx.post(f"{gateway.url}/rollout/count-1/v1/chat/completions", json={"model": "m"}, timeout=30).status_code == 400
    forgotten = httpx.delete(f"{gateway.url}/admin/rollouts/count-1", timeout=30)
    assert (forgotten.status_code, forgotten.json()) == (200, {"rollout_id": "count-1", "recorded_spans": 3})
    assert [s.resource.attributes.get(semconv.ATTEMPT) for s in _spans(gateway, "count-1")] == [0, 1, 1, 1]
    assert httpx.delete(f"{gateway.url}/admin/rollouts/count-1", timeout=30).status_code == 404


# registrations whose span the collector could not store (a lake folder or a BIGINT column): each is refused
POISON = [
    {"rollout_id": "esc-1", "run_id": "../../etc"},
    {"rollout_id": "esc-2", "run_id": "ok\n"},
    {"rollout_id": "esc-3", "run_id": "ok", "epoch": 2**63},
    {"rollout_id": "esc-4", "run_id": "ok", "epoch": -1},
    {"rollout_id": "esc-5", "run_id": "ok", "epoch": 1.5},
    {"rollout_id": "esc-6", "run_id": "ok", "epoch": True},
    {"rollout_id": "esc-7", "run_id": "ok", "attempt": 2**63},
    {"rollout_id": "esc\n"},
]
# the most a registration may carry: accepted, and the collector stores its span
EDGE = [
    {"rollout_id": "gwedge-run", "run_id": "gw-edge." + "x" * 120},
    {"rollout_id": "gwedge-epoch", "run_id": "gw-edge", "epoch": 2**63 - 1},
    {"rollout_id": "gwedge-attempt", "run_id": "gw-edge", "epoch": 0, "attempt": 2**63 - 1},
    {"rollout_id": "gwedge-task", "run_id": "gw-edge", "epoch": 0, "task_id": "ü\n" * 512},
]


@pytest.mark.parametrize("body", POISON)
def test_registration_refuses_what_would_poison_the_lake(gateway, body):
    # fails before: 201 for each; the collector then rejected the gateway's whole export batch
    r = _register(gateway, **body)
    assert r.status_code == 422, r.text
    assert r.json()["error"]["message"].startswith("rollout registration is invalid")


def test_one_bad_registration_never_costs_other_rollouts_their_spans(upstream, collector, collector_config):
    """Every registration the lake could not store (POISON) is refused, and its agent, calling anyway, gets a 404 and
    records nothing; registrations at the limits (EDGE) are stored. All of it goes to the collector in one export
    request with five good rollouts' spans, which the collector takes whole."""
    # fails before: run id ../../etc got 201, its span made the collector refuse the batch it was
    # in, and 4 of the 5 other rollouts' spans were lost while every client got 200
    from urllib.parse import quote

    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.trace.export import SpanExporter

    class Counted(SpanExporter):
        """The OTLP exporter, with how many spans each export request carried and how the collector answered."""

        def __init__(self):
            self.inner, self.requests = OTLPSpanExporter(endpoint=f"{collector.url}/v1/traces"), []

        def export(self, spans):
            result = self.inner.export(spans)
            self.requests.append((len(spans), result.name))
            return result

        def shutdown(self):
            self.inner.shutdown()

    exporter = Counted()
    app = build_app(upstreams=[upstream.url], base_model="base", exporter=exporter, export_delay_ms=60_000)
    refused, accepted, answers = [], [], []
    with ThreadServer(app) as gw:
        for i in range(max(5, len(POISON))):  # a bad registration between good ones, its agent calling anyway
            if i < 5:
                assert _register(gw, rollout_id=f"gwbad-{i}", run_id="gw-batch", epoch=0).status_code == 201
                assert _chat(gw, f"gwbad-{i}", "hi").status_code == 200
            if i < len(POISON):
                refused.append(_register(gw, **POISON[i]).status_code)
                answers.append(_chat(gw, quote(POISON[i]["rollout_id"], safe=""), "hi").status_code)
        for body in EDGE:
            accepted.append(_register(gw, **body).status_code)
            assert _chat(gw, body["rollout_id"], "hi").status_code == 200
        assert httpx.post(f"{gw.url}/admin/flush", timeout=30).json() == {"flushed": True}
    with Catalog.from_config(collector_config).read() as con:
        rows = con.execute("SELECT rollout_id, count(*) FROM spans WHERE run_id = 'gw-batch' GROUP BY 1 ORDER BY 1").fetchall()
        edges = con.execute("SELECT rollout_id, run_id, epoch, attempt, task_id FROM spans "
                            "WHERE rollout_id LIKE 'gwedge-%' ORDER BY rollout_id").fetchall()
    assert rows == [(f"gwbad-{i}", 1) for i in range(5)]
    assert exporter.requests == [(5 + len(EDGE), "SUCCESS")]  # one request, every good and edge span in it, taken
    assert refused == [422] * len(POISON) and answers == [404] * len(POISON)
    assert accepted == [201] * len(EDGE)
    assert sorted(edges) == sorted((b["rollout_id"], b["run_id"], b.get("epoch", 0), b.get("attempt"), b.get("task_id"))
                                   for b in EDGE)


@pytest.mark.parametrize("behaviour", ["broken json", "json list"])
def test_an_upstream_200_that_is_not_a_json_object_is_a_502_with_an_error_span(gateway, behaviour):
    # fails before: a plain-text 500 and no span
    rollout = f"bad-answer-{behaviour.replace(' ', '-')}"
    assert _register(gateway, rollout_id=rollout).status_code == 201
    r = _chat(gateway, rollout, behaviour)
    assert r.status_code == 502
    error = r.json()["error"]
    assert error["type"] == "upstream_error" and "not a JSON object" in error["message"]
    [span] = _spans(gateway, rollout)
    assert "not a JSON object" in span.attributes[semconv.ERROR_TYPE] and not span.status.is_ok


def test_a_garbage_line_in_the_stream_becomes_an_error_event(gateway):
    # fails before: the line went to the client as is ("data: <html>...") and the span had no error
    assert _register(gateway, rollout_id="garbage-1").status_code == 201
    r = _chat(gateway, "garbage-1", "garbage line", stream=True)
    events = [line[len("data: "):] for line in r.text.splitlines() if line.startswith("data: ")]
    assert "data: <html>" not in r.text  # quoted inside the error message only
    error = json.loads(events[-1])["error"]
    assert error["type"] == "upstream_error" and "not a JSON" in error["message"]
    [span] = _spans(gateway, "garbage-1")
    assert "not a JSON" in span.attributes[semconv.ERROR_TYPE]


def test_a_chunked_body_is_cut_off_at_the_limit(gateway):
    # fails before: the whole body was read first (a 400 MB body took peak RSS from 66 to 866 MB)
    with socket.create_connection(("127.0.0.1", gateway.port)) as sock:
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                     b"Transfer-Encoding: chunked\r\n\r\n")
        chunk, sent, answer = b" " * 65536, 0, b""
        sock.settimeout(0.05)
        while sent < 64 * MAX_BODY and not answer:
            try:
                sock.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                sent += len(chunk)
                answer = sock.recv(65536)
            except socket.timeout:
                continue
            except OSError:  # closed by the gateway after its answer
                break
        sock.settimeout(5)
        while b"\r\n\r\n" not in answer:
            answer += sock.recv(65536)
    assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
    assert sent < 8 * MAX_BODY  # it stopped reading soon after the limit, not at the end of the body


def test_deeply_nested_json_is_a_400(gateway):
    # fails before: 500 (RecursionError)
    r = httpx.post(f"{gateway.url}/v1/chat/completions", content=b"[" * 100_000 + b"]" * 100_000, timeout=30,
                   headers={"Content-Type": "application/json"})
    assert r.status_code == 400 and "nested" in r.json()["error"]["message"]
    deep = '{"model": "m", "messages": [{"role": "user", "content": ' + "[" * 200 + "]" * 200 + "}]}"
    r = httpx.post(f"{gateway.url}/v1/chat/completions", content=deep.encode(), timeout=30)
    assert r.status_code == 400 and "nested" in r.json()["error"]["message"]


# --- item 9: what /healthz tells strangers, and browsers driving a loopback gateway ------------


def _client(token: str | None = None, **kwargs) -> TestClient:
    app = build_app(upstreams=["http://127.0.0.1:9/v1"], base_model="base", exporter=InMemorySpanExporter(), token=token)
    return TestClient(app, **kwargs)


def test_healthz_names_the_upstreams_only_on_loopback_or_with_the_token():
    # fails before: the upstream URLs went to anyone who asked
    with _client(client=("203.0.113.9", 5000)) as stranger:
        assert stranger.get("/healthz").json() == {"status": "ok"}
    with _client(client=("127.0.0.1", 5000)) as local:
        assert local.get("/healthz").json()["upstreams"] == ["http://127.0.0.1:9"]
    with _client(token="t0k", client=("203.0.113.9", 5000)) as remote:
        assert remote.get("/healthz").json() == {"status": "ok"}
        assert remote.get("/healthz", headers={"Authorization": "Bearer t0k"}).json()["upstreams"] == ["http://127.0.0.1:9"]


@pytest.mark.parametrize("headers, status", [
    ({"Origin": "https://evil.example", "Content-Type": "text/plain"}, 403),
    ({"Host": "evil.example:8400"}, 403),
    ({"Origin": "null"}, 403),
    ({"Origin": "http://localhost:3000"}, 201),
    ({"Origin": "http://127.0.0.1:8400", "Host": "127.0.0.1:8400"}, 201),
    ({"Host": "[::1]:8400"}, 201),
    ({}, 201),
])
def test_a_loopback_gateway_without_token_refuses_foreign_origins_and_hosts(headers, status):
    # fails before: a web page could register rollouts (text/plain POST) or reach it by DNS rebinding
    with _client(base_url="http://localhost:8400") as client:
        r = client.post("/admin/rollouts", content=json.dumps({"rollout_id": "web-1"}), headers=headers)
        assert r.status_code == status, r.text
        if status == 403:
            assert "Origin" in r.json()["error"]["message"] or "Host" in r.json()["error"]["message"]


def test_with_a_token_origin_and_host_are_left_to_the_token():
    with _client(token="t0k", base_url="http://gw.internal:8400") as client:
        r = client.post("/admin/rollouts", json={"rollout_id": "tok-1"},
                        headers={"Authorization": "Bearer t0k", "Origin": "https://app.example"})
        assert r.status_code == 201


# --- issue 68, finding 1: the agent token reaches the model and nothing else ----------------------------------------

ADMIN_ROUTES = [("POST", "/admin/rollouts", {"rollout_id": "taken-over"}), ("DELETE", "/admin/rollouts/tok-2", None),
                ("GET", "/admin/policies", None), ("PUT", "/admin/policies/default", {"served_model": "x", "version": 9}),
                ("POST", "/admin/policies/default/rollback", None), ("POST", "/admin/flush", None),
                ("POST", "/admin/weights", {"uri": "file:///tmp/staged/p/v1"})]


def test_the_agent_token_reaches_the_model_routes_and_opens_no_admin_route(upstream):
    from lightning_core.common.http_guard import agent_token

    app = build_app(upstreams=[upstream.url], base_model="base", exporter=InMemorySpanExporter(), token="admin-s3cret")
    agent = {"Authorization": f"Bearer {agent_token('admin-s3cret')}"}
    admin = {"Authorization": "Bearer admin-s3cret"}
    ask = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
    with TestClient(app) as client:
        assert client.post("/admin/rollouts", json={"rollout_id": "tok-2"}, headers=admin).status_code == 201
        assert client.post("/rollout/tok-2/v1/chat/completions", json=ask, headers=agent).status_code == 200
        assert client.post("/v1/chat/completions", json=ask, headers=agent).status_code == 200
        assert client.get("/v1/models", headers=agent).status_code == 200
        assert client.post("/v1/chat/completions", json=ask, headers=admin).status_code == 200  # a production client
        assert client.post("/v1/chat/completions", json=ask).status_code == 401
        refused = {path: client.request(method, path, json=body, headers=agent).status_code
                   for method, path, body in ADMIN_ROUTES}
        assert refused == {path: 401 for _, path, _ in ADMIN_ROUTES}
        assert client.get("/healthz", headers=agent).json() == {"status": "ok"}  # no upstream URLs for an agent
        assert client.get("/admin/policies", headers=admin).status_code == 200

