"""Spans from real instrumented frameworks -> the triplets a person reading the trace expects.

A real vLLM (CPU) serves a tiny model behind the real gateway, which records each call's token ids
to the real collector; the agent side runs a real framework, instrumented by real OpenTelemetry
instrumentations exporting over OTLP to the same collector -- or a Node.js agent with the
OpenTelemetry JS SDK. Agents that follow docs/span-conventions.md without the SDK give their
reward as a span with ``arclight.reward.value`` alone. Each case has its own run id.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from typing import TypedDict

import pytest
from openai import OpenAI

from lightning_core import tracing
from lightning_core.store.catalog import Catalog
from lightning_core.serving.client import GatewayClient
from lightning_core.common.model import load_tokenizer
from lightning_core.pipeline.triplets import materialize_triplets
from lightning_core.tracing import RolloutContext, init_tracing
from lightning_core.store.outputs import load_triplets
from tests.helpers.tokens import gateway_tokens, shown_text

pytestmark = pytest.mark.integration

EPOCH = 0


@pytest.fixture(scope="module")
def admin(gateway) -> GatewayClient:
    return GatewayClient(gateway.url, token=gateway.token)


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    return load_tokenizer(tiny_model_dir)


def start_rollout(admin: GatewayClient, collector, *, run_id: str, rollout_id: str, instrumentor):
    """Register a rollout with the gateway, set up OTLP tracing with its context, instrument; return (base_url, handle)."""
    task_id = f"task-{rollout_id}"
    base_url = admin.register_rollout(rollout_id=rollout_id, run_id=run_id, epoch=EPOCH, task_id=task_id)
    handle = init_tracing(endpoint=collector.url, context=RolloutContext(
        run_id=run_id, epoch=EPOCH, rollout_id=rollout_id, task_id=task_id, attempt=0), set_global=False)
    for each in _instrumentors(instrumentor):
        each.instrument(tracer_provider=handle.provider)
    return base_url, handle


def finish_rollout(admin: GatewayClient, handle, instrumentor) -> None:
    """Uninstrument, and make both span streams (agent process and gateway) durable in the lake."""
    for each in _instrumentors(instrumentor):
        each.uninstrument()
    assert handle.flush(), "the agent's spans were not exported"
    handle.shutdown()
    assert admin.flush(), "the gateway's spans were not exported"


def _instrumentors(instrumentor) -> list:
    return list(instrumentor) if isinstance(instrumentor, (list, tuple)) else [instrumentor]


def reward(value: float) -> None:
    """A reward as an agent that follows the span conventions without the SDK's helper writes it."""
    with tracing.span("score", **{"arclight.reward.value": value}):
        pass


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
        reward(0.75)
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
        assert shown_text(tokenizer, t["response_token_ids"]) == response.choices[0].message.content
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


@pytest.mark.parametrize("make_client_instrumentor", [openllmetry, openinference], ids=["openllmetry", "openinference"])
def test_langgraph_with_a_client_instrumentation_under_a_root_span_gives_one_triplet_per_call(
        make_client_instrumentor, admin, collector, collector_config):
    # fails before: 6 triplets for 3 calls, half without token ids, per-agent counts doubled: the
    # client span hung on the root, and the ChatOpenAI span's response id sat unread in output.value
    from openinference.instrumentation.langchain import LangChainInstrumentor

    run_id = f"fw-langgraph-{make_client_instrumentor.__name__}"
    instrumentors = [LangChainInstrumentor(), make_client_instrumentor()]
    base_url, handle = start_rollout(admin, collector, run_id=run_id, rollout_id=f"{run_id}-r0", instrumentor=instrumentors)
    try:
        with tracing.span("graph run"):
            langgraph_app(base_url).invoke({"question": "What is 6 * 7?", "plan": "", "answer": ""})
            reward(1.0)
    finally:
        finish_rollout(admin, handle, instrumentors)
    recorded = gateway_tokens(collector_config, run_id)
    assert len(recorded) == 3

    report = materialize_triplets(collector_config, run_id=run_id, epoch=EPOCH)
    triplets = load_triplets(collector_config, run_id=run_id, epoch=EPOCH, policy="default").to_pylist()
    assert (report.llm_calls, report.rewards, report.silences) == (3, 1, [])
    assert report.agents == {"executor": 2, "planner": 1}
    assert [t["agent_name"] for t in triplets] == ["planner", "executor", "executor"]
    assert sorted(t["response_id"] for t in triplets) == sorted(recorded)
    for t in triplets:
        assert (t["prompt_token_ids"], t["response_token_ids"]) == recorded[t["response_id"]]
        assert t["reward"] == 1.0 and t["flags"] == ["zero_advantage_group"]
    # each call: the ChatOpenAI span, the client span and the gateway span
    assert [(c["span_count"], c["agent_name"]) for c in llm_calls(collector_config, run_id)] == [
        (3, "planner"), (3, "executor"), (3, "executor")]


def test_openai_agents_sdk_agent_with_a_handoff(admin, collector, collector_config):
    import asyncio

    from agents import Agent, ModelSettings, OpenAIChatCompletionsModel, Runner, set_trace_processors
    from openai import AsyncOpenAI
    from openinference.instrumentation.openai_agents import OpenAIAgentsInstrumentor

    set_trace_processors([])  # no export to OpenAI's servers; OpenInference's processor is added by instrument()
    run_id = "fw-openai-agents"
    instrumentor = OpenAIAgentsInstrumentor()
    base_url, handle = start_rollout(admin, collector, run_id=run_id, rollout_id=f"{run_id}-r0", instrumentor=instrumentor)
    try:
        model = OpenAIChatCompletionsModel(model="tiny", openai_client=AsyncOpenAI(base_url=base_url, api_key="unused", max_retries=0))
        solver = Agent(name="solver", instructions="Answer briefly.", model=model,
                       model_settings=ModelSettings(max_tokens=6, temperature=1.0))
        # the tiny random model would never choose the handoff: a named tool_choice makes vLLM call it
        triage = Agent(name="triage", instructions="Hand the question to the solver.", model=model, handoffs=[solver],
                       model_settings=ModelSettings(tool_choice="transfer_to_solver", max_tokens=32, temperature=1.0))
        result = asyncio.run(Runner.run(triage, "What is 2 + 3?", max_turns=4))
        reward(0.5)
    finally:
        finish_rollout(admin, handle, instrumentor)
    assert result.last_agent.name == "solver"
    recorded = gateway_tokens(collector_config, run_id)
    assert len(recorded) == 2

    report = materialize_triplets(collector_config, run_id=run_id, epoch=EPOCH)
    triplets = load_triplets(collector_config, run_id=run_id, epoch=EPOCH, policy="default").to_pylist()
    assert (report.llm_calls, report.rewards, report.silences) == (2, 1, [])
    assert [t["agent_name"] for t in triplets] == ["triage", "solver"]
    for t in triplets:  # the generation spans carry no response id: joined to the gateway's by time
        assert (t["prompt_token_ids"], t["response_token_ids"]) == recorded[t["response_id"]]
        assert t["reward"] == 0.5 and "missing_token_ids" not in t["flags"]
    assert "transfer_to_solver" in triplets[1]["prompt_messages"]  # the solver saw the handoff
    assert [(c["span_count"], c["agent_name"]) for c in llm_calls(collector_config, run_id)] == [(2, "triage"), (2, "solver")]


NODE_SENDER = Path(__file__).resolve().parent / "node_sender"


@pytest.fixture(scope="module")
def node_sender() -> Path:
    """The Node.js agent, its OpenTelemetry JS packages installed (npm ci, once)."""
    if shutil.which("node") is None or shutil.which("npm") is None:
        pytest.skip("node and npm are needed for the Node.js OTLP sender")
    if not (NODE_SENDER / "node_modules" / "@opentelemetry" / "sdk-trace-base").is_dir():
        subprocess.run(["npm", "ci", "--no-audit", "--no-fund"], cwd=NODE_SENDER, check=True, capture_output=True, timeout=300)
    return NODE_SENDER / "agent.mjs"


def run_node_agent(script: Path, **args) -> list[dict]:
    """Run the Node.js agent; return the calls it made (ids and token ids as it saw them)."""
    done = subprocess.run(["node", str(script), json.dumps(args)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)["calls"]


@pytest.mark.parametrize("through_gateway", [True, False], ids=["gateway", "direct"])
def test_a_nodejs_otlp_sender_with_its_reward_in_arclight_reward_value_alone(
        through_gateway, node_sender, admin, collector, collector_config, vllm_server, tokenizer):
    # fails before: the reward span was ignored (reward 0.0, '0 rewards'), and without the gateway
    # the sender's own token ids were not read: its calls fell back to retokenizing
    run_id = f"fw-node-{'gateway' if through_gateway else 'direct'}"
    rollout_id, task_id = f"{run_id}-r0", f"task-{run_id}-r0"
    if through_gateway:
        base_url = admin.register_rollout(rollout_id=rollout_id, run_id=run_id, epoch=EPOCH, task_id=task_id)
    else:
        base_url = f"{vllm_server.url}/v1"
    questions = ["What is 2 + 3?", "Name a colour."]
    sent = run_node_agent(node_sender, collector=collector.url, baseUrl=base_url, model="tiny", questions=questions, reward=0.5,
                          resource={"arclight.run_id": run_id, "arclight.epoch": EPOCH, "arclight.rollout_id": rollout_id,
                                    "arclight.task_id": task_id, "arclight.attempt": 0})
    assert admin.flush()

    config = collector_config.model_copy(deep=True)
    config.pipeline.missing_token_ids = "retokenize"
    config.pipeline.tokenizer_path = Path("/nonexistent")  # fails the run if any call had to be retokenized
    report = materialize_triplets(config, run_id=run_id, epoch=EPOCH)
    triplets = load_triplets(config, run_id=run_id, epoch=EPOCH, policy="default").to_pylist()
    assert (report.llm_calls, report.rewards, report.missing_rewards, report.silences) == (2, 1, 0, [])
    assert [t["response_id"] for t in triplets] == [c["id"] for c in sent]
    for t, call, question in zip(triplets, sent, questions):
        assert (t["prompt_token_ids"], t["response_token_ids"]) == (call["prompt_token_ids"], call["response_token_ids"])
        assert t["prompt_token_ids"] == tokenizer.apply_chat_template(
            [{"role": "user", "content": question}], add_generation_prompt=True, tokenize=True, return_dict=False)
        assert t["agent_name"] == "solver" and t["reward"] == 0.5 and t["rollout_id"] == rollout_id
        assert "retokenized" not in t["flags"] and "missing_token_ids" not in t["flags"]
    if through_gateway:  # the gateway's span is the source of the ids and logprobs, merged with the sender's
        recorded = gateway_tokens(collector_config, run_id)
        assert all((t["prompt_token_ids"], t["response_token_ids"]) == recorded[t["response_id"]] for t in triplets)
        assert all(len(t["response_logprobs"]) == len(t["response_token_ids"]) for t in triplets)
    assert [c["span_count"] for c in llm_calls(collector_config, run_id)] == ([2, 2] if through_gateway else [1, 1])
