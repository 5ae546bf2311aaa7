"""Rule-based prompt edits for the calc example: a scripted critic for `arclight optimize-prompt`.

Each rule recognises one way a failed trajectory broke the calculator protocol and names the
instruction that prevents it. The critic counts, over the failures it is shown, how many each
rule explains, and proposes one edit per rule (most failures first) whose instruction the prompt
does not hold yet: the prompt plus that instruction. So the search still gets a real, trace-driven
gradient where the 135M model cannot write a useful critique (see RESULTS.md).

    prompt_optimization:
      critic: {kind: scripted, function: prompt_rules:critic}
"""

from __future__ import annotations

import re
from typing import Any, Callable

CALC = re.compile(r"CALC:\s*([^\n]+)", re.IGNORECASE)
ANSWER = re.compile(r"ANSWER:\s*(-?\d+(?:\.\d+)?)", re.IGNORECASE)
RESULT = re.compile(r"RESULT:\s*(\S+)", re.IGNORECASE)


def _turns(failure: dict[str, Any]) -> list[dict[str, str]]:
    """The conversation after the task's question: the model's replies and the calculator's results."""
    messages = [m for m in failure["messages"] if isinstance(m, dict)]
    question = failure["task"].get("question")
    start = max((i for i, m in enumerate(messages) if m.get("role") == "user" and m.get("content") == question), default=-1)
    turns = [{"role": str(m.get("role")), "content": str(m.get("content") or "")} for m in messages[start + 1:]]
    if failure.get("response") is not None:
        turns.append({"role": "assistant", "content": failure["response"]})
    return turns


def _replies(failure: dict[str, Any]) -> list[str]:
    return [t["content"] for t in _turns(failure) if t["role"] == "assistant"]


def _results(failure: dict[str, Any]) -> list[str]:
    return [m.group(1) for t in _turns(failure) if t["role"] == "user" for m in [RESULT.search(t["content"])] if m]


def no_protocol(f: dict[str, Any]) -> bool:
    """The first reply has neither a CALC line nor an ANSWER line: the model talked instead."""
    replies = _replies(f)
    return bool(replies) and not CALC.search(replies[0]) and not ANSWER.search(replies[0])


def guessed(f: dict[str, Any]) -> bool:
    """The model answered at once, without computing, and was wrong."""
    replies = _replies(f)
    return bool(replies) and bool(ANSWER.search(replies[0])) and not CALC.search(replies[0])


def bad_expression(f: dict[str, Any]) -> bool:
    """The calculator could not read the expression (words, units or '=' in it)."""
    return "error" in _results(f)


def no_answer_after_result(f: dict[str, Any]) -> bool:
    """A result came back but the model never wrote an ANSWER line."""
    return bool(_results(f)) and not any(ANSWER.search(r) for r in _replies(f))


def ignored_result(f: dict[str, Any]) -> bool:
    """The model answered with a number other than the calculator's last result."""
    results, replies = _results(f), _replies(f)
    answers = [m.group(1) for r in replies for m in [ANSWER.search(r)] if m]
    return bool(results) and bool(answers) and results[-1] != "error" and _num(answers[-1]) != _num(results[-1])


def wrong_expression(f: dict[str, Any]) -> bool:
    """The model computed and answered with the result, but the expression did not solve the problem."""
    results, replies = _results(f), _replies(f)
    answers = [m.group(1) for r in replies for m in [ANSWER.search(r)] if m]
    return bool(results) and bool(answers) and _num(answers[-1]) == _num(results[-1]) and f.get("reward", 0) == 0


def _num(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None


RULES: list[tuple[str, Callable[[dict[str, Any]], bool], str]] = [
    ("it wrote prose instead of a CALC line", no_protocol,
     "Your first reply must be exactly one line: 'CALC: <expression>'."),
    ("it answered without computing", guessed,
     "Never guess: always compute with a CALC line before you answer."),
    ("the calculator could not read the expression", bad_expression,
     "Write the expression with numbers and + - * / ( ) only: no words, units or '='."),
    ("it did not answer after the result", no_answer_after_result,
     "When you get 'RESULT: <value>', reply with exactly 'ANSWER: <value>'."),
    ("its answer was not the calculator's result", ignored_result,
     "Your ANSWER must be the number from the last RESULT."),
    ("the expression did not solve the problem", wrong_expression,
     "Use every number in the problem once; mind 'each', 'more', 'fewer' and 'shared equally', and use parentheses."),
]


def critic(prompt: str, failures: list[dict[str, Any]], n: int) -> list[tuple[str, str]]:
    """Propose up to ``n`` edits: for the rules that explain the most failures, the prompt plus their instruction."""
    counts = []
    for why, matches, instruction in RULES:
        if instruction in prompt:
            continue
        hits = sum(1 for f in failures if matches(f))
        if hits:
            counts.append((hits, why, instruction))
    counts.sort(key=lambda c: -c[0])
    return [(f"{hits} of {len(failures)} failures: {why}. Add: {instruction}", f"{prompt.rstrip()} {instruction}")
            for hits, why, instruction in counts[:n]]
