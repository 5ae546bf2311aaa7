"""Stage 4 (agent selection in sql/credit.sql), the CLI, production traces and the analyst views."""

from __future__ import annotations

import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from lightning_core.store.catalog import Catalog
from lightning_core.cli.main import app
from lightning_core.pipeline.steps import PipelineError
from lightning_core.pipeline.triplets import materialize_triplets
from lightning_core.store.outputs import load_triplets
from tests.conftest import make_config
from tests.spans_factory import Rollout, write

AGENTS = ("planner", "executor", "critic", "worker-1", "worker-2")


def _team(rollout_id: str = "ro1") -> Rollout:
    r = Rollout(rollout_id, task_id="t1")
    root = r.span("rollout", 0, 1000)
    for i, name in enumerate(AGENTS):
        a = r.agent(name, i * 100, i * 100 + 90, parent=root)
        r.call(i * 100 + 1, i * 100 + 10, parent=a, prompt=(i,))
    r.reward(1.0, 995, parent=root)
    return r


@pytest.mark.parametrize("pattern, agents", [
    (None, list(AGENTS)),
    ("planner|executor", ["planner", "executor"]),
    ("worker-.*", ["worker-1", "worker-2"]),
    ("^work", ["worker-1", "worker-2"]),
    ("nobody-matches-this", []),
])
def test_agent_match_selects_calls_by_owning_agent_with_search_semantics(tmp_path, pattern, agents):
    cfg = make_config(tmp_path)
    write(cfg.lake.path, [_team()])
    report = materialize_triplets(cfg, run_id="r1", epoch=0, agent_match=pattern)
    table = load_triplets(cfg, run_id="r1", epoch=0, policy="default")
    assert table["agent_name"].to_pylist() == agents
    assert table["turn_index"].to_pylist() == list(range(len(agents)))
    assert report.policies[0].triplets == len(agents) and report.llm_calls == 5


@pytest.mark.parametrize("pattern, says", [("(planner", "missing )"), ("(?<=x)planner", "RE2")])
def test_invalid_agent_match_fails_before_any_work_showing_pattern_and_error(tmp_path, pattern, says):
    cfg = make_config(tmp_path, f"policies=[{{name: default, agent_match: '{pattern}'}}]")
    write(cfg.lake.path, [_team()])
    with pytest.raises(PipelineError) as err:
        materialize_triplets(cfg, run_id="r1", epoch=0)
    assert repr(pattern) in str(err.value) and says in str(err.value)
    assert not (cfg.lake.path / "triplets").exists() and not (cfg.lake.path / "llm_calls").exists()


def test_rewards_of_an_unselected_critic_still_count(tmp_path):
    cfg = make_config(tmp_path, "policies=[{name: actor, agent_match: planner}, {name: critic, agent_match: critic}]")
    r = Rollout("ro1", task_id="t")
    root = r.span("rollout", 0, 100)
    r.call(1, 5, parent=r.agent("planner", 0, 10, parent=root))
    critic = r.agent("critic", 20, 40, parent=root)
    r.call(21, 25, parent=critic)
    r.reward(0.5, 30, parent=critic)
    write(cfg.lake.path, [r])
    report = materialize_triplets(cfg, run_id="r1", epoch=0)
    assert [p.triplets for p in report.policies] == [1, 1]
    actor = load_triplets(cfg, run_id="r1", epoch=0, policy="actor").to_pylist()
    assert actor[0]["agent_name"] == "planner" and actor[0]["reward"] == 0.5 and actor[0]["policy"] == "actor"


def test_per_agent_report_counts_each_rollout_once_per_agent_and_names_frozen_agents(tmp_path):
    from lightning_core.epoch import bookkeeping as ep

    cfg = make_config(tmp_path, "policies=[{name: sql, agent_match: 'writer|rewriter'}]", "trainer.success_reward=1.0")
    rollouts = []
    for i, reward in enumerate((1.0, 0.0, 0.25)):
        r = Rollout(f"ro{i}", task_id="t")
        root = r.span("rollout", 0, 1000)
        writer = r.agent("writer", 0, 100, parent=root)
        r.call(1, 10, parent=writer)
        r.call(11, 20, parent=writer)  # two calls: the rollout still counts once for the writer
        r.call(31, 40, parent=r.agent("checker", 30, 50, parent=root))
        if i != 0:  # the rewriter runs only when the checker objected
            r.call(61, 70, parent=r.agent("rewriter", 60, 80, parent=root))
        r.reward(reward, 995, parent=root)
        rollouts.append(r)
    write(cfg.lake.path, rollouts)
    report = materialize_triplets(cfg, run_id="r1", epoch=0)
    got = {a.agent_name: (a.policy, a.calls, a.rollouts, a.triplets, round(a.reward_mean, 4), round(a.success_rate, 4))
           for a in report.agent_epochs}
    assert got == {
        "writer": ("sql", 6, 3, 6, round(1.25 / 3, 4), round(1 / 3, 4)),
        "checker": (None, 3, 3, 0, round(1.25 / 3, 4), round(1 / 3, 4)),  # frozen: its calls are no triplets
        "rewriter": ("sql", 2, 2, 2, 0.125, 0.0),
    }
    catalog = Catalog.from_config(cfg)
    catalog.ensure()
    ep.record_agent_epochs(catalog, run_id="r1", epoch=0, rows=report.agent_epochs)
    ep.record_agent_epochs(catalog, run_id="r1", epoch=0, rows=report.agent_epochs)  # a re-run replaces, never adds
    stored = ep.agent_epochs(catalog, run_id="r1")
    assert [(r["agent_name"], r["policy"], r["triplets"]) for r in stored] == [
        ("checker", None, 0), ("rewriter", "sql", 2), ("writer", "sql", 6)]


def test_cli_triplets_on_production_spans_fills_the_views(tmp_path):
    cfg = make_config(tmp_path)
    prod = Rollout(None)  # production: no run, no rollout id; grouped by trace
    a = prod.agent("planner", 0, 50)
    prod.call(1, 5, parent=a, prompt=(5, 6))
    prod.reward(1.0, 10, parent=a)
    write(cfg.lake.path, [prod], run_id=None)
    out = tmp_path / "out.parquet"
    result = CliRunner().invoke(app, ["triplets", "--lake", str(cfg.lake.path), "--agent-match", "plan", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "production spans: 3 spans" in result.output and "1 triplets" in result.output
    assert pq.read_table(out)["prompt_token_ids"].to_pylist() == [[5, 6]]
    with Catalog(cfg.lake.path).read() as con:
        assert con.execute("SELECT run_id, agent_name, reward FROM triplets").fetchall() == [(None, "planner", 1.0)]
        assert con.execute("SELECT agent_name, calls FROM agents").fetchall() == [("planner", 1)]
        assert con.execute("SELECT calls, reward, flags FROM rollout_summary").fetchall() == [(1, 1.0, [])]
        assert con.execute("SELECT kind, value FROM rewards").fetchall() == [("reward", 1.0)]
        assert con.execute("SELECT count(*) FROM llm_calls").fetchall() == [(1,)]


def test_cli_triplets_rejects_a_bad_pattern_with_exit_2(tmp_path):
    result = CliRunner().invoke(app, ["triplets", "--lake", str(tmp_path / "lake"), "--run", "r1", "--agent-match", "a("])
    assert result.exit_code == 2 and "'a('" in result.output
