"""docs/span-conventions.md is the contract: every attribute key the SQL reads is on it (and in
lightning_core/semconv.py), and every example on it reads as it says when sent over OTLP."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from lightning_core import semconv
from lightning_core.config import load_config
from lightning_core.pipeline.triplets import materialize_triplets
from lightning_core.pipeline.steps import sql_files
from lightning_core.store.outputs import VIEWS_SQL, load_triplets
from tests.conftest import make_config
from tests.otlp_trees import Tree
from tests.spans_factory import rows, shared_stages

DOC = Path(__file__).resolve().parents[1] / "docs" / "span-conventions.md"
EXAMPLE = re.compile(r"```(json|yaml) example\n(.*?)```", re.S)
SQL_KEY = re.compile(r"'\$\.\"([A-Za-z_][^\"']*)\"")
GATEWAY = {"arclight.span.kind": "llm", "gen_ai.operation.name": "chat", "arclight.llm.prompt_token_ids": [7, 8],
           "arclight.llm.response_token_ids": [9], "arclight.llm.response_logprobs": [-0.5]}


def examples(language: str) -> list[str]:
    """The example blocks of the page in ``language``."""
    return [body for lang, body in EXAMPLE.findall(DOC.read_text()) if lang == language]


def test_every_attribute_key_the_sql_reads_is_declared_once_and_documented():
    read = {key for path in [*sql_files(), VIEWS_SQL] for key in SQL_KEY.findall(path.read_text())}
    values = {v for k, v in vars(semconv).items() if isinstance(v, str) and k.isupper()}
    prefixes = {v for k, v in vars(semconv).items() if isinstance(v, str) and k.endswith("_PREFIX")}
    assert len(read) > 40
    assert sorted(k for k in read if k not in values and not any(k.startswith(p) for p in prefixes)) == []
    page = DOC.read_text()
    assert sorted(k for k in read if not re.search(f"`{re.escape(k)}[` ]", page)) == []


def test_the_page_has_examples_for_each_kind_of_convention():
    kinds = [next(iter(json.loads(body)["reads_as"])) for body in examples("json")]
    assert {"call", "reward", "agent", "judge_scope"} <= set(kinds) and len(kinds) >= 9
    assert "## Coming from Agent Lightning" in DOC.read_text()


@pytest.mark.parametrize("body", examples("json"), ids=lambda b: json.loads(b)["span"]["name"])
def test_each_span_example_reads_as_the_page_says(tmp_path, body):
    example = json.loads(body)
    span, reads = example["span"], example["reads_as"]
    cfg = make_config(tmp_path)
    tree = Tree({"arclight.run_id": "r1", "arclight.rollout_id": "ro1", "arclight.task_id": "t"})
    root = tree.span("rollout", 0, 1000)
    solver = tree.span("agent solver", 0, 900, parent=root, attrs={"arclight.span.kind": "agent", "agent.name": "solver"})
    kind, expected = next(iter(reads.items()))
    if kind == "call":
        tree.span(span["name"], 10, 20, parent=solver, attrs=span["attributes"])
    elif kind == "reward":
        tree.span("chat tiny", 10, 20, parent=solver, attrs=GATEWAY)
        tree.span(span["name"], 30, 31, parent=solver, attrs=span["attributes"])
    elif kind == "agent":
        agent = tree.span(span["name"], 100, 200, parent=root, attrs=span["attributes"])
        tree.span("chat tiny", 110, 120, parent=agent, attrs=GATEWAY)
    else:
        scope = tree.span(span["name"], 100, 200, parent=solver, attrs=span["attributes"])
        tree.span("chat tiny", 110, 120, parent=scope, attrs=GATEWAY)
    tree.write(cfg.lake.path)
    con = shared_stages(cfg)
    calls = rows(con, "SELECT * FROM llm_calls ORDER BY start_ns")
    rewards = rows(con, "SELECT value FROM rewards WHERE kind = 'reward'")
    if kind == "call":
        [call] = calls
        call["prompt_messages"] = json.loads(call["prompt_messages"])
        assert {k: call[k] for k in expected} == expected and call["agent_name"] == "solver" and call["flags"] == []
    elif kind == "reward":
        assert rewards == [{"value": expected}]
        materialize_triplets(cfg, run_id="r1", epoch=0)
        assert load_triplets(cfg, run_id="r1", epoch=0, policy="default")["reward"].to_pylist() == [expected]
    elif kind == "agent":
        assert [c["agent_name"] for c in calls] == [expected]
    else:
        assert [(c["in_reward"], c["flags"]) for c in calls] == [(True, ["judge"])] and rewards == []


@pytest.mark.parametrize("body", examples("yaml"))
def test_each_config_example_loads(tmp_path, body):
    path = tmp_path / "arclight.yaml"
    path.write_text(body)
    config = load_config(path)
    assert config.pipeline.reward_policy == "latest_unrewarded_call" and config.pipeline.repair
    assert config.pipeline.llm_call_match == r"openai\.chat\.completion"
