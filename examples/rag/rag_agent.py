"""The retrieval agent: an OpenAI Agents SDK agent that answers multi-hop questions by searching an encyclopedia.

Plain Agents SDK code with no Arclight in it. The model client is the SDK's ``OpenAIChatCompletionsModel`` over an
``AsyncOpenAI`` client, which reads ``OPENAI_BASE_URL`` and ``OPENAI_API_KEY`` like any deployment; point them at
Arclight's gateway and every call is served and recorded there.

The agent has two tools: ``search(query)``, the best ``k`` documents by BM25 (the config gives 1), and
``answer(answer)``, which ends the run (``StopAtTools``). ``tool_choice="required"`` makes the server constrain
every reply to a call of one of them (a 135M model writes no tool calls on its own). The chat template of the example's model shows neither the
tools nor the model's own calls, so the system prompt describes the tools and every search result repeats the
query it answers. A search that finds nothing, or a call whose arguments are not the tool's JSON, is a failed tool
call: the SDK tells the model so, and the failed tool span costs the call that wrote it
(``pipeline.tool_failure_penalty``).

    OPENAI_BASE_URL=http://127.0.0.1:8000/v1 OPENAI_API_KEY=x .venv/bin/python examples/rag/rag_agent.py \\
        "Where was the founder of Styn Holdings born?"
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass, field

from agents import (Agent, MaxTurnsExceeded, ModelBehaviorError, ModelSettings, OpenAIChatCompletionsModel, Runner,
                    StopAtTools, function_tool)
from openai import AsyncOpenAI
from retriever import Hit, Retriever

SYSTEM = (
    "You answer questions about people, companies, cities and countries by searching an encyclopedia. "
    "Each turn, call one tool: search with a query, or answer with the final answer, a name only. "
    "Search for the question first, then for the name you found, then answer."
)
# Worked examples as real turns (a 135M model follows a protocol it has seen, and copies what it has seen): a world
# of their own. One example taught the base model to repeat its query ("Bex Mills") and its answer ("Sorbdal");
# three, one one-hop and two two-hop, each searching with its question first, taught it to copy the question it is
# asked and a name from the result (README: "The agent and what the model sees").
EXAMPLES = [
    ("Who founded Kel Labs?", [
        ("search", {"query": "Who founded Kel Labs?"},
         "Kel Labs: Kel Labs is a software company founded by Tia Mork in 1977. Its headquarters are in Vendu."),
        ("answer", {"answer": "Tia Mork"}, "Tia Mork"),
    ]),
    ("Where was the founder of Bex Mills born?", [
        ("search", {"query": "Where was the founder of Bex Mills born?"},
         "Bex Mills: Bex Mills is a brewing company founded by Ola Drent in 1901. Its headquarters are in Tamvik."),
        ("search", {"query": "Ola Drent"}, "Ola Drent: Ola Drent is a pilot born in Sorbdal in 1950. She works for Bex Mills."),
        ("answer", {"answer": "Sorbdal"}, "Sorbdal"),
    ]),
    ("In which country are the headquarters of Rin Group?", [
        ("search", {"query": "In which country are the headquarters of Rin Group?"},
         "Rin Group: Rin Group is a mining company founded by Edda Voss in 1968. Its headquarters are in Almby."),
        ("search", {"query": "Almby"}, "Almby: Almby is a small city in Teskland. It was founded in 1402 and lies on the Ure river."),
        ("answer", {"answer": "Teskland"}, "Teskland"),
    ]),
]


@dataclass
class Trace:
    """What the agent did: its queries, the documents each returned, and its answer."""

    queries: list[str] = field(default_factory=list)
    found: list[list[str]] = field(default_factory=list)  # titles per search
    texts: list[str] = field(default_factory=list)
    answer: str | None = None


def example_items() -> list[dict]:
    """The worked examples as Agents SDK input items: each question, then each tool call and its output."""
    items: list[dict] = []
    for j, (question, steps) in enumerate(EXAMPLES):
        items.append({"role": "user", "content": question})
        for i, (tool, arguments, output) in enumerate(steps):
            call_id = f"example-{j}-{i}"
            if tool == "search":
                output = f"Results for {arguments['query']!r}:\n[1] {output}"
            items.append({"type": "function_call", "call_id": call_id, "name": tool, "arguments": json.dumps(arguments)})
            items.append({"type": "function_call_output", "call_id": call_id, "output": output})
    return items


def build_agent(retriever: Retriever, trace: Trace, *, model: str, temperature: float, max_tokens: int, k: int,
                max_searches: int | None = None, on_search: Callable[[str, list[Hit]], None] | None = None) -> Agent:
    """The agent; after ``max_searches`` searches (None: no limit) ``answer`` is the only tool it is offered, so its
    next reply is the answer, whatever it read last. ``on_search(query, hits)`` runs inside each search, while its
    tool span is the current span (how rag_entry.py records the search's own reward on it)."""

    def may_search(_ctx, _agent) -> bool:
        return max_searches is None or len(trace.queries) < max_searches

    @function_tool(is_enabled=may_search)
    def search(query: str) -> str:
        """Search the encyclopedia; returns the best documents for the query."""
        hits = retriever.search(query, k)
        trace.queries.append(query)
        trace.found.append([h.title for h in hits])
        trace.texts += [h.text for h in hits]
        if on_search is not None:
            on_search(query, hits)
        if not hits:
            raise LookupError(f"no document matches {query!r}: search for a name from the question or a result")
        lines = [f"[{i}] {h.title}: {h.text}" for i, h in enumerate(hits, 1)]
        return f"Results for {query!r}:\n" + "\n".join(lines)

    @function_tool
    def answer(answer: str) -> str:
        """Give the final answer (a name only)."""
        trace.answer = answer
        return answer

    client = AsyncOpenAI(max_retries=0)  # OPENAI_BASE_URL / OPENAI_API_KEY from the environment
    return Agent(
        name="researcher", instructions=SYSTEM, tools=[search, answer],
        model=OpenAIChatCompletionsModel(model=model, openai_client=client),
        model_settings=ModelSettings(tool_choice="required", temperature=temperature, max_tokens=max_tokens),
        tool_use_behavior=StopAtTools(stop_at_tool_names=["answer"]), reset_tool_choice=False,
    )


async def solve(question: str, retriever: Retriever, *, model: str, temperature: float = 1.0, max_tokens: int = 64,
                max_turns: int = 4, k: int = 1, max_searches: int | None = None,
                on_search: Callable[[str, list[Hit]], None] | None = None) -> Trace:
    """Run the agent on ``question``; the trace says what it searched, found and answered (``answer`` None when it
    gave none within ``max_turns`` model calls). With ``max_searches`` below ``max_turns`` it always answers."""
    trace = Trace()
    agent = build_agent(retriever, trace, model=model, temperature=temperature, max_tokens=max_tokens, k=k,
                        max_searches=max_searches, on_search=on_search)
    try:
        await Runner.run(agent, [*example_items(), {"role": "user", "content": question}], max_turns=max_turns)
    except (MaxTurnsExceeded, ModelBehaviorError):  # no answer in time, or a reply that is no tool call
        pass
    return trace


if __name__ == "__main__":
    from agents import set_tracing_disabled

    set_tracing_disabled(True)
    result = asyncio.run(solve(sys.argv[1], Retriever(), model=os.environ.get("OPENAI_MODEL", "base")))
    print(json.dumps(result.__dict__, indent=1))
