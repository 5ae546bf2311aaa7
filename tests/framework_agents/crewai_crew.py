"""A real CrewAI (1.15) crew, run as a ``rollouts.command`` agent (issue 44).

    .venv-agents/bin/python tests/framework_agents/crewai_crew.py --tracing openinference|openinference-events|openllmetry

Two agents, ``Question planner`` and ``Arithmetic solver``, one task each (sequential process, the
solver's task gets the plan as context), through CrewAI's own OpenAI provider (``LLM("openai/<model>")``).

``--tracing openinference``: OpenInference's CrewAI instrumentation, wrapper mode (crew, task and
agent spans; the model calls are only the gateway's). ``openinference-events``: the same package in
event-listener mode (it builds spans, LLM calls included, from CrewAI's event bus). ``openllmetry``:
``opentelemetry-instrumentation-crewai`` and ``-openai``.
Reward: the task's ``reward`` (default 1.0), as the last line of output.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile

import otel_setup

MAX_TOKENS = 8

# CrewAI must not reach the network or ask anything: its anonymous telemetry (its own OTLP exporter to
# telemetry.crewai.com; OTEL_SDK_DISABLED would also stop it, but it stops our spans too), its trace
# upload and first-run consent prompt, and the PyPI version check.
OFFLINE = {
    "CREWAI_DISABLE_TELEMETRY": "true",
    "CREWAI_DISABLE_TRACKING": "true",
    "CREWAI_TRACING_ENABLED": "false",
    "CREWAI_DISABLE_VERSION_CHECK": "true",
}


def instrument(mode: str, provider) -> list:
    """Instrument CrewAI per ``mode``; return the instrumentors (to uninstrument) and, for events, the listener's."""
    if mode in ("openinference", "openinference-events"):
        from openinference.instrumentation.crewai import CrewAIInstrumentor

        instrumentor = CrewAIInstrumentor()
        instrumentor.instrument(tracer_provider=provider, use_event_listener=mode == "openinference-events")
        return [instrumentor]
    from opentelemetry.instrumentation.crewai import (
        CrewAIInstrumentor as TraceloopCrewAIInstrumentor,
    )
    from opentelemetry.instrumentation.openai import OpenAIInstrumentor

    instrumentors = [TraceloopCrewAIInstrumentor(), OpenAIInstrumentor()]
    for each in instrumentors:
        each.instrument(tracer_provider=provider)
    return instrumentors


def run_crew(settings: dict, question: str) -> str:
    from crewai import LLM, Agent, Crew, Process, Task

    llm = LLM(model=f"openai/{settings['model']}", base_url=settings["base_url"], api_key=settings["api_key"],
              temperature=settings["temperature"], max_tokens=MAX_TOKENS, max_retries=0)
    planner = Agent(role="Question planner", goal="Plan how to answer the question.", backstory="Brief.",
                    llm=llm, allow_delegation=False, verbose=False, max_iter=1)
    solver = Agent(role="Arithmetic solver", goal="Answer with a number.", backstory="Brief.",
                   llm=llm, allow_delegation=False, verbose=False, max_iter=1)
    plan = Task(description="Plan: {question}", expected_output="A short plan.", agent=planner)
    answer = Task(description="Answer: {question}", expected_output="A number.", agent=solver, context=[plan])
    crew = Crew(agents=[planner, solver], tasks=[plan, answer], process=Process.sequential, verbose=False,
                tracing=False)
    return str(crew.kickoff(inputs={"question": question}))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tracing", choices=["openinference", "openinference-events", "openllmetry"], default="openinference")
    args = parser.parse_args(argv)
    for key, value in OFFLINE.items():
        os.environ.setdefault(key, value)
    # CrewAI keeps a SQLite file of task outputs under ~/.local/share/<cwd name>/ (CREWAI_STORAGE_DIR names
    # that folder; absolute, it is the folder) and locks it with a file in the temp dir: one folder per
    # process, removed at the end with its lock files, so concurrent rollouts share no state and leave nothing
    storage = None
    if "CREWAI_STORAGE_DIR" not in os.environ:
        storage = os.environ["CREWAI_STORAGE_DIR"] = tempfile.mkdtemp(prefix="crewai-rollout-")
        os.environ["TMPDIR"] = storage
        tempfile.tempdir = None  # gettempdir() reads TMPDIR again
    try:
        return _run(args)
    finally:
        if storage is not None:
            shutil.rmtree(storage, ignore_errors=True)


def _run(args: argparse.Namespace) -> int:
    task = otel_setup.read_task()
    settings = otel_setup.model_settings()
    provider = otel_setup.start_provider(set_global=False)
    instrumentors = instrument(args.tracing, provider)
    try:
        with otel_setup.root_span(provider, "crewai crew"):
            answer = run_crew(settings, str(task.get("question", "What is 2 + 3?")))
            if args.tracing == "openinference-events":
                # the listener ends the kickoff's span from an event handled on the bus's own thread:
                # without this the crew.kickoff span is still open (lost) when the program exits
                from crewai.events.event_bus import crewai_event_bus

                crewai_event_bus.flush()
            reward = float(task.get("reward", 1.0))
    except Exception:
        return otel_setup.fail(provider)
    finally:
        for each in instrumentors:
            each.uninstrument()
    print(f"answer: {answer!r}", file=sys.stderr)
    otel_setup.finish(provider, reward)
    return 0


if __name__ == "__main__":
    sys.exit(main())
