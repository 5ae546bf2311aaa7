"""pipeline.advantage = turn (sql/credit.sql step_reward, sql/advantages.sql): a call's advantage is its rollout's
outcome advantage plus a weighted turn term, its step reward normalised against the calls of its group at the same
turn index; tool spans' own rewards (arclight.tool.reward) reach the call that caused them (sql/rewards.sql)."""

from __future__ import annotations

import contextlib
import math

import pytest

from lightning_core import analyst
from lightning_core.pipeline.traces import rollout_traces
from lightning_core.pipeline.triplets import materialize_triplets
from lightning_core.store.outputs import load_triplets
from tests.conftest import make_config
from tests.spans_factory import Rollout, rows, shared_stages, write

EPS = 1e-4


def _rollout(rollout_id: str, task_id: str, tools: list[dict | None], outcome: float) -> Rollout:
    """One rollout of agent solver: a call per entry of ``tools``, each followed by the tool span it describes
    (None: the call used no tool), then the outcome reward."""
    r = Rollout(rollout_id, task_id=task_id)
    a = r.agent("solver", 0, 100, parent=r.span("rollout", 0, 100))
    for i, tool in enumerate(tools):
        r.call(10 * i + 1, 10 * i + 5, parent=a, prompt=(i + 1,))
        if tool is not None:
            r.tool("search", 10 * i + 6, 10 * i + 8, parent=a, **tool)
    r.reward(outcome, 90, parent=a)
    return r


def _hand_made_group() -> list[Rollout]:
    """Task t: 3 rollouts of 3, 2 and 3 calls; task t2: 2 rollouts of one call with equal outcomes."""
    return [
        _rollout("A", "t", [{"reward": 1.0}, {"reward": 1.0}, None], outcome=1.0),
        _rollout("B", "t", [{"reward": 1.0}, {"reward": -0.5}], outcome=0.0),
        _rollout("C", "t", [{"failed": True}, {"reward": 1.0}, None], outcome=1.0),
        _rollout("D", "t2", [{"reward": 1.0}], outcome=1.0),
        _rollout("E", "t2", [{"reward": 0.0}], outcome=1.0),
    ]


def _triplets(tmp_path, *overrides: str):
    cfg = make_config(tmp_path, "pipeline.tool_failure_penalty=0.5", *overrides)
    write(cfg.lake.path, _hand_made_group())
    report = materialize_triplets(cfg, run_id="r1", epoch=0)
    found = load_triplets(cfg, run_id="r1", epoch=0, policy="default").to_pylist()
    return cfg, report, {(t["rollout_id"], t["turn_index"]): t for t in found}


# Task t, by hand (reward_policy final, tool_failure_penalty 0.5, normalize_advantage_std true):
#   R: A = 1.0, B = 0.0, C = 1.0 - 0.5 (its failed tool call) = 0.5; mean 0.5, sample std
#      sqrt((0.25 + 0.25 + 0) / 2) = 0.5  ->  A_rollout: A +0.5/0.5001, B -0.5/0.5001, C 0
#   s (tool rewards and penalties; the outcome is not in s under final; a call with no tool outcome has s = 0):
#      turn 0: A 1, B 1, C -0.5 -> mean 0.5, std sqrt((0.25 + 0.25 + 1) / 2) = sqrt(0.75)
#              A_turn: A, B +0.5/(sqrt(0.75) + 1e-4), C -1/(sqrt(0.75) + 1e-4)
#      turn 1: A 1, B -0.5, C 1 -> the same numbers, B the low one
#      turn 2: A 0, C 0 -> all equal: A_turn 0 (B has no turn 2)
# Task t2: R 1.0 and 1.0 -> A_rollout 0; turn 0: s = 1 and 0 -> mean 0.5, std sqrt(0.5): A_turn +-0.5/(sqrt(0.5) + 1e-4)
HIGH, LOW = 0.5 / (math.sqrt(0.75) + EPS), -1.0 / (math.sqrt(0.75) + EPS)
A_ROLLOUT = {"A": 0.5 / (0.5 + EPS), "B": -0.5 / (0.5 + EPS), "C": 0.0, "D": 0.0, "E": 0.0}
A_TURN = {("A", 0): HIGH, ("A", 1): HIGH, ("A", 2): 0.0, ("B", 0): HIGH, ("B", 1): LOW,
          ("C", 0): LOW, ("C", 1): HIGH, ("C", 2): 0.0,
          ("D", 0): 0.5 / (math.sqrt(0.5) + EPS), ("E", 0): -0.5 / (math.sqrt(0.5) + EPS)}


def test_turn_advantage_adds_the_weighted_step_reward_normalised_over_the_groups_calls_of_the_same_turn(tmp_path):
    cfg, report, t = _triplets(tmp_path, "pipeline.advantage=turn", "pipeline.turn_advantage_weight=0.5")
    assert sorted(t) == sorted(A_TURN)
    for (rollout, turn), triplet in t.items():
        assert triplet["rollout_advantage"] == pytest.approx(A_ROLLOUT[rollout]), (rollout, turn)
        assert triplet["turn_advantage"] == pytest.approx(A_TURN[rollout, turn]), (rollout, turn)
        assert triplet["advantage"] == pytest.approx(A_ROLLOUT[rollout] + 0.5 * A_TURN[rollout, turn]), (rollout, turn)
    # e.g. B's second call, the re-retrieval: -0.9998 + 0.5 * -1.1546 = -1.5771; A's answer: 0.9998 + 0 = 0.9998
    assert t["B", 1]["advantage"] == pytest.approx(-1.5771, abs=1e-4) and t["A", 2]["advantage"] == pytest.approx(0.9998)
    # the tool rewards are step signals only: the call's reward and the rollout's return are the outcome's, as before
    assert [t["C", i]["reward"] for i in range(3)] == [0.5, 1.0, 1.0] and t["A", 0]["rollout_return"] == 1.0
    # t2's outcomes are equal but its step rewards differ: it trains, and no row says zero_advantage_group
    assert report.policies[0].zero_advantage_groups == [] and report.policies[0].informative_groups == ["t", "t2"]
    assert not any("zero_advantage_group" in x["flags"] for x in t.values())
    # the triplets view that `arclight query` reads shows both terms
    with contextlib.closing(analyst.connect(cfg)) as con:
        shown = con.sql("SELECT rollout_advantage, turn_advantage FROM triplets WHERE rollout_id = 'B' AND turn_index = 1"
                        ).fetchall()
    assert shown == [(pytest.approx(A_ROLLOUT["B"]), pytest.approx(LOW))]
    # and each LLM span of the rollout's MLflow trace carries them (lightning_core.pipeline.traces, what epoch/traces.py
    # publishes)
    b = next(r for r in rollout_traces(cfg, run_id="r1", epoch=0) if r.rollout_id == "B")
    on_spans = [(s.attributes["arclight.rollout_advantage"], s.attributes["arclight.turn_advantage"],
                 s.attributes["arclight.advantage"]) for s in b.spans if s.kind == "LLM"]
    assert on_spans == [(t["B", i]["rollout_advantage"], t["B", i]["turn_advantage"], t["B", i]["advantage"]) for i in (0, 1)]


def test_rollout_advantage_is_unchanged_by_tool_rewards_and_is_every_calls_advantage(tmp_path):
    _, report, t = _triplets(tmp_path)  # pipeline.advantage defaults to rollout
    for (rollout, turn), triplet in t.items():
        assert triplet["advantage"] == triplet["rollout_advantage"] == pytest.approx(A_ROLLOUT[rollout]), (rollout, turn)
        assert triplet["turn_advantage"] is None
    assert report.policies[0].zero_advantage_groups == ["t2"] and report.policies[0].informative_groups == ["t"]
    assert all(("zero_advantage_group" in x["flags"]) == (rollout == "D" or rollout == "E") for (rollout, _), x in t.items())


def test_a_tool_spans_reward_is_charged_to_the_call_that_caused_it(tmp_path):
    cfg = make_config(tmp_path, "pipeline.tool_failure_penalty=0.5")
    r = Rollout("ro1", task_id="t")
    a = r.agent("solver", 0, 100, parent=r.span("rollout", 0, 100))
    first = r.call(1, 5, parent=a)
    r.tool("search", 6, 8, parent=a, reward=1.0)
    r.tool("search", 9, 9, parent=a, reward=-0.5)  # a second tool call of the same call
    second = r.call(10, 15, parent=a)
    r.tool("search", 16, 18, parent=a, failed=True, reward=0.25)  # failed and rewarded: one of each row
    r.tool("search", 19, 19, parent=a)  # no reward attribute: no row
    write(cfg.lake.path, [r])
    con = shared_stages(cfg)
    try:
        charged = rows(con, "SELECT r.kind, r.value, c.span_id FROM rewards r JOIN calls c ON c.call_key = r.caused_by_call "
                            "ORDER BY r.start_ns, r.kind")
    finally:
        con.close()
    assert charged == [{"kind": "tool_reward", "value": 1.0, "span_id": first},
                       {"kind": "tool_reward", "value": -0.5, "span_id": first},
                       {"kind": "tool_failure", "value": -0.5, "span_id": second},
                       {"kind": "tool_reward", "value": 0.25, "span_id": second}]


def test_under_a_per_call_reward_policy_a_call_that_no_step_signal_reaches_sits_out_of_its_turns_comparison(tmp_path):
    # latest_unrewarded_call: each reward goes to the latest call before it, so every second call has no reward
    # (flag no_reward); its step reward is unknown, not 0: NULL, turn_advantage 0, and the others compare alone
    cfg = make_config(tmp_path, "pipeline.reward_policy=latest_unrewarded_call", "pipeline.advantage=turn")
    made = []
    for rollout_id, first, tool in (("A", 1.0, 1.0), ("B", 0.0, None), ("C", 0.5, -0.5)):
        r = Rollout(rollout_id, task_id="t")
        a = r.agent("solver", 0, 100, parent=r.span("rollout", 0, 100))
        r.call(1, 5, parent=a)
        r.reward(first, 7, parent=a)
        r.call(10, 15, parent=a)
        if tool is not None:
            r.tool("search", 16, 17, parent=a, reward=tool)
        made.append(r)
    write(cfg.lake.path, made)
    materialize_triplets(cfg, run_id="r1", epoch=0)
    t = {(x["rollout_id"], x["turn_index"]): x for x in load_triplets(cfg, run_id="r1", epoch=0, policy="default").to_pylist()}
    # turn 0: s = the matched rewards 1, 0, 0.5 -> mean 0.5, std 0.5: +-0.5/0.5001 and 0
    assert [t[r, 0]["turn_advantage"] for r in "ABC"] == pytest.approx([0.5 / 0.5001, -0.5 / 0.5001, 0.0])
    # turn 1: s = the tool rewards 1 (A) and -0.5 (C), B none -> mean 0.25, std 1.5/sqrt(2)
    assert "no_reward" in t["B", 1]["flags"] and t["B", 1]["turn_advantage"] == 0.0
    assert [t[r, 1]["turn_advantage"] for r in "AC"] == pytest.approx([x / (1.5 / math.sqrt(2) + EPS) for x in (0.75, -0.75)])
