"""The agent: an OpenAI Agents SDK agent. Arclight calls ``run(task, ctx)`` once per rollout and trains on its calls.

``task`` is one line of tasks.jsonl. ``ctx`` holds the rollout's model URL (``ctx.base_url``: every call through it is
recorded with its token ids), the model name to ask for (``ctx.model``), the sampling temperature and
``ctx.resources`` (config.yaml's ``rollouts.resources``). The value ``run`` returns is the rollout's reward.
OpenInference's Agents SDK instrumentation traces the run: the agent's ``name`` becomes the agent name of its model
calls (``agent_match`` in config.yaml picks agents by it).
"""

import asyncio
import re

from agents import Agent, ModelSettings, OpenAIChatCompletionsModel, Runner, set_trace_processors
from openai import AsyncOpenAI
from openinference.instrumentation.openai_agents import OpenAIAgentsInstrumentor



def run(task: dict, ctx) -> float:
    """Run the agent on one task through the rollout's model URL; return 1.0 for the right answer, else 0.0."""
    if not OpenAIAgentsInstrumentor().is_instrumented_by_opentelemetry:
        set_trace_processors([])  # no traces to OpenAI's servers: OpenInference sends them to Arclight
        OpenAIAgentsInstrumentor().instrument()
    client = AsyncOpenAI(base_url=ctx.base_url, api_key=ctx.api_key, max_retries=0)
    agent = Agent(
        name="solver",
        instructions="Answer with the number only.",  # add tools=[...] and handoffs here
        model=OpenAIChatCompletionsModel(model=ctx.model, openai_client=client),
        model_settings=ModelSettings(temperature=ctx.temperature, max_tokens=int(ctx.resources.get("max_tokens", 16))),
    )
    # The model calls: the SDK makes them, one or more per turn.
    result = asyncio.run(Runner.run(agent, task["question"], max_turns=2))

    # The reward: how good this rollout was, for this task. Here: the first number in the answer is the right one.
    numbers = re.findall(r"-?\d+", str(result.final_output or ""))
    return 1.0 if numbers[:1] == [task["answer"]] else 0.0
