"""Gateway against a real vLLM (CPU) serving a tiny model: answers, stripping, spans with sampled token ids."""

from __future__ import annotations

import json
import time

import httpx
import pytest
from openai import APIStatusError, OpenAI

from lightning_core import semconv
from lightning_core.store.catalog import Catalog
from lightning_core.common.http_guard import bearer
from lightning_core.serving.client import GatewayClient
from lightning_core.common.model import load_tokenizer
from tests.helpers.tokens import shown_text

pytestmark = pytest.mark.integration

MESSAGES = [{"role": "user", "content": "What is 2 + 3?"}]


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    return load_tokenizer(tiny_model_dir)


@pytest.fixture(scope="module")
def admin(gateway) -> GatewayClient:
    return GatewayClient(gateway.url, token=gateway.token)


def rollout_client(admin: GatewayClient, rollout_id: str, **context) -> OpenAI:
    base_url = admin.register_rollout(rollout_id=rollout_id, run_id="gw-test", epoch=3, task_id=f"task-{rollout_id}", **context)
    return OpenAI(base_url=base_url, api_key="unused", max_retries=0)


def gateway_spans(collector_config, admin: GatewayClient, response_id: str, *, expect: int = 1, timeout_s: float = 20.0) -> list[dict]:
    """Flush the gateway and return the spans (attributes parsed) recorded for one response id."""
    assert admin.flush()
    deadline = time.monotonic() + timeout_s
    while True:
        with Catalog.from_config(collector_config).read() as con:
            rows = con.execute(
                """SELECT attributes, rollout_id, task_id, run_id, epoch, status_code, name, trace_id,
                          prompt_token_ids, response_token_ids, response_logprobs FROM spans
                   WHERE json_extract_string(attributes, '$."gen_ai.response.id"') = ?""",
                [response_id],
            ).fetchall()
        if len(rows) >= expect or time.monotonic() > deadline:
            break
        time.sleep(0.3)
    keys = ("attributes", "rollout_id", "task_id", "run_id", "epoch", "status_code", "name", "trace_id")
    spans = [dict(zip(keys, row)) for row in rows]
    for span, row in zip(spans, rows):
        # the token id and logprob arrays are stored as typed columns, not in the attributes JSON
        span["attributes"] = json.loads(span["attributes"])
        typed = zip((semconv.PROMPT_TOKEN_IDS, semconv.RESPONSE_TOKEN_IDS, semconv.RESPONSE_LOGPROBS), row[len(keys):])
        span["attributes"].update({key: value for key, value in typed if value is not None})
    assert len(spans) == expect, f"expected {expect} span(s) for {response_id}, found {len(spans)}"
    return spans


def test_chat_answer_is_plain_and_span_holds_the_sampled_tokens(admin, collector_config, tokenizer):
    client = rollout_client(admin, "chat-1")
    response = client.chat.completions.create(model="anything", messages=MESSAGES, max_tokens=12, temperature=1.0, seed=7)
    text = response.choices[0].message.content
    assert response.usage.completion_tokens == 12
    assert response.choices[0].logprobs is None  # not asked for, so not returned
    extra = response.model_extra or {}
    assert "prompt_token_ids" not in extra and "token_ids" not in (response.choices[0].model_extra or {})

    [span] = gateway_spans(collector_config, admin, response.id)
    attrs = span["attributes"]
    ids = attrs[semconv.RESPONSE_TOKEN_IDS]
    assert len(ids) == 12 and len(attrs[semconv.RESPONSE_LOGPROBS]) == 12
    assert shown_text(tokenizer, ids) == text
    assert all(lp <= 0.0 for lp in attrs[semconv.RESPONSE_LOGPROBS])
    assert attrs[semconv.PROMPT_TOKEN_IDS] == tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=True, return_dict=False)
    assert attrs[semconv.RESPONSE_TEXT] == text
    assert json.loads(attrs[semconv.REQUEST_MESSAGES]) == MESSAGES
    assert attrs[semconv.SPAN_KIND] == semconv.KIND_LLM and attrs[semconv.GEN_AI_OPERATION_NAME] == "chat"
    assert attrs[semconv.GEN_AI_REQUEST_MODEL] == "anything" and attrs[semconv.SERVED_MODEL] == "tiny"
    assert attrs[semconv.POLICY_VERSION] == 0 and attrs[semconv.LLM_STREAMED] is False
    assert attrs[semconv.GEN_AI_USAGE_OUTPUT_TOKENS] == 12 and attrs[semconv.LLM_LATENCY_MS] > 0
    assert json.loads(attrs[semconv.REQUEST_PARAMS]) == {"max_tokens": 12, "temperature": 1.0, "seed": 7}
    assert attrs[semconv.CLIENT_ADDRESS] == "127.0.0.1"  # where the call came from (the agent's host)
    assert (span["rollout_id"], span["task_id"], span["run_id"], span["epoch"]) == ("chat-1", "task-chat-1", "gw-test", 3)


def test_streamed_chat_is_captured_with_token_ids_and_logprobs(admin, collector_config, tokenizer):
    client = rollout_client(admin, "stream-1")
    chunks = list(client.chat.completions.create(model="anything", messages=MESSAGES, max_tokens=10, stream=True,
                                                 temperature=0.0))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert all(c.usage is None for c in chunks)  # the usage chunk was not asked for
    assert all(c.choices[0].logprobs is None for c in chunks if c.choices)
    [span] = gateway_spans(collector_config, admin, chunks[0].id)
    attrs = span["attributes"]
    assert attrs[semconv.LLM_STREAMED] is True
    assert len(attrs[semconv.RESPONSE_TOKEN_IDS]) == 10 == len(attrs[semconv.RESPONSE_LOGPROBS])
    assert shown_text(tokenizer, attrs[semconv.RESPONSE_TOKEN_IDS]) == text == attrs[semconv.RESPONSE_TEXT]
    assert attrs[semconv.GEN_AI_USAGE_OUTPUT_TOKENS] == 10
    assert attrs[semconv.PROMPT_TOKEN_IDS][-4:] == tokenizer.encode("<|im_start|>assistant\n")


def test_client_that_asks_for_logprobs_and_token_ids_gets_them(admin, collector_config):
    client = rollout_client(admin, "asks-1")
    response = client.chat.completions.create(
        model="anything", messages=MESSAGES, max_tokens=5, logprobs=True, top_logprobs=2, extra_body={"return_token_ids": True})
    choice = response.choices[0]
    assert len(choice.logprobs.content) == 5 and all(len(t.top_logprobs) == 2 for t in choice.logprobs.content)
    [span] = gateway_spans(collector_config, admin, response.id)
    assert span["attributes"][semconv.RESPONSE_TOKEN_IDS] == choice.model_extra["token_ids"]
    assert span["attributes"][semconv.RESPONSE_LOGPROBS] == pytest.approx([t.logprob for t in choice.logprobs.content])


def test_text_completion_records_prompt_ids_and_usage_chunk_on_request(admin, collector_config, tokenizer):
    client = rollout_client(admin, "completion-1")
    response = client.completions.create(model="anything", prompt="The capital of France is", max_tokens=6,
                                         temperature=0.0)
    [span] = gateway_spans(collector_config, admin, response.id)
    attrs = span["attributes"]
    assert attrs[semconv.GEN_AI_OPERATION_NAME] == "text_completion"
    assert attrs[semconv.PROMPT_TOKEN_IDS] == tokenizer.encode("The capital of France is")
    assert shown_text(tokenizer, attrs[semconv.RESPONSE_TOKEN_IDS]) == response.choices[0].text
    chunks = list(client.completions.create(model="anything", prompt="Hello", max_tokens=4, stream=True,
                                            stream_options={"include_usage": True}))
    assert chunks[-1].usage.completion_tokens == 4


def test_n_choices_give_one_span_each(admin, collector_config, tokenizer):
    client = rollout_client(admin, "n-1")
    response = client.chat.completions.create(model="anything", messages=MESSAGES, max_tokens=4, n=2, seed=11)
    spans = gateway_spans(collector_config, admin, response.id, expect=2)
    by_index = {s["attributes"][semconv.CHOICE_INDEX]: s["attributes"] for s in spans}
    for choice in response.choices:
        assert shown_text(tokenizer, by_index[choice.index][semconv.RESPONSE_TOKEN_IDS]) == choice.message.content


def test_a_seeded_rollout_samples_the_same_completions_again(admin, collector_config):
    """Two rollouts registered with one seed draw the same text for the same call (a run repeated with one config);
    another seed, or the same call asked again in one rollout, draws anew; a call's own seed is kept."""
    def draw(rollout_id: str, rollout_seed: int | None, **extra) -> tuple[str, str]:
        client = rollout_client(admin, rollout_id, seed=rollout_seed)
        response = client.chat.completions.create(model="anything", messages=MESSAGES, max_tokens=12, temperature=1.0, **extra)
        return response.choices[0].message.content, response.id

    first, first_id = draw("seeded-1", 123)
    again, _ = draw("seeded-2", 123)
    other, _ = draw("seeded-3", 124)
    assert again == first
    assert other != first
    client = rollout_client(admin, "seeded-4", seed=123)
    twice = [client.chat.completions.create(model="anything", messages=MESSAGES, max_tokens=12, temperature=1.0)
             .choices[0].message.content for _ in range(2)]
    assert twice[0] == first and twice[1] != first  # an agent drawing the same call twice gets two samples
    own = [draw(f"own-{rollout_seed}", rollout_seed, seed=5)[0] for rollout_seed in (123, 124)]
    assert own[0] == own[1]  # the call's seed, not the rollout's

    [span] = gateway_spans(collector_config, admin, first_id)
    sent = json.loads(span["attributes"][semconv.REQUEST_PARAMS])["seed"]
    assert isinstance(sent, int) and 0 <= sent < 2**63  # recorded with the call, as sent to vLLM


def test_a_seeded_call_after_a_tool_call_samples_the_same_whatever_id_the_server_gave_that_call(admin):
    """vLLM makes up each tool call's id (``chatcmpl-tool-<random>``); an agent sends it back in its next call, as the
    assistant turn's ``tool_calls[].id`` and the tool result's ``tool_call_id``. Two runs of one seed then asked with
    other ids for what the model sees as the same prompt, and the seed, a hash of the messages, differed: the retrieval
    example's reruns of one seed parted at 35 of 64 second calls (benchmarks/seed_divergence.py). The ids pair a call
    with its result; they are not what the call asks."""
    def after_tool_call(rollout_id: str, call_id: str, *, query: str = "Ola Drent") -> str:
        messages = [*MESSAGES,
                    {"role": "assistant", "content": None, "tool_calls": [
                        {"id": call_id, "type": "function",
                         "function": {"name": "search", "arguments": json.dumps({"query": query})}}]},
                    {"role": "tool", "tool_call_id": call_id, "content": "Ola Drent is a pilot born in Sorbdal."}]
        client = rollout_client(admin, rollout_id, seed=123)
        return client.chat.completions.create(model="anything", messages=messages, max_tokens=12,
                                              temperature=1.0).choices[0].message.content

    first = after_tool_call("ids-1", "chatcmpl-tool-4f1c9d2e")
    assert after_tool_call("ids-2", "chatcmpl-tool-a07b3e55") == first
    draws = {after_tool_call(f"ids-q{i}", "chatcmpl-tool-4f1c9d2e", query=f"Ola Drent {i}") for i in range(3)}
    assert len(draws | {first}) > 1  # what the call asks still seeds it: other arguments, other draws


def test_unknown_rollout_is_404_and_malformed_request_is_400(admin, gateway):
    unknown = OpenAI(base_url=f"{gateway.url}/rollout/never-registered/v1", api_key="x", max_retries=0)
    with pytest.raises(APIStatusError) as err:
        unknown.chat.completions.create(model="m", messages=MESSAGES)
    assert err.value.status_code == 404 and "not registered" in err.value.message
    admin.register_rollout(rollout_id="bad-1")
    r = httpx.post(f"{gateway.url}/rollout/bad-1/v1/chat/completions", content=b"{not json")
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]["message"]
    r = httpx.post(f"{gateway.url}/rollout/bad-1/v1/chat/completions", json={"model": "m", "messages": "hi"})
    assert r.status_code == 400 and "messages" in r.json()["error"]["message"]
    r = httpx.post(f"{gateway.url}/admin/rollouts", json={"rollout_id": "has space"}, headers=bearer(gateway.token))
    assert r.status_code == 422


def test_the_gateway_a_stack_starts_takes_admin_calls_only_with_the_token_it_was_given(gateway):
    # issue 68: without gateway.token its admin routes were open to any local process, an agent among them
    refused = {(path, str(headers)): httpx.request(method, f"{gateway.url}{path}", json=body, headers=headers, timeout=30).status_code
               for method, path, body in [("POST", "/admin/rollouts", {"rollout_id": "local-1"}),
                                          ("GET", "/admin/policies", None), ("POST", "/admin/flush", None),
                                          ("POST", "/admin/weights", {"uri": "file:///tmp/staged/p/v1"})]
               for headers in ({}, bearer("arclight"))}
    assert set(refused.values()) == {401}, refused
    assert gateway.token and GatewayClient(gateway.url, token=gateway.token).policies()["base_model"] == "tiny"


def test_upstream_error_is_passed_on_and_recorded_as_an_error_span(admin, collector_config, gateway):
    client = rollout_client(admin, "upstream-err-1")
    with pytest.raises(APIStatusError) as err:  # longer than max_model_len (1024): vLLM answers 400
        client.chat.completions.create(model="anything", messages=MESSAGES, max_tokens=5000)
    assert err.value.status_code == 400 and "vLLM answered 400" in err.value.message
    assert admin.flush()
    time.sleep(0.5)
    with Catalog.from_config(collector_config).read() as con:
        rows = con.execute("SELECT status_code, attributes FROM spans WHERE rollout_id = 'upstream-err-1'").fetchall()
    assert len(rows) == 1 and rows[0][0] == "ERROR"
    assert "vLLM answered 400" in json.loads(rows[0][1])[semconv.ERROR_TYPE]


def test_production_path_and_metrics(gateway, admin):
    client = OpenAI(base_url=f"{gateway.url}/v1", api_key="x", max_retries=0)
    assert client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=2).usage.completion_tokens == 2
    assert {"tiny", "default"} <= {m.id for m in client.models.list()}
    metrics = httpx.get(f"{gateway.url}/metrics").text
    assert 'arclight_gateway_requests_total{endpoint="chat",status="200"}' in metrics
    assert "arclight_gateway_spans_recorded_total" in metrics
