"""The agent: a LangGraph graph. Arclight calls ``run(task, ctx)`` once per rollout and trains on its model calls.

``task`` is one line of tasks.jsonl. ``ctx`` holds the rollout's model URL (``ctx.base_url``: every call through it is
recorded with its token ids), the model name to ask for (``ctx.model``), the sampling temperature and
``ctx.resources`` (config.yaml's ``rollouts.resources``). The value ``run`` returns is the rollout's reward.
OpenInference's LangChain instrumentation traces the graph: each node's name becomes the agent name of the model calls
made in it (``agent_match`` in config.yaml picks nodes by it).
"""

import re
from typing import TypedDict

from langchain_openai import ChatOpenAI
from langgraph.graph import END, START, StateGraph
from openinference.instrumentation.langchain import LangChainInstrumentor


class State(TypedDict):
    question: str
    answer: str


def build_graph(llm: ChatOpenAI):
    """One node, ``solver``: add your nodes and edges here."""

    def solver(state: State) -> dict:
        # The model call: any number of them, in any node.
        reply = llm.invoke([("system", "Answer with the number only."), ("user", state["question"])])
        return {"answer": reply.content or ""}

    graph = StateGraph(State)
    graph.add_node("solver", solver)
    graph.add_edge(START, "solver")
    graph.add_edge("solver", END)
    return graph.compile()


def run(task: dict, ctx) -> float:
    """Run the graph on one task through the rollout's model URL; return 1.0 for the right answer, else 0.0."""
    if not LangChainInstrumentor().is_instrumented_by_opentelemetry:
        LangChainInstrumentor().instrument()
    llm = ChatOpenAI(base_url=ctx.base_url, api_key=ctx.api_key, model=ctx.model, temperature=ctx.temperature,
                     max_tokens=int(ctx.resources.get("max_tokens", 16)), max_retries=0)
    state = build_graph(llm).invoke({"question": task["question"], "answer": ""})

    # The reward: how good this rollout was, for this task. Here: the first number in the answer is the right one.
    numbers = re.findall(r"-?\d+", state["answer"])
    return 1.0 if numbers[:1] == [task["answer"]] else 0.0
