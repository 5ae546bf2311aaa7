"""Results read as text (issue 72): an evaluation, an epoch's rollouts and its sampling as one line a person reads, on
the screen and in a pipe, never a Python dict; the dict itself as JSON with `--format json`. Unit level: the results
come from a real catalog in a temporary folder (what flows.train records), no servers."""

from __future__ import annotations

import json
import re

import pytest

from lightning_core.cli.output import print_result
from lightning_core.config import load_config
from lightning_core.epoch import bookkeeping as ep
from lightning_core.epoch import reports, sentences
from lightning_core.epoch.context import RunContext
from lightning_core.rollouts.runner import RolloutOutcome

DICT_REPR = re.compile(r"\{'\w+': ")  # what `%s` of a dict printed: {'label': 'base', 'eval_epoch': 0, ...}


def _ctx(tmp_path, tasks: int):
    held_out = tmp_path / "test.jsonl"
    held_out.write_text("".join(json.dumps({"id": f"h{i}", "question": f"{i}+1"}) + "\n" for i in range(tasks)))
    config = load_config(None, overrides=[f"project_dir={tmp_path}", f"rollouts.eval_dataset={held_out}",
                                          "run_name=calc"])
    ctx = RunContext.of(config)
    ctx.catalog.ensure()
    return ctx


def _evaluated(ctx, *, trained: int, label: str, outcomes: list[tuple[str, float | None, str | None]]) -> dict:
    """What flows.train.run_evaluation records, without the servers: ``trained`` epochs completed, then one held-out
    rollout per task with (status, reward, error_kind); return record_eval's result."""
    for epoch in range(trained):
        ep.set_epoch_status(ctx.catalog, run_id="calc", epoch=epoch, status="completed")
    run = reports.eval_run_id(ctx.config)
    epoch = reports.eval_epoch(ctx.catalog, run_id=run, label=label, dataset=reports.eval_dataset(ctx.config))
    tasks = [json.loads(line) for line in ctx.config.rollouts.eval_dataset.read_text().splitlines()]
    specs = ep.plan_tasks(ctx.catalog, run_id=run, epoch=epoch, mode="eval", tasks=tasks, group_size=1)
    ep.record_outcomes(ctx.catalog, [RolloutOutcome(s.rollout_id, status, 0, reward, None, 1.0, 2.0, error_kind=kind)
                                     for s, (status, reward, kind) in zip(specs, outcomes)])
    return reports.record_eval(ctx, epoch=epoch, label=label)


def test_an_evaluation_reads_as_tasks_succeeded_of_tasks_with_its_rate_reward_and_file(tmp_path):
    ctx = _ctx(tmp_path, 4)
    scored = [("succeeded", 1.0, None)] * 3 + [("succeeded", 0.0, None)]
    result = _evaluated(ctx, trained=8, label="calc-v8", outcomes=scored)
    assert (result["tasks"], result["after_epochs"], result["success_rate"]) == (4, 8, 0.75)  # the dict it describes
    assert sentences.evaluation(result) == ("held-out calc-v8 after 8 epochs: 3/4 tasks succeeded (75%), reward 0.750 "
                                            "on test.jsonl")


def test_an_evaluation_says_which_rollouts_failed_and_which_our_services_left_out(tmp_path):
    ctx = _ctx(tmp_path, 5)
    result = _evaluated(ctx, trained=0, label="base", outcomes=[
        ("succeeded", 1.0, None), ("succeeded", 1.0, None), ("succeeded", 0.0, None), ("failed", None, "agent"),
        ("failed", None, "infrastructure")])
    assert (result["tasks"], result["failed"], result["left_out"]) == (4, 1, 1)
    assert sentences.evaluation(result) == (
        "held-out base after 0 epochs: 2/4 tasks succeeded (50%), reward 0.500 on test.jsonl; "
        "1 of the rollouts failed (scored 0); 1 left out: our services failed them")


def test_an_evaluation_our_services_failed_entirely_says_no_task_was_scored(tmp_path):
    ctx = _ctx(tmp_path, 2)
    result = _evaluated(ctx, trained=1, label="calc-v1", outcomes=[("failed", None, "infrastructure")] * 2)
    assert result["success_rate"] is None
    assert sentences.evaluation(result) == ("held-out calc-v1 after 1 epoch: no task scored on test.jsonl; "
                                            "2 left out: our services failed them")


def test_an_epochs_rollouts_and_sampling_read_as_counts_in_words(tmp_path):
    ctx = _ctx(tmp_path, 6)
    tasks = [{"id": f"t{i}"} for i in range(3)]
    specs = ep.plan_tasks(ctx.catalog, run_id="calc", epoch=0, mode="train", tasks=tasks, group_size=2)
    statuses = ["succeeded", "succeeded", "succeeded", "failed", "timed_out"]  # the sixth stays planned
    ep.record_outcomes(ctx.catalog, [RolloutOutcome(s.rollout_id, status, 0, 1.0, None, 1.0, 2.0)
                                     for s, status in zip(specs, statuses)])
    counts = ep.rollout_counts(ctx.catalog, run_id="calc", epoch=0)
    assert sentences.rollout_counts(counts) == "3 succeeded, 1 failed, 1 timed out, 1 planned"
    assert sentences.rollout_counts({}) == "no rollouts"
    sampled = ep.record_sampling(ctx.catalog, run_id="calc", epoch=0, informative_groups=2)
    assert sentences.sampling(sampled) == "3 tasks drawn in 1 round: 2 groups informative, 1 skipped"


@pytest.mark.parametrize("fmt", ["text", "json"])
def test_arclight_evaluates_result_in_a_pipe_is_a_line_of_text_or_of_json_never_a_python_dict(tmp_path, capsys, fmt):
    """What `arclight evaluate` prints on standard output (a pipe here, not a terminal): the sentence, or with
    --format json the result that json.loads reads back whole."""
    ctx = _ctx(tmp_path, 2)
    result = _evaluated(ctx, trained=2, label="calc-v2", outcomes=[("succeeded", 1.0, None), ("succeeded", 0.0, None)])
    print_result(result, fmt=fmt, text=sentences.evaluation(result))
    out = capsys.readouterr().out
    assert not DICT_REPR.search(out) and out.count("\n") == 1
    if fmt == "json":
        assert json.loads(out) == result
    else:
        assert out == "held-out calc-v2 after 2 epochs: 1/2 tasks succeeded (50%), reward 0.500 on test.jsonl\n"
