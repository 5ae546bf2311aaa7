"""A real AutoGen (autogen-agentchat 0.7) team, run as a ``rollouts.command`` agent (issue 44).

    .venv-agents/bin/python tests/framework_agents/autogen_team.py --team round_robin|selector --tracing native|openinference|native+openinference

Two AssistantAgents: ``solver`` (with a calculator FunctionTool) and ``reviewer``.
- ``round_robin``: RoundRobinGroupChat, stopped by MaxMessageTermination(4): the task, then solver,
  reviewer, solver -- three model calls (a tiny random model never calls the tool; reflection is off,
  so a tool call would not add a call either).
- ``selector``: SelectorGroupChat, the model picks the speakers: the group chat manager's own calls
  (up to ``max_selector_attempts`` for the first turn; later turns have one candidate and no call),
  then solver, reviewer, solver.

``--tracing native``: AutoGen's own OpenTelemetry spans (runtime and ``invoke_agent``), from the global
TracerProvider. ``--tracing openinference``: OpenInference's autogen-agentchat instrumentation only.
``--tracing native+openinference``: both, as a user who sets the global provider and instruments gets.
Reward: the task's ``reward`` (default 1.0), as the last line of output.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys

import otel_setup

MAX_TOKENS = 8


def calculator(expression: str) -> str:
    """Evaluate an arithmetic expression of numbers and + - * / ( )."""
    allowed = set("0123456789+-*/(). ")
    if not expression or not set(expression) <= allowed:
        return "error: only numbers and + - * / ( ) are allowed"
    try:
        return str(eval(expression, {"__builtins__": {}}, {}))
    except Exception as exc:  # a malformed expression is the agent's answer, not a crash
        return f"error: {exc}"


def build_team(kind: str, settings: dict):
    from autogen_agentchat.agents import AssistantAgent
    from autogen_agentchat.conditions import MaxMessageTermination
    from autogen_agentchat.teams import RoundRobinGroupChat, SelectorGroupChat
    from autogen_core.models import ModelInfo
    from autogen_core.tools import FunctionTool
    from autogen_ext.models.openai import OpenAIChatCompletionClient

    client = OpenAIChatCompletionClient(
        model=settings["model"], base_url=settings["base_url"], api_key=settings["api_key"],
        temperature=settings["temperature"], max_tokens=MAX_TOKENS, max_retries=0,
        model_info=ModelInfo(vision=False, function_calling=True, json_output=False, family="unknown",
                             structured_output=False),
    )
    solver = AssistantAgent(
        "solver", model_client=client, description="Solves arithmetic with a calculator.",
        system_message="Solve the arithmetic. Be brief.",
        tools=[FunctionTool(calculator, description="Evaluate an arithmetic expression.")],
        reflect_on_tool_use=False,
    )
    reviewer = AssistantAgent(
        "reviewer", model_client=client, description="Checks the solver's answer.",
        system_message="Check the answer. Be brief.",
    )
    stop = MaxMessageTermination(4)  # the task + three agent messages
    if kind == "round_robin":
        return RoundRobinGroupChat([solver, reviewer], termination_condition=stop), client
    return SelectorGroupChat([solver, reviewer], model_client=client, termination_condition=stop), client


async def run_team(kind: str, settings: dict, question: str) -> list[str]:
    team, client = build_team(kind, settings)
    try:
        result = await team.run(task=question)
    finally:
        await client.close()
    return [getattr(m, "source", "?") for m in result.messages]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--team", choices=["round_robin", "selector"], default="round_robin")
    parser.add_argument("--tracing", choices=["native", "openinference", "native+openinference"], default="native")
    args = parser.parse_args(argv)

    task = otel_setup.read_task()
    settings = otel_setup.model_settings()
    # native: AutoGen's runtime and agents take the global provider; it must be set before the team is built
    provider = otel_setup.start_provider(set_global=args.tracing.startswith("native"))
    instrumentor = None
    if args.tracing.endswith("openinference"):
        from openinference.instrumentation.autogen_agentchat import (
            AutogenAgentChatInstrumentor,
        )

        instrumentor = AutogenAgentChatInstrumentor()
        instrumentor.instrument(tracer_provider=provider)
    try:
        with otel_setup.root_span(provider, f"autogen {args.team}", **{"autogen.team": args.team}):
            speakers = asyncio.run(run_team(args.team, settings, str(task.get("question", "What is 2 + 3?"))))
            reward = float(task.get("reward", 1.0))
    except Exception:
        return otel_setup.fail(provider)
    finally:
        if instrumentor is not None:
            instrumentor.uninstrument()
    print(f"speakers: {json.dumps(speakers)}", file=sys.stderr)  # who spoke, in order
    if task.get("report_file"):  # for the test, which cannot see a program's output through the runner
        with open(task["report_file"], "w") as f:
            json.dump({"speakers": speakers}, f)
    otel_setup.finish(provider, reward)
    return 0


if __name__ == "__main__":
    sys.exit(main())
