"""The calc example's protocol and calculator, with no Arclight import (the AutoGen and LangGraph agents,
which may run in their own environments, share it).

The model writes ``CALC: <expression>``; the calculator answers ``RESULT: <value>``; the model
finishes with ``ANSWER: <number>``. A 135M model follows this protocol when it sees one worked
example as real chat turns (``EXAMPLE``).
"""

from __future__ import annotations

import ast
import operator
import re

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
