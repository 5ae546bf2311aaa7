"""Dynamic sampling and the held-out learning curve, through the real flows (tiny model, vLLM, MLflow)."""

from __future__ import annotations

import mlflow
import pytest
from rich.console import Console

from lightning_core.epoch.context import RunContext
from lightning_core.epoch import reports
from lightning_core.store.catalog import Catalog
from lightning_core.epoch.sampling import tasks_to_add
from tests.conftest import make_config
from tests.test_flows import POLICY, _dataset, _overrides


def test_tasks_to_add_stops_at_the_target_or_the_cap_and_sizes_a_round_by_the_informative_rate():
    assert tasks_to_add(informative=8, drawn=8, target=8, cap=24) == 0
    assert tasks_to_add(informative=2, drawn=8, target=None, cap=24) == 0  # off
    assert tasks_to_add(informative=0, drawn=24, target=8, cap=24) == 0  # cap reached
    assert tasks_to_add(informative=4, drawn=8, target=8, cap=24) == 8  # half informative: 4 missing need 8 tasks
    assert tasks_to_add(informative=0, drawn=8, target=8, cap=24) == 16  # nothing informative yet: up to the cap
    assert tasks_to_add(informative=7, drawn=8, target=8, cap=None) == 2


def _epoch_row(cfg, run):
    with Catalog.from_config(cfg).read() as con:
        return con.execute(
            "SELECT status, tasks_sampled, informative_groups, skipped_groups, sampling_rounds, new_version FROM epochs "
            "WHERE run_id = ? AND epoch = 0", [run]).fetchall()[0]


def _drawn(cfg, run):
    with Catalog.from_config(cfg).read() as con:
        return dict(con.execute(
            "SELECT task_id, max(sampling_round) FROM rollouts WHERE run_id = ? AND epoch = 0 GROUP BY 1", [run]).fetchall())


@pytest.mark.integration
def test_an_epoch_of_all_equal_groups_draws_more_tasks_up_to_the_cap_and_records_the_counts(
    prefect_harness, tmp_path, vllm_server, collector, collector_config, tiny_model_dir
):
    from flows.train import train_epoch

    tasks = [{"id": f"c{i}", "behavior": "constant", "question": f"Say {i}.", "target": "-"} for i in range(10)]
    overrides = _overrides(tmp_path, vllm_server=vllm_server, collector=collector, collector_config=collector_config,
                           tiny_model_dir=tiny_model_dir, dataset=_dataset(tmp_path / "tasks.jsonl", tasks),
                           **{"run_name": "samplecap", "rollouts.group_size": "2", "rollouts.tasks_per_epoch": "2",
                              "rollouts.informative_groups": "2", "rollouts.max_tasks_per_epoch": "6"})
    train_epoch(overrides=overrides)
    cfg = make_config(tmp_path, *overrides)
    status, sampled, informative, skipped, rounds, new_version = _epoch_row(cfg, "samplecap")
    assert (status, sampled, informative, skipped) == ("completed", 6, 0, 6)  # every group all-equal: up to the cap
    assert rounds == len(set(_drawn(cfg, "samplecap").values())) >= 2 and len(_drawn(cfg, "samplecap")) == 6
    assert new_version is None  # nothing informative, nothing trained
    client = mlflow.MlflowClient(cfg.mlflow_uri)
    run = client.search_runs([client.get_experiment_by_name("flowtest").experiment_id])[0]
    logged = {key: [m.value for m in client.get_metric_history(run.info.run_id, key)]
              for key in ("sampling/tasks_sampled", "sampling/informative_groups", "sampling/skipped_groups")}
    assert logged == {"sampling/tasks_sampled": [6.0], "sampling/informative_groups": [0.0], "sampling/skipped_groups": [6.0]}


@pytest.mark.integration
def test_dynamic_sampling_stops_once_enough_groups_are_informative_and_trains_on_them(
    prefect_harness, tmp_path, vllm_server, collector, collector_config, tiny_model_dir
):
    from flows.train import train_epoch

    varied = [{"id": f"v{i}", "question": f"Say the word w{i}.", "target": "zz"} for i in range(4)]
    constant = [{"id": f"c{i}", "behavior": "constant", "question": f"Say {i}.", "target": "-"} for i in range(8)]
    overrides = _overrides(tmp_path, vllm_server=vllm_server, collector=collector, collector_config=collector_config,
                           tiny_model_dir=tiny_model_dir, dataset=_dataset(tmp_path / "tasks.jsonl", varied + constant),
                           **{"run_name": "sampleok", "rollouts.group_size": "2", "rollouts.tasks_per_epoch": "2",
                              "rollouts.informative_groups": "3", "rollouts.max_tasks_per_epoch": "12"})
    train_epoch(overrides=overrides)
    cfg = make_config(tmp_path, *overrides)
    status, sampled, informative, skipped, rounds, new_version = _epoch_row(cfg, "sampleok")
    drawn = _drawn(cfg, "sampleok")
    assert informative == sum(1 for task in drawn if task.startswith("v"))  # exactly the varied groups train
    assert informative >= 3 and sampled == len(drawn) <= 12 and skipped == sampled - informative
    assert status == "completed" and new_version == f"{POLICY}-v1"


@pytest.mark.integration
def test_train_evaluates_every_k_epochs_and_shows_the_learning_curve(
    prefect_harness, tmp_path, vllm_server, collector, collector_config, tiny_model_dir
):
    """And validates on a split of the training tasks (rollouts.validate_every): the best validated version is the
    run's result, the one `arclight evaluate` scores."""
    from flows.train import evaluate, train
    from lightning_core.cli.progress import print_summary
    from lightning_core.epoch import draw, validation

    tasks = [{"id": f"q{i}", "question": f"Say the word w{i}.", "target": "w"} for i in range(3)]
    overrides = _overrides(tmp_path, vllm_server=vllm_server, collector=collector, collector_config=collector_config,
                           tiny_model_dir=tiny_model_dir, dataset=_dataset(tmp_path / "tasks.jsonl", tasks),
                           **{"run_name": "curve", "rollouts.group_size": "2",
                              "rollouts.eval_dataset": _dataset(tmp_path / "test.jsonl", tasks),
                              "evaluation.every_epochs": "2", "rollouts.validation_tasks": "1",
                              "rollouts.validate_every": "2"})
    train(overrides=overrides, epochs=3)
    cfg = make_config(tmp_path, *overrides)
    curve = reports.eval_curve(RunContext.of(cfg))
    assert [c["after_epochs"] for c in curve] == [0, 2, 3]  # before the first, every 2nd and after the last
    assert [c["label"] for c in curve] == ["base", f"{POLICY}-v2", f"{POLICY}-v3"] and all(c["tasks"] == 3 for c in curve)
    with Catalog.from_config(cfg).read() as con:
        eval_rollouts = con.execute("SELECT count(*) FROM rollouts WHERE run_id = 'curve.eval'").fetchall()[0][0]
    # validated like the curve, on a training task that no epoch drew; the best validated version is the result
    validated = validation.curve(RunContext.of(cfg))
    assert [(v["after_epochs"], v["label"], v["tasks"]) for v in validated] == [
        (0, "base", 1), (2, f"{POLICY}-v2", 1), (3, f"{POLICY}-v3", 1)]
    best = validation.best(validated)
    held = {t["id"] for t in draw.validation_split(cfg)}
    with Catalog.from_config(cfg).read() as con:
        trained_on = {r[0] for r in con.execute("SELECT DISTINCT task_id FROM rollouts WHERE run_id = 'curve'").fetchall()}
        assert {r[0] for r in con.execute("SELECT DISTINCT task_id FROM rollouts WHERE run_id = 'curve.validation'")
                .fetchall()} == held
    assert len(held) == 1 and trained_on == {t["id"] for t in tasks} - held
    # `arclight evaluate` scores the run's result, the best validated version: evaluated already, so reused
    evaluated = evaluate(overrides=overrides)
    assert (evaluated["label"], evaluated["after_epochs"]) == (best["label"], best["after_epochs"])
    with Catalog.from_config(cfg).read() as con:
        assert con.execute("SELECT count(*) FROM rollouts WHERE run_id = 'curve.eval'").fetchall()[0][0] == eval_rollouts == 9

    client = mlflow.MlflowClient(cfg.mlflow_uri)
    run = client.search_runs([client.get_experiment_by_name("flowtest").experiment_id])[0]
    history = client.get_metric_history(run.info.run_id, "eval/success_rate")
    assert [m.step for m in history] == [0, 2, 3]
    assert [m.value for m in history] == pytest.approx([c["success_rate"] for c in curve])
    assert "plots/eval_curve.png" in {a.path for a in client.list_artifacts(run.info.run_id, "plots")}
    scores = sorted(client.get_metric_history(run.info.run_id, "validation_reward"), key=lambda m: m.step)
    assert [(m.step, m.value) for m in scores] == [(v["after_epochs"], pytest.approx(v["reward_mean"])) for v in validated]
    assert client.get_run(run.info.run_id).data.tags["validation_best_version"] == best["label"]
    console = Console(record=True, width=200)
    print_summary(cfg, console=console)
    text = console.export_text()
    assert "held-out success (3 tasks, greedy):" in text and f"({POLICY}-v3, 3 epochs)" in text
    assert f"best: {best['label']} after {best['after_epochs']} epochs ({best['reward_mean']:.3f}), the run's result" in text
