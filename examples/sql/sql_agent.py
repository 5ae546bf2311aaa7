"""The sql example: three agents answer a question about a SQLite database in one rollout.

- ``writer`` drafts a SQL query from the question and the schema;
- ``checker`` executes the draft against the database (a ``execute_sql`` tool span) and asks the
  model to critique it, showing the execution result or error; it answers ``OK`` or a critique;
- ``rewriter`` fixes the query given the result and the critique. With ``rewrite: on_critique``
  (default) it is skipped when the query ran and the checker said ``OK``; ``rewrite: always``
  always runs it.

The final query (the rewriter's when it wrote one, else the writer's) is executed; the reward is
1 when its result set equals the gold query's (execution match: rows compared as a multiset,
numbers rounded), else 0. ``similarity_weight`` (default 0) adds that weight times the string
similarity of the final query (or, with none, the last reply) and the gold query to wrong
answers: a dense signal for models that rarely get an answer right.

Models: the writer and the rewriter call ``resources.writer_model`` / ``resources.rewriter_model``
(default ``ctx.model``, the first policy); the checker calls ``resources.checker_model``, which
the configs set to the base model's served name so the gateway never routes it to a trained
adapter. The agent is plain OpenAI-client code: Arclight only changes its ``base_url``.

Prompts: the writer's and the rewriter's system prompts are the resources ``prompts.writer`` and
``prompts.rewriter`` when the config names them (``config.apo.yaml``, for prompt optimisation), else
``WRITER_SYSTEM`` and ``REWRITER_SYSTEM``. The checker's prompt is fixed, like its model.
"""

from __future__ import annotations

import difflib
import re
import sqlite3
import time
from pathlib import Path

from make_dataset import SCHEMA_HINT, ensure_database

from lightning_core import tracing

WRITER_SYSTEM = f"You write SQLite queries.\n{SCHEMA_HINT}\nAnswer with one SQL query only."
WRITER_EXAMPLE = [
    {"role": "user", "content": "How many employees work in Finance?"},
    {"role": "assistant", "content": "SELECT COUNT(*) FROM employees WHERE department = 'Finance';"},
    {"role": "user", "content": "What is the salary of Omar Hall?"},
    {"role": "assistant", "content": "SELECT salary FROM employees WHERE name = 'Omar Hall';"},
]
CHECKER_SYSTEM = (
    f"You check SQLite queries.\n{SCHEMA_HINT}\n"
    "Given a question, a query and its result, answer OK if the query answers the question. "
    "Otherwise say in one sentence what is wrong."
)
REWRITER_SYSTEM = (
    f"You fix SQLite queries.\n{SCHEMA_HINT}\n"
    "Given a question, a query, its result and a critique, answer with the corrected SQL query only."
)
REWRITER_EXAMPLE = [
    {"role": "user", "content": "Question: What is the average age of employees in Austin?\n"
                                "Query: SELECT AVG(age) FROM employees WHERE department = 'Austin';\n"
                                "Result: 1 rows: None\nCritique: Austin is a city, not a department."},
    {"role": "assistant", "content": "SELECT AVG(age) FROM employees WHERE city = 'Austin';"},
]
SELECT = re.compile(r"(?is)\b(select\b.*?)(;|```|\n\n|$)")
MAX_ROWS = 200


def extract_sql(text: str) -> str | None:
    """Return the first SELECT statement in a model reply (code fences and trailing text removed)."""
    found = SELECT.search(text or "")
    return " ".join(found.group(1).split()) if found else None


def execute(db: Path, query: str | None, *, timeout_s: float = 2.0) -> list[tuple]:
    """Run ``query`` read-only and return its rows (at most MAX_ROWS); raise ``sqlite3.Error`` on failure."""
    if not query:
        raise sqlite3.OperationalError("no SQL query found in the reply")
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    deadline = time.monotonic() + timeout_s
    con.set_progress_handler(lambda: int(time.monotonic() > deadline), 10_000)  # stop runaway joins
    try:
        return con.execute(query).fetchmany(MAX_ROWS)
    finally:
        con.close()


def same_result(rows: list[tuple], gold: list[tuple]) -> bool:
    """Execution match: the same rows as a multiset, numbers rounded to 4 decimals."""
    def norm(row: tuple) -> tuple:
        return tuple(round(v, 4) if isinstance(v, float) else v for v in row)

    return sorted(map(norm, rows), key=repr) == sorted(map(norm, gold), key=repr)


def _show(rows: list[tuple] | None, error: str | None) -> str:
    if error is not None:
        return f"error: {error}"
    shown = ", ".join(str(r if len(r) > 1 else r[0]) for r in rows[:10])
    return f"{len(rows)} rows: {shown}" + (" ..." if len(rows) > 10 else "")


def _ask(client, *, model: str, messages: list[dict], max_tokens: int, temperature: float) -> str:
    reply = client.chat.completions.create(model=model, messages=messages, temperature=temperature, max_tokens=max_tokens)
    return reply.choices[0].message.content or ""


def run(task: dict, ctx) -> float:
    """Write, check and (maybe) rewrite a query for ``task['question']``; return the execution-match reward."""
    r = ctx.resources
    db = ensure_database(Path(r["database"]) if r.get("database") else Path(__file__).with_name("company.sqlite"))
    client = ctx.openai_client()
    max_tokens = int(r.get("max_tokens", 60))
    question = task["question"]

    with tracing.agent("writer"):
        draft_text = _ask(client, model=r.get("writer_model", ctx.model), max_tokens=max_tokens,
                          temperature=ctx.temperature,
                          messages=[{"role": "system", "content": ctx.prompt("writer", default=WRITER_SYSTEM)}, *WRITER_EXAMPLE,
                                    {"role": "user", "content": question}])
    draft = extract_sql(draft_text)

    with tracing.agent("checker"):
        rows, error = None, None
        try:
            with tracing.tool("execute_sql", query=draft or ""):
                rows = execute(db, draft)
        except sqlite3.Error as exc:
            error = str(exc)
        result = _show(rows, error)
        critique = _ask(client, model=r.get("checker_model", ctx.model), max_tokens=int(r.get("checker_max_tokens", 40)),
                        temperature=float(r.get("checker_temperature", 0.0)),
                        messages=[{"role": "system", "content": CHECKER_SYSTEM},
                                  {"role": "user", "content": f"Question: {question}\nQuery: {draft}\nResult: {result}"}])
    approved = error is None and critique.strip().upper().startswith("OK")

    final, last_reply = draft, draft_text
    if r.get("rewrite", "on_critique") == "always" or not approved:
        with tracing.agent("rewriter"):
            fixed_text = _ask(client, model=r.get("rewriter_model", ctx.model), max_tokens=max_tokens,
                              temperature=ctx.temperature,
                              messages=[{"role": "system", "content": ctx.prompt("rewriter", default=REWRITER_SYSTEM)},
                                        {"role": "user", "content": f"Question: {question}\nQuery: {draft}\n"
                                                                    f"Result: {result}\nCritique: {critique}"}])
        final, last_reply = extract_sql(fixed_text) or draft, fixed_text

    gold = execute(db, task["gold_sql"])
    try:
        correct = same_result(execute(db, final), gold)
    except sqlite3.Error:
        correct = False
    if correct:
        return 1.0
    weight = float(r.get("similarity_weight", 0.0))
    similarity = difflib.SequenceMatcher(None, (final or last_reply).lower(), task["gold_sql"].lower()).ratio()
    return round(weight * similarity, 4)
