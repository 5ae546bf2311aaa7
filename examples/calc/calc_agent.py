"""The calc agent: solves arithmetic word problems with a calculator tool, over a text protocol.

The model writes ``CALC: <expression>``; the agent runs the calculator and answers
``RESULT: <value>``; the model finishes with ``ANSWER: <number>``. A 135M model follows this
protocol when it sees one worked example as real chat turns (see ../../../shared/FACTS.md), so the
prompt carries one. Reward: 1 when the final answer equals the task's answer, else 0. A
calculator call that cannot be parsed is a failed tool span, which the pipeline can charge to
the model call that wrote it (pipeline.tool_failure_penalty).

The system prompt is a versioned resource (``rollouts.resources.prompts.system``; SYSTEM when
unset), so prompt optimisation can improve it without touching this code (config.apo.yaml);
``resources.worked_example: false`` leaves the worked example out.

The agent is plain OpenAI-client code: Arclight only changes its ``base_url``.
"""

from __future__ import annotations

import ast
import operator
import re

from lightning_core import tracing

SYSTEM = (
    "You solve math word problems. To compute, write one line 'CALC: <expression>'. "
    "You will get 'RESULT: <value>'. Then write 'ANSWER: <number>'."
)
EXAMPLE = [
    {"role": "user", "content": "Mia has 3 bags with 4 marbles each. How many marbles are there?"},
    {"role": "assistant", "content": "CALC: 3 * 4"},
    {"role": "user", "content": "RESULT: 12"},
    {"role": "assistant", "content": "ANSWER: 12"},
]
CALC = re.compile(r"CALC:\s*([^\n]+)", re.IGNORECASE)
ANSWER = re.compile(r"ANSWER:\s*(-?\d+(?:\.\d+)?)", re.IGNORECASE)
_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
        ast.USub: operator.neg, ast.UAdd: operator.pos}


def calculate(expression: str) -> float:
    """Evaluate + - * / and parentheses; text after '=' is ignored (the model likes 'a * b = guess')."""
    expression = expression.split("=")[0].replace("x", "*").replace("×", "*").strip()

    def walk(node: ast.AST) -> float:
        if isinstance(node, ast.Expression):
            return walk(node.body)
        if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)):
            return node.value
        if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
            return _OPS[type(node.op)](walk(node.left), walk(node.right))
        if isinstance(node, ast.UnaryOp) and type(node.op) in _OPS:
            return _OPS[type(node.op)](walk(node.operand))
        raise ValueError(f"unsupported expression {expression!r}")

    return walk(ast.parse(expression, mode="eval"))


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else f"{value:.4g}"


def run(task: dict, ctx) -> float:
    """Solve one problem through the gateway; return 1.0 for the right final answer, else 0.0."""
    client = ctx.openai_client()
    max_turns = int(ctx.resources.get("max_turns", 3))
    example = EXAMPLE if ctx.resources.get("worked_example", True) else []
    messages = [{"role": "system", "content": ctx.prompt("system", default=SYSTEM)}, *example,
                {"role": "user", "content": task["question"]}]
    answer = None
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
                    result = _number(calculate(call.group(1)))
            except (ValueError, SyntaxError, ZeroDivisionError, TypeError):
                result = "error"
            messages.append({"role": "user", "content": f"RESULT: {result}"})
    return 1.0 if answer is not None and abs(answer - task["answer"]) < 1e-6 else 0.0
