"""The collapse signals of an epoch (issue 70): sql/epoch_signals.sql on a hand-made lake, worked by hand, and the
policy's entropy on its sampled tokens as the trainer computes it."""

from __future__ import annotations

import json
import math

import pytest
import torch

from lightning_core import analyst
from lightning_core.pipeline.steps import run_stage
from lightning_core.pipeline.triplets import materialize_triplets
from lightning_core.store.catalog import Catalog
from lightning_core.trainer.token_logps import token_logps
from tests.conftest import make_config
from tests.spans_factory import Rollout, write

# (rollout, task, hops, return R, tool calls): group ta varies, tb is all-equal, tc varies
ROLLOUTS = [("a0", "ta", 2, 1.0, 2), ("a1", "ta", 2, 0.0, 1),
            ("b0", "tb", 3, 0.5, 3), ("b1", "tb", 3, 0.5, 3),
            ("c0", "tc", 3, 1.0, 0), ("c1", "tc", 3, 0.0, 2)]


def _rollout(rollout_id: str, task_id: str, reward: float, tools: int) -> Rollout:
    r = Rollout(rollout_id, task_id=task_id)
    a = r.agent("searcher", 0, 100, parent=r.span("rollout", 0, 200, attrs={"arclight.span.kind": "rollout"}))
    r.call(1, 5, parent=a)
    for i in range(tools):
        r.tool("search", 10 + i, 11 + i, parent=a)
    judge = r.span("reward judge", 50, 60, parent=a, attrs={"arclight.span.kind": "reward"})
    r.tool("lookup", 51, 52, parent=judge)  # a reward function's tool: not the agent's tool call
    r.reward(reward, 90, parent=a)
    return r


def _lake(tmp_path, *overrides: str):
    cfg = make_config(tmp_path, *overrides)
    catalog = Catalog.from_config(cfg)
    catalog.ensure()
    with catalog.write() as con:
        con.executemany(
            "INSERT INTO rollouts (run_id, epoch, rollout_id, task_id, group_id, sample_index, status, reward, task, mode) "
            "VALUES ('r1', 0, ?, ?, ?, 0, 'succeeded', ?, ?, 'train')",
            [(rid, task, task, reward, json.dumps({"id": task, "hops": hops})) for rid, task, hops, reward, _ in ROLLOUTS])
    write(cfg.lake.path, [_rollout(rid, task, reward, tools) for rid, task, _, reward, tools in ROLLOUTS])
    return cfg


def _by_slice(rows) -> dict[str, tuple]:
    return {r["slice"]: (r["rollouts"], r["groups"], r["zero_variance_groups"], r["reward_spread"], r["reward_mean"],
                         r["tool_calls_per_rollout"]) for r in rows}


def test_epoch_signals_give_the_share_of_all_equal_groups_the_spread_within_groups_and_tool_calls_by_a_task_field(
        tmp_path):
    cfg = _lake(tmp_path, "rollouts.metrics_by=hops")
    report = materialize_triplets(cfg, run_id="r1", epoch=0)
    # all: 1 of 3 groups all-equal; population std of R per group 0.5, 0, 0.5 (sample std would give 0.707);
    # R 1, 0, .5, .5, 1, 0; tool calls 2, 1, 3, 3, 0, 2 (the judge's lookups left out)
    expected = {"all": (6, 3, 1 / 3, 1 / 3, 0.5, 11 / 6),
                "hops=2": (2, 1, 0.0, 0.5, 0.5, 1.5),
                "hops=3": (4, 2, 0.5, 0.25, 0.5, 2.0)}
    [policy] = report.policies
    got = _by_slice(policy.signals)
    assert list(got) == ["all", "hops=2", "hops=3"]
    assert {k: pytest.approx(v) for k, v in got.items()} == expected
    assert {(r["run_id"], r["epoch"], r["policy"]) for r in policy.signals} == {("r1", 0, "default")}
    # the same file, run by an analyst on the lake's views, gives the same rows
    con = analyst.connect(cfg)
    rows = run_stage(con, "epoch_signals", params={"run_id": "r1", "epoch": 0, "policy": None, "by": "hops"})
    assert _by_slice(rows.to_arrow_table().to_pylist()) == got
    assert con.execute("SELECT list(tool_calls ORDER BY rollout_id) FROM rollout_summary").fetchall() == [
        ([2, 1, 3, 3, 0, 2],)]


def test_without_metrics_by_the_epoch_signals_have_the_all_slice_only(tmp_path):
    cfg = _lake(tmp_path)
    [policy] = materialize_triplets(cfg, run_id="r1", epoch=0).policies
    assert {k: pytest.approx(v) for k, v in _by_slice(policy.signals).items()} == {"all": (6, 3, 1 / 3, 1 / 3, 0.5, 11 / 6)}


def test_entropy_of_the_sampled_positions_is_log_v_for_a_uniform_policy_and_zero_for_a_one_hot_one():
    vocab, hidden = 7, 3
    head = torch.nn.Linear(hidden, vocab, bias=True)
    with torch.no_grad():
        head.weight.zero_()
        head.bias.copy_(torch.tensor([0.0] * vocab))
    rows = torch.randn(5, hidden)
    logps, entropy = token_logps(rows, torch.tensor([0, 1, 2, 3, 6]), head=head, chunk_tokens=2, with_entropy=True)
    assert entropy.tolist() == pytest.approx([math.log(vocab)] * 5, abs=1e-6)
    assert logps.tolist() == pytest.approx([-math.log(vocab)] * 5, abs=1e-6)
    with torch.no_grad():
        head.bias.copy_(torch.tensor([0.0] + [-1e4] * (vocab - 1)))  # all mass on token 0
    _, entropy = token_logps(rows, torch.zeros(5, dtype=torch.long), head=head, chunk_tokens=2, with_entropy=True)
    assert entropy.tolist() == pytest.approx([0.0] * 5, abs=1e-6)
    assert not entropy.requires_grad


def test_signal_metrics_name_each_value_of_the_task_field_in_keys_mlflow_accepts():
    from mlflow.utils.validation import validate_param_and_metric_name

    from lightning_core.tracking import signal_metrics

    def row(policy, slice_, value):
        return {"policy": policy, "slice": slice_, "zero_variance_groups": value, "reward_spread": value / 2,
                "reward_mean": value / 4, "tool_calls_per_rollout": value * 2}

    rows = [row("default", "all", 0.5), row("default", "hops=2", 1.0), row("default", "kind=a/b?", 0.0),
            row("other", "all", 0.1)]
    metrics = signal_metrics(rows, policy="default")
    assert metrics == {
        "zero_variance_groups": 0.5, "reward_spread": 0.25, "tool_calls_per_rollout": 1.0,
        "zero_variance_groups/hops_2": 1.0, "reward_spread/hops_2": 0.5, "tool_calls_per_rollout/hops_2": 2.0,
        "reward/mean/hops_2": 0.25,
        "zero_variance_groups/kind_a_b_": 0.0, "reward_spread/kind_a_b_": 0.0, "tool_calls_per_rollout/kind_a_b_": 0.0,
        "reward/mean/kind_a_b_": 0.0}
    assert all(validate_param_and_metric_name(key) for key in metrics)
