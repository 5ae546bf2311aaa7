"""Keeping the best version (rollouts.validate_every): which epochs are validated, which scores count as the run's
validations, and which version is the run's result, on hand-made catalog rows (the flow itself:
tests/test_flows_sampling.py::test_train_evaluates_every_k_epochs_and_shows_the_learning_curve)."""

from __future__ import annotations

import json

from lightning_core.config import load_config
from lightning_core.epoch import bookkeeping as ep
from lightning_core.epoch import draw, reports, validation
from lightning_core.epoch.context import RunContext
from lightning_core.rollouts.runner import RolloutOutcome


def _ctx(tmp_path, *extra):
    dataset = tmp_path / "train.jsonl"
    dataset.write_text("".join(json.dumps({"id": f"t{i}", "hops": 2 + i % 2}) + "\n" for i in range(10)))
    config = load_config(None, overrides=[f"project_dir={tmp_path}", f"rollouts.dataset={dataset}", "run_name=val",
                                          "rollouts.validation_tasks=2", "rollouts.validate_every=2", *extra])
    ctx = RunContext.of(config)
    ctx.catalog.ensure()
    return ctx


def _validated(ctx, *, trained: int, versions: dict[str, str], rewards: list[float], run: str | None = None,
               identity: dict | None = None) -> None:
    """What flows.train.run_validation records, without the servers: ``trained`` epochs completed, the split's
    rollouts scored ``rewards``."""
    for epoch in range(trained):
        ep.set_epoch_status(ctx.catalog, run_id="val", epoch=epoch, status="completed")
    run = run or validation.run_id(ctx.config)
    label = reports.eval_label(ctx.config, versions)
    identity = identity or {**draw.dataset_identity(ctx.config), "versions": versions}
    epoch = reports.eval_epoch(ctx.catalog, run_id=run, label=label, dataset=identity)
    specs = ep.plan_tasks(ctx.catalog, run_id=run, epoch=epoch, mode="eval", tasks=draw.validation_split(ctx.config),
                          group_size=1)
    ep.record_outcomes(ctx.catalog, [RolloutOutcome(s.rollout_id, "succeeded", 0, r, None, 1.0, 2.0)
                                     for s, r in zip(specs, rewards)])
    reports.record_eval(ctx, epoch=epoch, label=label, run_id=run)


def test_validation_is_due_every_nth_epoch_and_after_the_last():
    config = load_config(None, overrides=["rollouts.validation_tasks=2", "rollouts.validate_every=2"])
    assert [n for n in range(8) if validation.due(config, completed=n, target=7)] == [0, 2, 4, 6, 7]
    assert not any(validation.due(load_config(None), completed=n, target=7) for n in range(8))  # off by default


def test_the_best_validated_version_is_the_runs_result_and_the_earliest_of_equal_scores_wins(tmp_path):
    ctx = _ctx(tmp_path)
    assert validation.result_versions(ctx) is None  # nothing scored yet: the newest versions are the result
    _validated(ctx, trained=0, versions={"default": "base"}, rewards=[0.0, 0.5])
    _validated(ctx, trained=2, versions={"default": "default-v2"}, rewards=[1.0, 0.5])
    _validated(ctx, trained=4, versions={"default": "default-v4"}, rewards=[0.5, 0.0])  # collapsed
    _validated(ctx, trained=5, versions={"default": "default-v5"}, rewards=[0.5, 1.0])  # as good as v2, not better
    rows = validation.curve(ctx)
    assert [(r["after_epochs"], r["label"], r["tasks"], r["reward_mean"]) for r in rows] == [
        (0, "base", 2, 0.25), (2, "default-v2", 2, 0.75), (4, "default-v4", 2, 0.25), (5, "default-v5", 2, 0.75)]
    assert validation.best(rows)["label"] == "default-v2"
    assert validation.result_versions(ctx) == {"default": "default-v2"}
    line = validation.describe(rows, config=ctx.config, newest="default-v5")
    assert line.endswith("best: default-v2 after 2 epochs (0.750), the run's result, served at its end and by "
                         "`arclight evaluate` (training continues from default-v5)")
    off = RunContext.of(ctx.config.model_copy(update={"rollouts": ctx.config.rollouts.model_copy(
        update={"validate_every": None})}))
    assert validation.result_versions(off) is None  # validation off: the newest versions serve, as before


def test_an_evaluation_on_the_held_out_file_or_another_split_is_never_taken_for_a_validation(tmp_path):
    ctx = _ctx(tmp_path)
    _validated(ctx, trained=1, versions={"default": "default-v1"}, rewards=[0.0, 0.0])
    # a perfect score of v3 on test.jsonl, in <run>.eval, and one on a split of another size: neither counts
    _validated(ctx, trained=3, versions={"default": "default-v3"}, rewards=[1.0, 1.0], run=reports.eval_run_id(ctx.config),
               identity={"dataset": str(tmp_path / "test.jsonl"), "dataset_sha256": "0" * 64, "eval_tasks": None})
    other = {**draw.dataset_identity(ctx.config), "validation_tasks": 3, "versions": {"default": "default-v3"}}
    _validated(ctx, trained=3, versions={"default": "default-v3"}, rewards=[1.0, 1.0], identity=other)
    assert [r["label"] for r in validation.curve(ctx)] == ["default-v1"]
    assert validation.result_versions(ctx) == {"default": "default-v1"}
