"""Spans from real instrumented frameworks -> the triplets a person reading the trace expects.

A real vLLM (CPU) serves a tiny model behind the real gateway, which records each call's token ids
to the real collector; the agent side runs a real framework, instrumented by a real OpenTelemetry
instrumentation exporting over OTLP to the same collector. Each case has its own run id.
"""

from __future__ import annotations

import json
from typing import TypedDict

import pytest
from openai import OpenAI

from lightning_core import tracing
from lightning_core.catalog import Catalog
from lightning_core.gateway_client import GatewayClient
from lightning_core.model import load_tokenizer
from lightning_core.pipeline import load_triplets, materialize_triplets
from lightning_core.tracing import RolloutContext, init_tracing

pytestmark = pytest.mark.integration

EPOCH = 0


@pytest.fixture(scope="module")
def admin(gateway) -> GatewayClient:
    return GatewayClient(gateway.url)


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    return load_tokenizer(tiny_model_dir)


def start_rollout(admin: GatewayClient, collector, *, run_id: str, rollout_id: str, instrumentor):
    """Register a rollout with the gateway, set up OTLP tracing with its context, instrument; return (base_url, handle)."""
    task_id = f"task-{rollout_id}"
    base_url = admin.register_rollout(rollout_id=rollout_id, run_id=run_id, epoch=EPOCH, task_id=task_id)
    handle = init_tracing(endpoint=collector.url, context=RolloutContext(
        run_id=run_id, epoch=EPOCH, rollout_id=rollout_id, task_id=task_id, attempt=0), set_global=False)
    instrumentor.instrument(tracer_provider=handle.provider)
    return base_url, handle


def finish_rollout(admin: GatewayClient, handle, instrumentor) -> None:
    """Uninstrument, and make both span streams (agent process and gateway) durable in the lake."""
    instrumentor.uninstrument()
    assert handle.flush(), "the agent's spans were not exported"
    handle.shutdown()
    assert admin.flush(), "the gateway's spans were not exported"


def gateway_tokens(collector_config, run_id: str) -> dict[str, tuple[list[int], list[int]]]:
    """The token ids the gateway recorded per response id (typed columns of the spans view)."""
    with Catalog.from_config(collector_config).read() as con:
        rows = con.execute(
            "SELECT response_id, prompt_token_ids, response_token_ids FROM spans "
            "WHERE run_id = ? AND span_kind = 'llm' AND response_token_ids IS NOT NULL", [run_id]).fetchall()
    return {rid: (prompt, response) for rid, prompt, response in rows}


def llm_calls(collector_config, run_id: str) -> list[dict]:
    """The run's rows of the llm_calls analyst view."""
    with Catalog.from_config(collector_config).read() as con:
        table = con.execute("SELECT response_id, span_count, agent_name, flags FROM llm_calls WHERE run_id = ? "
                            "ORDER BY start_ns", [run_id]).to_arrow_table()
    return table.to_pylist()


def chat_agent(client: OpenAI, questions: list[str]) -> list:
    """A plain OpenAI-client agent: one call per question inside the 'solver' agent, then a reward."""
    answers = []
    with tracing.agent("solver"):
        for i, question in enumerate(questions):
            messages = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": question}]
            response = client.chat.completions.create(model="tiny", messages=messages, max_tokens=6,
                                                      temperature=1.0, seed=i)
            answers.append((messages, response))
        tracing.emit_reward(0.75)
    return answers


def openllmetry():
    from opentelemetry.instrumentation.openai import OpenAIInstrumentor

    return OpenAIInstrumentor()


def openinference():
    from openinference.instrumentation.openai import OpenAIInstrumentor

    return OpenAIInstrumentor()


@pytest.mark.parametrize("make_instrumentor", [openllmetry, openinference], ids=["openllmetry", "openinference"])
def test_instrumented_openai_client_gives_one_triplet_per_call_with_the_gateway_token_ids(
        make_instrumentor, admin, collector, collector_config, tokenizer):
    run_id = f"fw-{make_instrumentor.__name__}"
    instrumentor = make_instrumentor()
    base_url, handle = start_rollout(admin, collector, run_id=run_id, rollout_id=f"{run_id}-r0", instrumentor=instrumentor)
    try:
        client = OpenAI(base_url=base_url, api_key="unused", max_retries=0)
        answers = chat_agent(client, ["What is 2 + 3?", "Name a colour."])
    finally:
        finish_rollout(admin, handle, instrumentor)

    report = materialize_triplets(collector_config, run_id=run_id, epoch=EPOCH)
    triplets = load_triplets(collector_config, run_id=run_id, epoch=EPOCH, policy="default").to_pylist()
    recorded = gateway_tokens(collector_config, run_id)

    assert report.llm_calls == 2 and report.judge_calls == 0
    assert [t["response_id"] for t in triplets] == [response.id for _, response in answers]
    for turn, (t, (messages, response)) in enumerate(zip(triplets, answers)):
        assert t["turn_index"] == turn and t["agent_name"] == "solver"
        assert t["rollout_id"] == f"{run_id}-r0" and t["group_id"] == f"task-{run_id}-r0"
        # exactly the ids the gateway saw vLLM sample, which are the chat template and the answer
        assert (t["prompt_token_ids"], t["response_token_ids"]) == recorded[response.id]
        assert t["prompt_token_ids"] == tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, tokenize=True, return_dict=False)
        assert tokenizer.decode(t["response_token_ids"], skip_special_tokens=True) == response.choices[0].message.content
        assert len(t["response_logprobs"]) == len(t["response_token_ids"]) == response.usage.completion_tokens
        assert [{"role": m["role"], "content": m["content"]} for m in json.loads(t["prompt_messages"])] == messages
        assert t["reward"] == 0.75 and t["rollout_return"] == 0.75
        assert "missing_token_ids" not in t["flags"] and "no_reward" not in t["flags"]
    # the instrumentation's span of each call was merged with the gateway's span
    assert [(c["response_id"], c["span_count"], c["agent_name"]) for c in llm_calls(collector_config, run_id)] == [
        (response.id, 2, "solver") for _, response in answers]


class PlanState(TypedDict):
    question: str
    plan: str
    answer: str


def langgraph_app(base_url: str):
    """A two-node LangGraph graph: 'planner' makes one call, 'executor' makes two."""
    from langchain_openai import ChatOpenAI
    from langgraph.graph import END, START, StateGraph

    llm = ChatOpenAI(base_url=base_url, api_key="unused", model="tiny", max_tokens=6, temperature=1.0, max_retries=0)

    def planner(state: PlanState) -> dict:
        return {"plan": llm.invoke([("user", f"Plan how to answer: {state['question']}")]).content}

    def executor(state: PlanState) -> dict:
        draft = llm.invoke([("user", f"Follow the plan: {state['plan']}")]).content
        return {"answer": llm.invoke([("user", f"Check and answer: {draft}")]).content}

    graph = StateGraph(PlanState)
    graph.add_node("planner", planner)
    graph.add_node("executor", executor)
    graph.add_edge(START, "planner")
    graph.add_edge("planner", "executor")
    graph.add_edge("executor", END)
    return graph.compile()


def test_langgraph_nodes_own_their_calls_and_agent_match_selects_the_executor(admin, collector, collector_config):
    from openinference.instrumentation.langchain import LangChainInstrumentor

    run_id = "fw-langgraph"
    instrumentor = LangChainInstrumentor()
    base_url, handle = start_rollout(admin, collector, run_id=run_id, rollout_id=f"{run_id}-r0", instrumentor=instrumentor)
    try:
        result = langgraph_app(base_url).invoke({"question": "What is 6 * 7?", "plan": "", "answer": ""})
        tracing.emit_reward(1.0)
    finally:
        finish_rollout(admin, handle, instrumentor)
    assert isinstance(result["answer"], str)
    recorded = gateway_tokens(collector_config, run_id)
    assert len(recorded) == 3

    report = materialize_triplets(collector_config, run_id=run_id, epoch=EPOCH)
    everything = load_triplets(collector_config, run_id=run_id, epoch=EPOCH, policy="default").to_pylist()
    assert report.agents == {"executor": 2, "planner": 1}
    assert [t["agent_name"] for t in everything] == ["planner", "executor", "executor"]
    assert {t["response_id"] for t in everything} == set(recorded)
    for t in everything:
        assert (t["prompt_token_ids"], t["response_token_ids"]) == recorded[t["response_id"]]
        assert t["reward"] == 1.0
    assert "Plan how to answer: What is 6 * 7?" in everything[0]["prompt_messages"]
    assert "Follow the plan:" in everything[1]["prompt_messages"]

    materialize_triplets(collector_config, run_id=run_id, epoch=EPOCH, agent_match="executor")
    selected = load_triplets(collector_config, run_id=run_id, epoch=EPOCH, policy="default").to_pylist()
    assert [(t["agent_name"], t["turn_index"]) for t in selected] == [("executor", 0), ("executor", 1)]
    assert [t["response_id"] for t in selected] == [t["response_id"] for t in everything[1:]]
    assert [t["reward"] for t in selected] == [1.0, 1.0]
