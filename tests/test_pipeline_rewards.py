"""Stages 5-7 (sql/rewards.sql, credit.sql, triplets.sql, advantages.sql): reward policies and GRPO."""

from __future__ import annotations

import pytest

from lightning_core.pipeline.triplets import materialize_triplets
from lightning_core.store import outputs as store
from lightning_core.store.outputs import load_triplets
from tests.conftest import make_config
from tests.spans_factory import Rollout, write


def _two_reward_rollout(rollout_id: str = "ro1", task_id: str = "t1", first: float = 1.0, last: float = 3.0) -> Rollout:
    r = Rollout(rollout_id, task_id=task_id)
    root = r.span("rollout", 0, 200)
    a = r.agent("planner", 0, 50, parent=root)
    r.call(1, 5, parent=a, prompt=(1,))
    r.call(10, 15, parent=a, prompt=(2,))
    r.reward(first, 20, parent=a)
    b = r.agent("executor", 51, 100, parent=root)
    r.call(52, 60, parent=b, prompt=(3,))
    r.reward(last, 70, parent=b)
    return r


def _triplets(cfg, **kw):
    report = materialize_triplets(cfg, run_id="r1", epoch=0, **kw)
    return report, load_triplets(cfg, run_id="r1", epoch=0, policy="default").to_pylist()


@pytest.mark.parametrize("policy, rewards, rollout_return", [
    ("final", [3.0, 3.0, 3.0], 3.0),
    ("first_occurrence", [1.0, 1.0, 3.0], 4.0),
    ("first_sibling", [None, 1.0, 3.0], 4.0),
    ("discounted", [0.75, 1.5, 3.0], 3.0),
])
def test_two_rewards_in_one_rollout_under_each_policy(tmp_path, policy, rewards, rollout_return):
    cfg = make_config(tmp_path, f"pipeline.reward_policy={policy}", "pipeline.gamma=0.5")
    write(cfg.lake.path, [_two_reward_rollout()])
    _, rows = _triplets(cfg)
    assert [r["prompt_token_ids"][0] for r in rows] == [1, 2, 3] and [r["turn_index"] for r in rows] == [0, 1, 2]
    assert [r["reward"] for r in rows] == rewards
    assert {r["rollout_return"] for r in rows} == {rollout_return}
    no_reward = ["no_reward" in r["flags"] for r in rows]
    assert no_reward == ([True, False, False] if policy == "first_sibling" else [False] * 3)


def test_none_valued_reward_is_recorded_as_missing_and_the_call_flagged(tmp_path):
    # fails before: the call's reward was pipeline.missing_reward (-1.0), indistinguishable from a real -1.0
    cfg = make_config(tmp_path, "pipeline.missing_reward=-1.0")
    r = Rollout("ro1", task_id="t")
    a = r.agent("solver", 0, 50, parent=r.span("rollout", 0, 100))
    r.call(1, 5, parent=a)
    r.reward(None, 10, parent=a)
    write(cfg.lake.path, [r])
    report, rows = _triplets(cfg)
    assert report.missing_rewards == 1 and report.rewards == 0
    assert rows[0]["reward"] is None and "no_reward" in rows[0]["flags"]
    assert rows[0]["rollout_return"] == -1.0  # the configured return, used for the advantage only


def test_failed_tool_call_counts_against_the_call_that_caused_it(tmp_path):
    cfg = make_config(tmp_path, "pipeline.tool_failure_penalty=0.25")
    r = Rollout("ro1", task_id="t")
    a = r.agent("solver", 0, 100, parent=r.span("rollout", 0, 100))
    r.call(1, 5, parent=a, prompt=(1,))
    tool = r.tool("calc", 6, 9, parent=a, failed=True)
    r.span("parse", 7, 8, parent=tool, status="ERROR", events=[{"name": "exception", "time_ns": 8000, "attributes": {}}])
    r.call(10, 15, parent=a, prompt=(2,))
    r.tool("calc", 16, 18, parent=a)
    r.reward(1.0, 20, parent=a)
    write(cfg.lake.path, [r])
    report, rows = _triplets(cfg)
    assert report.tool_failures == 1
    assert [r["reward"] for r in rows] == [0.75, 1.0]
    assert "tool_failure" in rows[0]["flags"] and "tool_failure" not in rows[1]["flags"]
    assert {r["rollout_return"] for r in rows} == {0.75}


@pytest.mark.parametrize("normalize, expected", [(True, 0.5 / (0.5 ** 0.5 + 1e-4)), (False, 0.5)])
def test_group_relative_advantage_is_computed_per_rollout_and_broadcast(tmp_path, normalize, expected):
    cfg = make_config(tmp_path, f"pipeline.normalize_advantage_std={str(normalize).lower()}")
    write(cfg.lake.path, [
        _two_reward_rollout("good", "t1", last=1.0), _two_reward_rollout("bad", "t1", last=0.0),
        _two_reward_rollout("same-a", "t2", last=2.0), _two_reward_rollout("same-b", "t2", last=2.0),
    ])
    report, rows = _triplets(cfg)
    adv = {(r["rollout_id"], r["turn_index"]): r["advantage"] for r in rows}
    assert all(adv[("good", i)] == pytest.approx(expected) for i in range(3))
    assert all(adv[("bad", i)] == pytest.approx(-expected) for i in range(3))
    assert {adv[("same-a", i)] for i in range(3)} == {0.0}
    assert report.policies[0].zero_advantage_groups == ["t2"] and report.policies[0].groups == 2
    assert all("zero_advantage_group" in r["flags"] for r in rows if r["group_id"] == "t2")


def test_rerun_replaces_only_its_own_partition(tmp_path):
    cfg = make_config(tmp_path)
    write(cfg.lake.path, [_two_reward_rollout()])
    write(cfg.lake.path, [_two_reward_rollout("other", "t9")], epoch=1)
    materialize_triplets(cfg, run_id="r1", epoch=0)
    materialize_triplets(cfg, run_id="r1", epoch=1)
    cfg2 = make_config(tmp_path, "pipeline.reward_policy=first_sibling")
    materialize_triplets(cfg2, run_id="r1", epoch=0)
    assert [r["reward"] for r in load_triplets(cfg, run_id="r1", epoch=0, policy="default").to_pylist()] == [None, 1.0, 3.0]
    assert load_triplets(cfg, run_id="r1", epoch=1, policy="default").num_rows == 3
    folder = cfg.lake.path / "triplets" / "run_id=r1" / "epoch=0" / "policy=default"
    current = [f for f in store.open_output(cfg.lake.path, "triplets").file_uris() if f.startswith(f"{folder}/")]
    assert len(current) == 1  # the re-run's file; the first run's stays on disk for the retention window
    on_disk = sorted(str(p) for p in folder.glob("part-*.parquet"))
    assert len(on_disk) == 2 and current[0] in on_disk
    removed = store.vacuum(cfg.lake.path, retention_hours=0)["triplets"]
    assert [str(p) for p in folder.glob("part-*.parquet")] == current and len(removed) == 1


def test_arclight_reward_value_alone_marks_a_reward(tmp_path):
    # fails before: without arclight.span.kind = reward the span was no reward; the call trained on 0.0
    cfg = make_config(tmp_path)
    r = Rollout("ro1", task_id="t")
    a = r.agent("solver", 0, 50, parent=r.span("rollout", 0, 100))
    r.call(1, 5, parent=a)
    r.span("score", 10, 11, parent=a, attrs={"arclight.reward.value": 0.75})  # any sender, no SDK
    write(cfg.lake.path, [r])
    report, rows = _triplets(cfg)
    assert report.rewards == 1 and report.missing_rewards == 0
    assert [(t["reward"], t["rollout_return"], t["flags"]) for t in rows] == [(0.75, 0.75, ["zero_advantage_group"])]


def test_a_reward_value_set_on_an_agent_span_keeps_the_agent_and_its_calls(tmp_path):
    cfg = make_config(tmp_path)
    r = Rollout("ro1", task_id="t")
    a = r.agent("solver", 0, 50, parent=r.span("rollout", 0, 100), attrs={"arclight.reward.value": 0.5})
    r.call(1, 5, parent=a)
    write(cfg.lake.path, [r])
    report, rows = _triplets(cfg)
    assert report.agents == {"solver": 1} and report.judge_calls == 0
    assert [(t["agent_name"], t["reward"]) for t in rows] == [("solver", 0.5)]


def test_a_reward_function_span_makes_judge_calls_but_is_no_missing_reward(tmp_path):
    from lightning_core import semconv

    cfg = make_config(tmp_path)
    r = Rollout("ro1", task_id="t")
    a = r.agent("solver", 0, 50, parent=r.span("rollout", 0, 100))
    r.call(1, 5, parent=a)
    judge = r.span(semconv.SPAN_NAME_REWARD_FUNCTION.format(name="judge"), 60, 90, attrs={"arclight.span.kind": "reward"})
    r.call(61, 70, parent=judge, prompt=(9,))
    r.reward(1.0, 80, parent=judge)
    write(cfg.lake.path, [r])
    report, rows = _triplets(cfg)
    assert (report.llm_calls, report.judge_calls, report.rewards, report.missing_rewards) == (1, 1, 1, 0)
    assert [(t["prompt_token_ids"], t["reward"]) for t in rows] == [([1, 2, 3], 1.0)]


def _reward_order_rollout() -> Rollout:
    r = Rollout("ro1", task_id="t")
    a = r.agent("solver", 0, 100, parent=r.span("rollout", 0, 100))
    r.reward(9.0, 0, parent=a)          # before any call: no call can take it
    r.call(1, 5, parent=a, prompt=(1,))
    r.call(10, 15, parent=a, prompt=(2,))
    r.reward(1.0, 20, parent=a)
    r.call(30, 35, parent=a, prompt=(3,))
    r.reward(2.0, 40, parent=a)
    r.reward(3.0, 50, parent=a)
    r.call(45, 60, parent=a, prompt=(4,))  # still running when the 3.0 arrives
    return r


@pytest.mark.parametrize("policy, rewards, rollout_return", [
    # each call: the first reward that starts after it ends
    ("first_occurrence", [1.0, 1.0, 2.0, None], 15.0),
    # each reward, in time order, to the latest call that ended before it and has none yet
    ("latest_unrewarded_call", [3.0, 1.0, 2.0, None], 15.0),
])
def test_latest_unrewarded_call_gives_each_reward_to_at_most_one_call(tmp_path, policy, rewards, rollout_return):
    cfg = make_config(tmp_path, f"pipeline.reward_policy={policy}")
    write(cfg.lake.path, [_reward_order_rollout()])
    _, rows = _triplets(cfg)
    assert [t["prompt_token_ids"][0] for t in rows] == [1, 2, 3, 4]
    assert [t["reward"] for t in rows] == rewards
    assert {t["rollout_return"] for t in rows} == {rollout_return}
    assert ["no_reward" in t["flags"] for t in rows] == [r is None for r in rewards]


def test_a_missing_reward_never_looks_like_zero_in_the_summary_or_the_epoch_metrics(tmp_path):
    # fails before: every call of a rollout without a reward carried reward 0.0, so reward/mean said 0.0
    from lightning_core.store.catalog import Catalog
    from lightning_core.trainer.batches import epoch_stats

    cfg = make_config(tmp_path)
    silent, scored = Rollout("silent", task_id="t"), Rollout("scored", task_id="t")
    for r in (silent, scored):
        r.call(1, 5, parent=r.agent("solver", 0, 50, parent=r.span("rollout", 0, 100)))
    scored.reward(0.5, 60, parent=scored.rows[0]["span_id"])
    write(cfg.lake.path, [silent, scored])
    _, rows = _triplets(cfg)
    assert {t["rollout_id"]: t["reward"] for t in rows} == {"silent": None, "scored": 0.5}
    with Catalog.from_config(cfg).read() as con:
        assert con.execute("SELECT rollout_id, reward, flags FROM rollout_summary ORDER BY 1").fetchall() == [
            ("scored", 0.5, []), ("silent", None, ["no_reward"])]
    assert epoch_stats(rows, success_reward=1.0)["reward/mean"] == 0.5  # the silent rollout is not a 0.0
