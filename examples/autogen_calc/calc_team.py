"""The calc task as an AutoGen team: a ``solver`` that may ask a ``calculator``, and a ``reviewer``.

Plain AutoGen AgentChat code, run as its own program in its own virtualenv (``.venv-agents``); it
imports nothing of Arclight. Arclight runs it once per rollout (``rollouts.command`` in
config.yaml) and gives it everything through the environment, the way a deployment would:

- the model: ``OPENAI_BASE_URL`` (the rollout's gateway URL), ``OPENAI_API_KEY``, ``ARCLIGHT_MODEL``,
  ``ARCLIGHT_TEMPERATURE``; the task on standard input (``{"question": ..., "answer": ...}``);
- tracing: AutoGen's own OpenTelemetry spans (``invoke_agent solver`` with ``gen_ai.agent.name``),
  exported by the OTel SDK configured by the standard ``OTEL_*`` variables.

The team is a ``SelectorGroupChat`` whose speaker order is a plain function (no model call): the
task goes to the solver; ``CALC: <expression>`` goes to the calculator, which answers
``RESULT: <value>``; ``ANSWER: <n>`` (or a reply with neither, or the last turn) goes to the
reviewer, who says whether it holds, and the run ends. The protocol and the worked example are
the calc example's (``examples/calc/calc_protocol.py``). The reward, printed as the last line, is 1
when the solver's answer is right: only the solver is trained (``agent_match: "^solver$"``); the
reviewer's calls are recorded but not trained on.

    echo '{"question": "Ava has 3 boxes with 4 apples each. How many apples are there?", "answer": 12}' | \\
      OPENAI_BASE_URL=http://127.0.0.1:8000/v1 OPENAI_API_KEY=x ARCLIGHT_MODEL=base \\
      PYTHONPATH=examples/calc .venv-agents/bin/python examples/autogen_calc/calc_team.py
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
from typing import Sequence

from autogen_agentchat.agents import AssistantAgent, BaseChatAgent
from autogen_agentchat.base import Response
from autogen_agentchat.conditions import MaxMessageTermination, SourceMatchTermination
from autogen_agentchat.messages import BaseAgentEvent, BaseChatMessage, TextMessage
from autogen_agentchat.teams import SelectorGroupChat
from autogen_core import CancellationToken
from autogen_core.model_context import UnboundedChatCompletionContext
from autogen_core.models import AssistantMessage, ModelInfo, UserMessage
from autogen_ext.models.openai import OpenAIChatCompletionClient
from calc_protocol import ANSWER, CALC, EXAMPLE, SYSTEM, _number, calculate

REVIEWER = "You check answers to math word problems. Reply 'APPROVE' if the last ANSWER is right, else 'REJECT'."
MODEL_INFO = ModelInfo(vision=False, function_calling=False, json_output=False, family="unknown", structured_output=False)


class Calculator(BaseChatAgent):
    """Answers the solver's ``CALC: <expression>`` with ``RESULT: <value>`` (``RESULT: error`` when it cannot)."""

    def __init__(self) -> None:
        super().__init__("calculator", description="Evaluates the solver's CALC expression.")

    @property
    def produced_message_types(self) -> Sequence[type[BaseChatMessage]]:
        return (TextMessage,)

    async def on_messages(self, messages: Sequence[BaseChatMessage], cancellation_token: CancellationToken) -> Response:
        found = CALC.search(messages[-1].to_text()) if messages else None
        try:
            result = _number(calculate(found.group(1))) if found else "error"
        except (ValueError, SyntaxError, ZeroDivisionError, TypeError):
            result = "error"
        return Response(chat_message=TextMessage(content=f"RESULT: {result}", source=self.name))

    async def on_reset(self, cancellation_token: CancellationToken) -> None:
        return None


def build_team(client: OpenAIChatCompletionClient, reviewer_client: OpenAIChatCompletionClient, *, max_turns: int = 3):
    """The team: solver -> (calculator -> solver)* -> reviewer; the speaker order is ``next_speaker``."""
    example = [UserMessage(content=m["content"], source="user") if m["role"] == "user"
               else AssistantMessage(content=m["content"], source="solver") for m in EXAMPLE]
    solver = AssistantAgent("solver", client, system_message=SYSTEM,
                            model_context=UnboundedChatCompletionContext(initial_messages=example))
    reviewer = AssistantAgent("reviewer", reviewer_client, system_message=REVIEWER)

    def next_speaker(messages: Sequence[BaseAgentEvent | BaseChatMessage]) -> str:
        last = messages[-1]
        if last.source == "solver":
            text = last.to_text()
            solver_turns = sum(1 for m in messages if m.source == "solver")
            wants_tool = CALC.search(text) and not ANSWER.search(text) and solver_turns < max_turns
            return "calculator" if wants_tool else "reviewer"
        return "solver"  # the task, or the calculator's result

    return SelectorGroupChat(
        [solver, Calculator(), reviewer], model_client=client, selector_func=next_speaker, allow_repeated_speaker=True,
        termination_condition=SourceMatchTermination(["reviewer"]) | MaxMessageTermination(2 * max_turns + 2))


async def solve(question: str, *, max_turns: int = 3, max_tokens: int = 40) -> float | None:
    """Run the team on one question; return the number after the solver's last ``ANSWER:``, or None."""
    settings = dict(model=os.environ.get("ARCLIGHT_MODEL", "base"), base_url=os.environ["OPENAI_BASE_URL"],
                    api_key=os.environ.get("OPENAI_API_KEY", "unused"), model_info=MODEL_INFO, max_retries=1,
                    temperature=float(os.environ.get("ARCLIGHT_TEMPERATURE", "1.0")))
    client = OpenAIChatCompletionClient(**settings, max_tokens=max_tokens)
    reviewer_client = OpenAIChatCompletionClient(**settings, max_tokens=4)
    try:
        result = await build_team(client, reviewer_client, max_turns=max_turns).run(task=question)
    finally:
        await client.close()
        await reviewer_client.close()
    answers = [ANSWER.search(m.to_text()) for m in result.messages if m.source == "solver"]
    found = [a for a in answers if a]
    return float(found[-1].group(1)) if found else None


def main() -> int:
    from otel import tracing

    task = json.loads(sys.stdin.readline())
    resources = json.loads(os.environ.get("ARCLIGHT_RESOURCES") or "{}")
    with tracing():
        answer = asyncio.run(solve(task["question"], max_turns=int(resources.get("max_turns", 3)),
                                   max_tokens=int(resources.get("max_tokens", 40))))
    reward = 1.0 if answer is not None and abs(answer - float(task["answer"])) < 1e-6 else 0.0
    print(json.dumps({"reward": reward, "answer": answer}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
