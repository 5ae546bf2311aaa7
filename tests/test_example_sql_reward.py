"""The sql example's pieces that decide its reward: query extraction, read-only execution, execution match."""

from __future__ import annotations

import json
import sqlite3
import sys

import pytest

from tests.conftest import REPO

sys.path.insert(0, str(REPO / "examples" / "sql"))
import make_dataset  # noqa: E402
import sql_agent  # noqa: E402


@pytest.fixture(scope="module")
def db(tmp_path_factory):
    return make_dataset.ensure_database(tmp_path_factory.mktemp("sql") / "company.sqlite")


def test_extract_sql_takes_the_first_select_from_fences_and_chatter():
    assert sql_agent.extract_sql("Sure:\n```sql\nSELECT  name\nFROM employees;\n```\nDone.") == "SELECT name FROM employees"
    assert sql_agent.extract_sql("select count(*) from employees") == "select count(*) from employees"
    assert sql_agent.extract_sql("I cannot answer that.") is None


def test_execution_match_ignores_row_order_and_float_noise_but_not_multiplicity():
    assert sql_agent.same_result([(2,), (1,)], [(1,), (2,)])
    assert sql_agent.same_result([(0.1 + 0.2,)], [(0.3,)])
    assert not sql_agent.same_result([(1,), (1,)], [(1,)])
    assert not sql_agent.same_result([("Boston",)], [("Austin",)])


def test_every_gold_query_runs_and_returns_rows(db):
    for split in ("train", "test"):
        for line in (REPO / "examples" / "sql" / f"{split}.jsonl").read_text().splitlines():
            task = json.loads(line)
            assert sql_agent.execute(db, task["gold_sql"]) not in ([], [(None,)], [(0,)]), task["id"]


def test_execution_is_read_only_and_stops_runaway_queries(db):
    with pytest.raises(sqlite3.OperationalError, match="readonly"):
        sql_agent.execute(db, "DELETE FROM employees")
    runaway = "SELECT count(*) FROM employees a, employees b, employees c, employees d, employees e"
    with pytest.raises(sqlite3.OperationalError, match="interrupted"):
        sql_agent.execute(db, runaway, timeout_s=0.2)
    assert sql_agent.execute(db, "SELECT COUNT(*) FROM employees") == [(make_dataset.EMPLOYEES,)]


def test_splits_are_disjoint_and_cover_every_template():
    rows = {s: [json.loads(x) for x in (REPO / "examples" / "sql" / f"{s}.jsonl").read_text().splitlines()]
            for s in ("train", "test")}
    assert not {r["question"] for r in rows["train"]} & {r["question"] for r in rows["test"]}
    assert {r["template"] for r in rows["test"]} == {r["template"] for r in rows["train"]} == set(range(len(make_dataset.templates(["x"]))))


def test_the_held_out_split_is_balanced_across_templates():
    """No template may dominate the held-out score (the base model copies the worked examples' shape)."""
    import collections

    test = [json.loads(x) for x in (REPO / "examples" / "sql" / "test.jsonl").read_text().splitlines()]
    per_template = collections.Counter(r["template"] for r in test)
    assert max(per_template.values()) <= 8 and len(test) >= 80
