"""The retrieval example's warm-start agent: the same agent, with a scripted oracle writing some of each group.

For SFT from traces (``multihop_sft.yaml``) every group of a task's rollouts holds both sources of successful
multi-hop trajectories, so both are ordinary traces in the lake, recorded by the same gateway and collector:

- **the oracle** (the group's first ``resources.oracle_samples`` rollouts, default 1): the very same Agents SDK agent
  (system prompt, worked examples, tools, instrumentation, gateway), but each turn offers only the tool the chain
  needs next, with its argument constrained to one value (a JSON-schema ``enum``), one call per reply
  (``parallel_tool_calls`` off) at temperature 0. vLLM's constrained decoding then writes exactly the oracle's call,
  in the policy's own tokens and with its own logprobs: the gateway records prompt and response token ids as for
  any call, and SFT trains on them like on any other. The chat template shows the model no tool definitions, so the
  prompt is token for token the one the agent itself would see.
- **rejection sampling** (the rest of the group): the agent as in training, sampling at ``rollouts.temperature``.
  SFT keeps the rollouts whose reward is at least ``trainer.sft_min_reward`` (0.6: F1 >= 0.5 with a grounded
  answer), the oracle's too when its chain worked.

The oracle follows the chain the way the worked examples show: it searches with the question when BM25 ranks the
chain's first document first for it (else with that document's name), then with each next name of the chain, then
answers the gold answer. Each rollout span says which source wrote it (``rag.source``: ``oracle`` or ``sample``).
"""

from __future__ import annotations

import asyncio
import copy
import dataclasses

from agents import MaxTurnsExceeded, ModelBehaviorError, Runner
from rag_agent import Trace, build_agent, example_items
from rag_entry import prepare, retriever_of, score, search_rewarder
from rag_entry import run as sample
from retriever import Retriever


def plan(task: dict, retriever: Retriever, *, k: int) -> list[tuple[str, dict]]:
    """The oracle's calls for ``task``: (tool, arguments) in order, the answer last."""
    chain = task["chain"]
    hits = retriever.search(task["question"], k)
    first = task["question"] if hits and hits[0].title == chain[0] else chain[0]
    return [("search", {"query": first}), *(("search", {"query": name}) for name in chain[1:]),
            ("answer", {"answer": task["answer"]})]


async def teach(task: dict, retriever: Retriever, *, model: str, max_tokens: int, max_turns: int, k: int) -> Trace:
    """Run the agent with every reply constrained to the oracle's next call; the trace of what it did."""
    calls = plan(task, retriever, k=k)
    trace = Trace()
    agent = build_agent(retriever, trace, model=model, temperature=0.0, max_tokens=max_tokens, k=k,
                        on_search=search_rewarder(task))  # its searches report their information gain, as the agent's do
    agent.model_settings = dataclasses.replace(agent.model_settings, parallel_tool_calls=False)
    tools = {tool.name: tool for tool in agent.tools}
    schemas = {name: copy.deepcopy(tool.params_json_schema) for name, tool in tools.items()}
    step = 0

    def offer() -> None:  # the next call's tool, its arguments pinned
        if step < len(calls):
            name, arguments = calls[step]
            schema = copy.deepcopy(schemas[name])
            for key, value in arguments.items():
                schema["properties"][key]["enum"] = [value]
            tools[name].params_json_schema = schema

    def enabled(name: str):
        return lambda _ctx, _agent: step < len(calls) and calls[step][0] == name

    def advancing(invoke):
        async def on_invoke(ctx, arguments):
            nonlocal step
            try:
                return await invoke(ctx, arguments)
            finally:
                step += 1
                offer()
        return on_invoke

    for name, tool in tools.items():
        tool.is_enabled = enabled(name)
        tool.on_invoke_tool = advancing(tool.on_invoke_tool)
    offer()
    try:
        await Runner.run(agent, [*example_items(), {"role": "user", "content": task["question"]}], max_turns=max_turns)
    except (MaxTurnsExceeded, ModelBehaviorError):
        pass
    return trace


def run(task: dict, ctx) -> float:
    """The oracle for the group's first ``resources.oracle_samples`` rollouts (training only), else the agent."""
    oracle = ctx.mode == "train" and ctx.sample_index < int(ctx.resources.get("oracle_samples", 1))
    if not oracle:
        return sample(task, ctx, **{"rag.source": "sample"})
    prepare(ctx)
    r = ctx.resources
    trace = asyncio.run(teach(task, retriever_of(ctx), model=ctx.model, max_tokens=int(r.get("max_tokens", 64)),
                              max_turns=int(r.get("max_turns", 4)), k=int(r.get("k", 1))))
    return score(task, trace, **{"rag.source": "oracle"})
