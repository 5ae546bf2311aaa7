"""How Arclight runs the LangGraph calc agent: configuration only, no change to ``calc_graph.py``.

The runner calls ``run(task, ctx)`` in a fresh worker process whose global OpenTelemetry tracer
provider already exports to Arclight's collector with the rollout's context. This wrapper

1. turns on OpenInference's LangChain instrumentation (it uses that global provider), so every
   graph node and ChatOpenAI call becomes a span; LangGraph node names become agent names;
2. points the OpenAI environment variables at the rollout's gateway URL, where each call's token
   ids and logprobs are recorded; the gateway routes the model name (the policy) to its current
   version;
3. scores the graph's answer against the task (reward 1 for the right number, else 0).
"""

from __future__ import annotations

import os

from calc_graph import solve
from openinference.instrumentation.langchain import LangChainInstrumentor


def run(task: dict, ctx) -> float:
    """Run the graph on one task through the rollout's gateway URL; return 1.0 for the right answer."""
    instrumentor = LangChainInstrumentor()
    if not instrumentor.is_instrumented_by_opentelemetry:
        instrumentor.instrument()
    os.environ["OPENAI_BASE_URL"] = ctx.base_url
    os.environ["OPENAI_API_KEY"] = ctx.api_key
    r = ctx.resources
    answer = solve(task["question"], model=ctx.model, temperature=ctx.temperature,
                   max_tokens=int(r.get("max_tokens", 40)), max_turns=int(r.get("max_turns", 3)))
    return 1.0 if answer is not None and abs(answer - task["answer"]) < 1e-6 else 0.0
