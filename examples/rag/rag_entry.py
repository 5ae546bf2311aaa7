"""How Arclight runs the retrieval agent: configuration only, no change to ``rag_agent.py``.

The runner calls ``run(task, ctx)`` in a worker process whose global OpenTelemetry tracer provider exports to
Arclight's collector with the rollout's context. This wrapper

1. turns on OpenInference's Agents SDK instrumentation (in place of the SDK's own export to OpenAI), so the agent,
   each model call and each tool call become spans; the agent's name (``researcher``) names the policy's calls;
2. points the OpenAI environment variables at the rollout's gateway URL;
3. scores the answer (``reward.py``) and records what the agent did on the rollout's span (``rag.*``: searches,
   whether the gold chain's documents were found, whether the answer is grounded in a retrieved document);
4. gives each search its own reward, its information gain (``information_gain``), on its tool span as
   ``arclight.tool.reward``: the pipeline charges it to the model call that wrote the search, and
   ``pipeline.advantage: turn`` credits that call with it (docs/config.md, "Turn-level advantages").
"""

from __future__ import annotations

import asyncio
import os
from functools import lru_cache
from pathlib import Path

# (the Agents SDK and the instrumentation are imported at module level: the rollout fork server imports this module
# once, and every rollout process forked from it starts with them loaded)
from agents import set_trace_processors
from openinference.instrumentation.openai_agents import OpenAIAgentsInstrumentor
from opentelemetry import trace as otel_trace

from lightning_core.semconv import TOOL_REWARD
from rag_agent import solve
from retriever import DEFAULT_INDEX, Retriever, is_built
from reward import exact_match, f1, format_ok, reward

HERE = Path(__file__).resolve().parent
NEW_CHAIN_DOC_GAIN = 1.0  # a search's reward for each gold chain document it returned that this rollout had not seen
REREAD_PENALTY = -0.5  # and for each document it returned that this rollout had already seen (StepSearch's redundancy)


@lru_cache(maxsize=2)
def retriever(folder: str) -> Retriever:
    return Retriever(Path(folder))


if is_built(DEFAULT_INDEX):
    retriever(str(DEFAULT_INDEX))  # loaded once in the fork server: the rollout processes share it


@lru_cache(maxsize=1)
def instrument() -> None:
    set_trace_processors([])  # nothing to OpenAI's servers; OpenInference adds its processor
    OpenAIAgentsInstrumentor().instrument()


def run(task: dict, ctx, **attributes) -> float:
    """Answer one question through the rollout's gateway URL; return format + F1 (``reward.py``). ``attributes``
    go on the rollout span beside ``rag.*``."""
    prepare(ctx)
    r = ctx.resources
    trace = asyncio.run(solve(task["question"], retriever_of(ctx), model=ctx.model, temperature=ctx.temperature,
                              max_tokens=int(r.get("max_tokens", 64)), max_turns=int(r.get("max_turns", 4)),
                              k=int(r.get("k", 1)), max_searches=max_searches(r), on_search=search_rewarder(task)))
    return score(task, trace, chain_doc_bonus=chain_doc_bonus(ctx), **attributes)


def information_gain(titles: list[str], *, chain: list[str], seen: set[str]) -> float:
    """One search's own reward: ``NEW_CHAIN_DOC_GAIN`` for each document of the question's gold ``chain`` among
    ``titles`` that is not in ``seen``, ``REREAD_PENALTY`` for each title already in ``seen`` (any document: reading
    it again gains nothing), 0 for other new documents; adds ``titles`` to ``seen``."""
    gain = sum(REREAD_PENALTY if t in seen else NEW_CHAIN_DOC_GAIN if t in chain else 0.0 for t in titles)
    seen.update(titles)
    return gain


def search_rewarder(task: dict):
    """The ``on_search`` of one rollout: each search's information gain, set on its tool span (the current span
    inside the tool) as ``arclight.tool.reward``."""
    seen: set[str] = set()

    def on_search(_query: str, hits) -> None:
        gain = information_gain([h.title for h in hits], chain=task.get("chain", []), seen=seen)
        otel_trace.get_current_span().set_attribute(TOOL_REWARD, gain)

    return on_search


def chain_doc_bonus(ctx) -> float:
    """``resources.chain_doc_bonus``: a training-only shaping reward added for each document of the question's gold
    chain that the agent's searches found (default 0). Evaluations score format + F1 alone."""
    return float(ctx.resources.get("chain_doc_bonus", 0.0)) if ctx.mode == "train" else 0.0


def max_searches(resources: dict) -> int | None:
    """``resources.max_searches``: after that many searches the agent's only tool is ``answer`` (default: no limit)."""
    value = resources.get("max_searches")
    return None if value is None else int(value)


def prepare(ctx) -> None:
    """Instrument the Agents SDK once, and point the OpenAI environment at the rollout's gateway URL."""
    instrument()
    os.environ["OPENAI_BASE_URL"] = ctx.base_url
    os.environ["OPENAI_API_KEY"] = ctx.api_key


def retriever_of(ctx) -> Retriever:
    """The retriever over ``resources.index`` (default the example's ``index/``)."""
    index = Path(ctx.resources.get("index", DEFAULT_INDEX))
    return retriever(str(index if index.is_absolute() else HERE / index))


def score(task: dict, trace, *, chain_doc_bonus: float = 0.0, **attributes) -> float:
    """Record what the agent did on the rollout span (``rag.*``, plus ``attributes``); return its reward: format + F1,
    plus ``chain_doc_bonus`` for each gold chain document found (``rag.shaping``; 0 unless a training config sets it)."""
    found = {title for titles in trace.found for title in titles}
    chain_found = sum(1 for name in task.get("chain", []) if name in found)
    shaping = chain_doc_bonus * chain_found
    span = otel_trace.get_current_span()
    span.set_attributes({**attributes,
        "rag.searches": len(trace.queries),
        "rag.empty_searches": sum(1 for titles in trace.found if not titles),
        "rag.chain_found": chain_found,
        "rag.chain_length": len(task.get("chain", [])),
        "rag.answered": trace.answer is not None,
        "rag.format_ok": format_ok(trace.answer, trace.texts),
        "rag.grounded": trace.answer is not None and bool(trace.answer.strip())
        and any(trace.answer.strip().lower() in text.lower() for text in trace.texts),
        "rag.f1": f1(trace.answer, task["answer"]),
        "rag.exact_match": exact_match(trace.answer, task["answer"]),
        "rag.answer": trace.answer or "",
        "rag.shaping": shaping,
    })
    return reward(trace.answer, task["answer"], trace.texts) + shaping
