"""The calc agent as a plain LangGraph graph: a ``solver`` node (ChatOpenAI) and a ``calculator`` node.

Nothing here knows about Arclight. The model client is LangChain's ``ChatOpenAI``, which reads
``OPENAI_BASE_URL`` and ``OPENAI_API_KEY`` from the environment like any deployment would; point
them at Arclight's gateway and the graph's calls are served (and recorded) there. The protocol,
the worked example and the calculator are the calc example's (``examples/calc/calc_agent.py``):
the solver writes ``CALC: <expression>``, the calculator node answers ``RESULT: <value>``, and the
solver finishes with ``ANSWER: <number>``.

    PYTHONPATH=examples/calc python examples/langgraph_calc/calc_graph.py "Ava has 3 boxes with 4 apples each. How many apples are there?"
"""

from __future__ import annotations

import operator
import sys
from typing import Annotated, TypedDict

from calc_agent import ANSWER, CALC, EXAMPLE, SYSTEM, _number, calculate  # the calc example's protocol and tool
from langchain_core.messages import AIMessage, AnyMessage, HumanMessage, convert_to_messages
from langchain_openai import ChatOpenAI
from langgraph.graph import END, START, StateGraph


class CalcState(TypedDict):
    messages: Annotated[list[AnyMessage], operator.add]
    turns: int
    answer: float | None


def build_graph(llm: ChatOpenAI, *, max_turns: int = 3):
    """Return the compiled graph: solver -> (calculator -> solver)* -> end."""

    def solver(state: CalcState) -> dict:
        reply = llm.invoke(state["messages"])
        found = ANSWER.search(reply.content or "")
        return {"messages": [AIMessage(reply.content or "")], "turns": state["turns"] + 1,
                "answer": float(found.group(1)) if found else None}

    def calculator(state: CalcState) -> dict:
        expression = CALC.search(state["messages"][-1].content).group(1)
        try:
            result = _number(calculate(expression))
        except (ValueError, SyntaxError, ZeroDivisionError, TypeError):
            result = "error"
        return {"messages": [HumanMessage(f"RESULT: {result}")]}

    def route(state: CalcState) -> str:
        wants_tool = CALC.search(state["messages"][-1].content or "")
        return "calculator" if state["answer"] is None and wants_tool and state["turns"] < max_turns else END

    graph = StateGraph(CalcState)
    graph.add_node("solver", solver)
    graph.add_node("calculator", calculator)
    graph.add_edge(START, "solver")
    graph.add_conditional_edges("solver", route, ["calculator", END])
    graph.add_edge("calculator", "solver")
    return graph.compile()


def solve(question: str, *, model: str = "gpt-4o-mini", temperature: float = 1.0, max_tokens: int = 40,
          max_turns: int = 3) -> float | None:
    """Answer one word problem; return the number after ``ANSWER:``, or None."""
    llm = ChatOpenAI(model=model, temperature=temperature, max_tokens=max_tokens, max_retries=1)
    messages = convert_to_messages([{"role": "system", "content": SYSTEM}, *EXAMPLE, {"role": "user", "content": question}])
    state = build_graph(llm, max_turns=max_turns).invoke({"messages": messages, "turns": 0, "answer": None})
    return state["answer"]


if __name__ == "__main__":
    print(solve(" ".join(sys.argv[1:])))
