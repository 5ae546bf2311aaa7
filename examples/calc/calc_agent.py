"""The calc agent: solves arithmetic word problems with a calculator tool, over a text protocol.

The model writes ``CALC: <expression>``; the agent runs the calculator and answers
``RESULT: <value>``; the model finishes with ``ANSWER: <number>``. A 135M model follows this
protocol when it sees one worked example as real chat turns (see ../../../shared/FACTS.md), so the
prompt carries one. Reward: 1 when the final answer equals the task's answer, else 0. A
calculator call that cannot be parsed is a failed tool span, which the pipeline can charge to
the model call that wrote it (pipeline.tool_failure_penalty).

The system prompt is a versioned resource (``rollouts.resources.prompts.system``; SYSTEM when
unset), so prompt optimisation can improve it without touching this code (config.apo.yaml);
``resources.worked_example: false`` leaves the worked example out; ``resources.tool_latency_s`` makes every
calculator call take that long, as a remote sandbox or API would (``benchmarks/async_bench.py``).

The agent is plain OpenAI-client code: Arclight only changes its ``base_url``.
"""

from __future__ import annotations

import time

from calc_protocol import ANSWER, CALC, EXAMPLE, SYSTEM, _number, calculate  # noqa: F401 (others import them from here)
from lightning_core import tracing


def run(task: dict, ctx) -> float:
    """Solve one problem through the gateway; return 1.0 for the right final answer, else 0.0."""
    client = ctx.openai_client()
    max_turns = int(ctx.resources.get("max_turns", 3))
    example = EXAMPLE if ctx.resources.get("worked_example", True) else []
    messages = [{"role": "system", "content": ctx.prompt("system", default=SYSTEM)}, *example,
                {"role": "user", "content": task["question"]}]
    answer = None
    latency_s = float(ctx.resources.get("tool_latency_s", 0.0))
    with tracing.agent("calc"):
        for _ in range(max_turns):
            reply = client.chat.completions.create(
                model=ctx.model, messages=messages, temperature=ctx.temperature,
                max_tokens=int(ctx.resources.get("max_tokens", 40)),
            )
            text = reply.choices[0].message.content or ""
            messages.append({"role": "assistant", "content": text})
            found = ANSWER.search(text)
            if found:
                answer = float(found.group(1))
                break
            call = CALC.search(text)
            if not call:
                break
            try:
                with tracing.tool("calculator", expression=call.group(1)):
                    time.sleep(latency_s)
                    result = _number(calculate(call.group(1)))
            except (ValueError, SyntaxError, ZeroDivisionError, TypeError):
                result = "error"
            messages.append({"role": "user", "content": f"RESULT: {result}"})
    return 1.0 if answer is not None and abs(answer - task["answer"]) < 1e-6 else 0.0
