"""Silence is not data: spans that give no recognisable call, or calls that get no reward, are reported
loudly -- by the pipeline's report, `arclight triplets` and the train summary -- with the span names
and attribute keys seen, and flagged per rollout."""

from __future__ import annotations

import io

from rich.console import Console
from lightning_core.store.catalog import Catalog
from lightning_core.pipeline.triplets import materialize_triplets
from lightning_core.cli.progress import print_summary
from tests.conftest import make_config
from tests.spans_factory import Rollout, write
from tests.test_cli import _arclight


def _unrecognised(rollout_id: str) -> Rollout:
    """An agent whose model calls carry none of the documented markers."""
    r = Rollout(rollout_id, task_id="t")
    agent = r.agent("solver", 0, 100, parent=r.span("rollout", 0, 100))
    r.span("my_llm.generate", 10, 20, parent=agent, attrs={"my.prompt": "2+2?", "my.completion": "4"})
    r.span("my_llm.generate", 30, 40, parent=agent, attrs={"my.prompt": "3+3?", "my.completion": "6"})
    r.span("score", 50, 50, parent=agent, attrs={"my.score": 1.0})
    return r


def _solver(rollout_id: str, *, known_reward: bool = True) -> Rollout:
    """An agent with a recognised call and a reward, or one whose reward uses an unknown key."""
    r = Rollout(rollout_id, task_id="t")
    agent = r.agent("solver", 0, 100, parent=r.span("rollout", 0, 100))
    r.call(10, 20, parent=agent)
    if known_reward:
        r.reward(1.0, 50, parent=agent)
    else:
        r.span("score", 50, 50, parent=agent, attrs={"my.score": 1.0})
    return r


def test_spans_with_no_recognisable_call_or_no_reward_are_reported_with_the_span_names_and_keys_seen(tmp_path):
    # fails before: the report counted 0 calls / 0 rewards and said nothing else
    cfg = make_config(tmp_path)
    write(cfg.lake.path, [_unrecognised("ro-a"), _solver("ro-b", known_reward=False), _solver("ro-c")])
    report = materialize_triplets(cfg, run_id="r1", epoch=0)
    no_calls, no_reward = report.silences
    assert (no_calls.kind, no_calls.rollouts, no_calls.of_rollouts, no_calls.spans) == ("no_calls", ["ro-a"], 3, 5)
    assert (no_reward.kind, no_reward.rollouts, no_reward.calls) == ("no_reward", ["ro-b"], 1)
    shapes = {s.name: (s.spans, s.attribute_keys) for s in no_calls.shapes}
    assert shapes["my_llm.generate"] == (2, ["my.completion", "my.prompt"])
    assert shapes["agent solver"] == (1, ["agent.name", "arclight.span.kind"])
    message = no_calls.message()
    assert message.startswith("no LLM call recognised in 1 of 3 rollouts (ro-a): their 5 spans give no training data.")
    assert "'my_llm.generate' x2: my.completion, my.prompt" in message and "docs/span-conventions.md" in message
    assert "pipeline.llm_call_match" in message
    reward_message = no_reward.message(missing_reward=0.0)
    assert reward_message.startswith("no reward in 1 of 3 rollouts (ro-b): their 1 calls have reward NULL and the flag "
                                     "no_reward, and each rollout's return is pipeline.missing_reward = 0.")
    assert "'score' x1: my.score" in reward_message and "arclight.reward.value" in reward_message
    with Catalog.from_config(cfg).read() as con:  # and a flag per rollout
        assert con.execute("SELECT rollout_id, flags FROM rollout_summary ORDER BY 1").fetchall() == [
            ("ro-a", ["no_reward", "no_calls"]), ("ro-b", ["no_reward"]), ("ro-c", [])]


def test_a_run_whose_spans_all_speak_a_known_convention_reports_no_silence(tmp_path):
    cfg = make_config(tmp_path)
    write(cfg.lake.path, [_solver("ro-c")])
    assert materialize_triplets(cfg, run_id="r1", epoch=0).silences == []


def test_arclight_triplets_and_the_train_summary_print_the_warnings(tmp_path):
    cfg = make_config(tmp_path, "run_name=r1")
    write(cfg.lake.path, [_unrecognised("ro-a"), _solver("ro-c")])
    result = _arclight("triplets", "--lake", str(cfg.lake.path), "--run", "r1")
    assert result.returncode == 0, result.stderr
    assert result.stdout == ""  # the summary and its warnings go to stderr
    assert "warning: no LLM call recognised in 1 of 2 rollouts (ro-a)" in result.stderr
    assert "'my_llm.generate' x2: my.completion, my.prompt" in result.stderr
    Catalog.from_config(cfg).ensure()
    out = io.StringIO()
    print_summary(cfg, console=Console(file=out, width=200))
    assert "warning: no LLM call recognised in 1 of 2 rollouts (ro-a)" in out.getvalue()
    assert "docs/span-conventions.md" in out.getvalue()
