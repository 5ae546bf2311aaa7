"""train_policy end to end on a tiny Llama: checkpoint, catalog version, MLflow run and registry."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import mlflow
import pytest
import torch
from mlflow.tracking import MlflowClient

from lightning_core.common.durable import save_atomically
from lightning_core.store.catalog import Catalog
from lightning_core.config import load_config
from lightning_core.trainer import checkpoint
from lightning_core.trainer.train import train_policies, train_policy
from lightning_core.trainer.sft import select_sft_rows
from tests.tiny_llama import build_tiny_llama, make_triplets, triplet_table

FAST = ["trainer.micro_batch_size=8", "trainer.learning_rate=0.02", "trainer.lora_r=4", "trainer.lora_alpha=8",
        "trainer.log_samples=4"]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return build_tiny_llama(tmp_path_factory.mktemp("tiny") / "model")


def project(tmp_path, *overrides):
    return load_config(None, overrides=[f"project_dir={tmp_path}", "name=calc", *FAST, *overrides])


def versions_rows(cfg):
    with Catalog.from_config(cfg).read() as con:
        return con.execute("SELECT version, policy, parent_version, run_id, epoch, path, metrics, kind, "
                           "registry_version FROM policy_versions ORDER BY created_at").fetchall()


def test_an_epoch_trains_saves_records_and_registers_a_version(tmp_path, tiny_dir):
    cfg = project(tmp_path)
    result = train_policy(cfg, triplet_table(make_triplets(groups=3, per_group=4, epoch=0)), policy="default",
                          base_model_dir=tiny_dir, run_id="r1", epoch=0)
    assert result.version == "default-v1" and result.parent_version is None
    assert result.path == tmp_path / ".arclight/checkpoints/default/default-v1"
    assert (result.path / "adapter_model.safetensors").is_file() and (result.path / "adapter_config.json").is_file()
    assert checkpoint.latest(tmp_path / ".arclight/checkpoints/default") == result.path
    assert result.metrics["triplets"] == 12 and result.metrics["trainable_triplets"] == 12
    assert result.metrics["reward/mean"] == pytest.approx(0.25) and result.metrics["success_rate"] == pytest.approx(0.25)
    assert result.metrics["optimizer_steps"] == 1 and result.metrics["skipped_steps"] == 0

    (row,) = versions_rows(cfg)
    assert row[:6] == ("default-v1", "default", None, "r1", 0, str(result.path))
    assert json.loads(row[6])["reward/mean"] == pytest.approx(0.25) and row[7] == "lora" and row[8] == "1"

    # The MLflow store (real SQLite) shows the run, its metrics, plot, samples table, checkpoint and version.
    mlflow.set_tracking_uri(cfg.mlflow_uri)
    assert cfg.mlflow_uri == f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient()
    run = client.get_run(result.mlflow_run_id)
    assert run.info.run_name == "r1/default" and run.data.params["learning_rate"] == "0.02"
    for name in ("loss", "kl", "clip_ratio", "entropy", "grad_norm", "tokens_per_s", "reward/mean", "reward/std",
                 "success_rate", "triplets", "zero_adv_groups"):
        assert name in run.data.metrics, name
    assert run.data.metrics["triplets"] == 12 and run.data.metrics["reward/mean"] == pytest.approx(0.25)
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"plots", "samples", "checkpoints"} <= artifacts
    assert [a.path for a in client.list_artifacts(run.info.run_id, "plots")] == ["plots/reward_curve.png"]
    ckpt = {a.path for a in client.list_artifacts(run.info.run_id, "checkpoints/default-v1")}
    assert "checkpoints/default-v1/adapter_model.safetensors" in ckpt
    local = Path(client.download_artifacts(run.info.run_id, "samples/epoch_0.json", str(tmp_path / "dl")))
    table = json.loads(local.read_text())
    assert len(table["data"]) == 4 and "response_text" in table["columns"]
    mv = client.get_model_version_by_alias("calc-default", "serving")
    assert str(mv.version) == "1" and mv.run_id == result.mlflow_run_id and mv.tags["arclight.version"] == "default-v1"
    assert mv.source.endswith("checkpoints/default-v1")


def test_epoch_with_equal_rewards_in_every_group_makes_no_version(tmp_path, tiny_dir, caplog):
    cfg = project(tmp_path)
    rows = make_triplets(groups=2, per_group=3, rewarded=None)
    assert all(r["advantage"] == 0.0 for r in rows)
    result = train_policy(cfg, triplet_table(rows), policy="default", base_model_dir=tiny_dir, run_id="r1", epoch=0)
    assert result.version is None and result.path is None
    assert "all 2 groups have equal rewards" in result.message and "no new version" in result.message
    assert result.metrics["zero_adv_groups"] == 2
    assert versions_rows(cfg) == []
    assert not (tmp_path / ".arclight/checkpoints/default").exists()
    mlflow.set_tracking_uri(cfg.mlflow_uri)
    run = MlflowClient().get_run(result.mlflow_run_id)
    assert run.data.tags["epoch_0.outcome"] == "no_trainable_triplets" and run.data.metrics["zero_adv_groups"] == 2


def test_two_policies_keep_their_own_version_lines_across_epochs(tmp_path, tiny_dir):
    cfg = project(tmp_path, "policies=[{name: planner, agent_match: plan}, {name: executor, agent_match: exec, "
                            "trainer: {learning_rate: 0.01}}]")
    for epoch in (0, 1):
        tables = {p: triplet_table(make_triplets(groups=2, per_group=2, policy=p, epoch=epoch, seed=epoch))
                  for p in ("planner", "executor")}
        results = train_policies(cfg, run_id="r1", epoch=epoch, base_model_dir=tiny_dir, triplets=tables)
        assert [r.version for r in results] == [f"planner-v{epoch + 1}", f"executor-v{epoch + 1}"]
    rows = {r[0]: r for r in versions_rows(cfg)}
    assert rows["planner-v2"][2] == "planner-v1" and rows["executor-v2"][2] == "executor-v1"
    assert rows["planner-v1"][2] is None and rows["executor-v2"][4] == 1
    # epoch 1 continued the epoch-0 adapter: its weights differ from a fresh adapter's zero-initialised lora_B
    from safetensors.torch import load_file

    v1 = load_file(Path(rows["planner-v1"][5]) / "adapter_model.safetensors")
    v2 = load_file(Path(rows["planner-v2"][5]) / "adapter_model.safetensors")
    key = next(k for k in v1 if "lora_B" in k)
    assert v1[key].abs().sum() > 0 and not torch.equal(v1[key], v2[key])
    mlflow.set_tracking_uri(cfg.mlflow_uri)
    client = MlflowClient()
    assert str(client.get_model_version_by_alias("calc-planner", "serving").version) == "2"
    assert str(client.get_model_version_by_alias("calc-executor", "serving").version) == "2"
    run = client.get_run(results[1].mlflow_run_id)
    assert run.data.params["learning_rate"] == "0.01"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "reward/mean")] == [0, 1]
    assert len(client.get_metric_history(run.info.run_id, "loss")) == 2  # steps continue across epochs


def test_a_crash_while_saving_leaves_latest_on_the_previous_complete_version(tmp_path):
    root = tmp_path / "ckpt"

    def write_ok(folder):
        folder.mkdir()
        (folder / "weights").write_text("v1")

    save_atomically(write_ok, root=root, name="p-v1")
    checkpoint.set_latest(root, "p-v1")

    def write_and_crash(folder):
        folder.mkdir()
        (folder / "weights").write_text("half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        save_atomically(write_and_crash, root=root, name="p-v2")
    assert sorted(os.listdir(root)) == ["latest", "p-v1"]
    assert checkpoint.latest(root) == root / "p-v1" and (root / "latest" / "weights").read_text() == "v1"
    with pytest.raises(FileExistsError):
        save_atomically(write_ok, root=root, name="p-v1")


def test_sft_keeps_the_best_triplets_and_raises_their_likelihood(tmp_path, tiny_dir):
    rows = make_triplets(groups=2, per_group=4, rewarded=2)
    for i, r in enumerate(rows):
        r["reward"] = [0.0, 0.5, 1.0, 0.2][i % 4]
    assert {r["rollout_id"] for r in select_sft_rows(rows, min_reward=1.0, top_fraction=None)} == {"g0-s2", "g1-s2"}
    top = select_sft_rows(rows, min_reward=None, top_fraction=0.5)
    assert {r["rollout_id"] for r in top} == {"g0-s2", "g0-s1", "g1-s2", "g1-s1"}

    # full fine-tuning here (the random tiny model's attention-only LoRA barely moves SFT loss)
    cfg = project(tmp_path, "trainer.mode=sft", "trainer.finetune=full", "trainer.sft_epochs=8",
                  "trainer.learning_rate=0.05")
    result = train_policy(cfg, triplet_table(rows), policy="default", base_model_dir=tiny_dir, run_id="r1", epoch=0)
    assert result.version == "default-v1" and result.metrics["trainable_triplets"] == 2
    losses = [s["loss"] for s in result.steps]
    assert len(losses) == 8 and losses[-1] < 0.5 * losses[0], losses  # loss on the kept responses' tokens falls
    assert {"model.safetensors", "config.json", "tokenizer.json"} <= set(os.listdir(result.path))
    assert versions_rows(cfg)[0][7] == "full"


def test_the_next_epoch_continues_adamw_from_the_parent_version(tmp_path, tiny_dir):
    """A fresh AdamW moves every weight by ~lr on its first step whatever the gradient; the next epoch must
    continue the parent's moments (and step count) instead, and still take the config's learning rate."""
    from lightning_core.trainer.grpo_run import OPTIMIZER_STATE

    cfg = project(tmp_path)
    first = train_policy(cfg, triplet_table(make_triplets(groups=3, per_group=4, epoch=0)), policy="default",
                         base_model_dir=tiny_dir, run_id="r1", epoch=0)
    saved = torch.load(first.path / OPTIMIZER_STATE, weights_only=True)
    assert saved["state"] and all(int(s["step"]) == 1 for s in saved["state"].values())

    cfg = project(tmp_path, "trainer.learning_rate=0.005")
    second = train_policies(cfg, run_id="r1", epoch=1, base_model_dir=tiny_dir,
                            triplets={"default": triplet_table(make_triplets(groups=3, per_group=4, epoch=1))})[0]
    assert second.parent_version == "default-v1"
    resumed = torch.load(second.path / OPTIMIZER_STATE, weights_only=True)
    assert all(int(s["step"]) == 2 for s in resumed["state"].values())  # continued, not restarted
    assert resumed["param_groups"][0]["lr"] == 0.005  # the config sets the hyperparameters, not the parent

    # Off: no state saved, and each epoch starts afresh.
    cfg = project(tmp_path, "trainer.keep_optimizer_state=false")
    third = train_policies(cfg, run_id="r1", epoch=2, base_model_dir=tiny_dir,
                           triplets={"default": triplet_table(make_triplets(groups=3, per_group=4, epoch=2))})[0]
    assert third.parent_version == "default-v2" and not (third.path / OPTIMIZER_STATE).exists()


def test_a_learning_rate_schedule_decays_over_the_runs_last_epochs(tmp_path, tiny_dir):
    """trainer.lr_schedule: each epoch trains at its scheduled rate, which AdamW uses and MLflow records;
    the run's parameters keep the configured peak."""
    from lightning_core.trainer.grpo_run import OPTIMIZER_STATE
    from lightning_core.trainer.train import scheduled_learning_rate

    cfg = project(tmp_path, "epochs=6", "trainer.lr_schedule=linear", "trainer.lr_decay_epochs=4",
                  "trainer.min_lr_ratio=0.25", "trainer.learning_rate=0.01")
    rates = [scheduled_learning_rate(cfg.trainer, epoch=e, epochs=cfg.epochs) for e in range(8)]
    assert rates == pytest.approx([0.01, 0.01, 0.008125, 0.00625, 0.004375, 0.0025, 0.0025, 0.0025])
    cosine = cfg.trainer.model_copy(update={"lr_schedule": "cosine", "lr_decay_epochs": None, "min_lr_ratio": 0.0})
    assert [scheduled_learning_rate(cosine, epoch=e, epochs=4) for e in range(4)] == pytest.approx(
        [0.01 * (1 + 0.5 ** 0.5) / 2, 0.005, 0.01 * (1 - 0.5 ** 0.5) / 2, 0.0])
    constant = cfg.trainer.model_copy(update={"lr_schedule": "constant"})
    assert scheduled_learning_rate(constant, epoch=5, epochs=6) == 0.01

    for epoch in (1, 4):  # epoch 1 at the peak, epoch 4 (the second of the last four) at 0.004375
        result = train_policies(cfg, run_id="r1", epoch=epoch, base_model_dir=tiny_dir, triplets={
            "default": triplet_table(make_triplets(groups=3, per_group=4, epoch=epoch))})[0]
        saved = torch.load(result.path / OPTIMIZER_STATE, weights_only=True)
        assert saved["param_groups"][0]["lr"] == pytest.approx(rates[epoch])
        assert result.metrics["learning_rate"] == pytest.approx(rates[epoch])
    mlflow.set_tracking_uri(cfg.mlflow_uri)
    client = MlflowClient()
    run = client.get_run(result.mlflow_run_id)
    assert run.data.params["learning_rate"] == "0.01" and run.data.params["lr_schedule"] == "linear"
    history = client.get_metric_history(result.mlflow_run_id, "learning_rate")
    assert {m.step: m.value for m in history} == pytest.approx({1: rates[1], 4: rates[4]})


@pytest.mark.parametrize("mode", ["sft", "grpo"])
def test_a_resumed_epoch_trains_each_policy_once_even_when_a_version_was_recorded_before_the_stop(tmp_path, tiny_dir,
                                                                                                  mode):
    # issue 51, finding 5: a version is recorded before the epoch is marked trained; Ctrl-C in between (while the
    # next policy trains, or in an asynchronous epoch's save) used to train the first policy again on the same
    # triplets on resume (masked for GRPO at staleness 0-1 only, never for SFT)
    cfg = project(tmp_path, f"trainer.mode={mode}", "trainer.max_staleness=3",
                  "policies=[{name: planner, agent_match: plan}, {name: executor, agent_match: exec}]")
    tables = {p: triplet_table(make_triplets(groups=2, per_group=2, policy=p, epoch=0)) for p in ("planner", "executor")}
    first = train_policy(cfg, tables["planner"], policy="planner", base_model_dir=tiny_dir, run_id="r1", epoch=0)
    assert first.version == "planner-v1"  # ... and then the run was stopped while the executor trained
    resumed = train_policies(cfg, run_id="r1", epoch=0, base_model_dir=tiny_dir, triplets=tables)
    assert [(r.policy, r.version) for r in resumed] == [("planner", "planner-v1"), ("executor", "executor-v1")]
    assert "already trained on this epoch" in resumed[0].message
    assert sorted(r[0] for r in versions_rows(cfg)) == ["executor-v1", "planner-v1"]
    assert resumed[0].mlflow_run_id == first.mlflow_run_id and resumed[0].path == first.path


def test_a_version_saved_and_registered_but_never_recorded_is_trained_again_under_its_id(tmp_path, tiny_dir):
    # issue 51, finding 5: Ctrl-C after the checkpoint was renamed into place (or registered in MLflow) and before the
    # catalog row: the resumed run picks the same id, and the folder left behind made every later save fail
    cfg = project(tmp_path)
    table = triplet_table(make_triplets(groups=2, per_group=2, epoch=0))
    first = train_policy(cfg, table, policy="default", base_model_dir=tiny_dir, run_id="r1", epoch=0)
    with Catalog.from_config(cfg).write() as con:  # as if the stop came just before the catalog row was written
        con.execute("DELETE FROM policy_versions")
    (first.path / "stale-marker").write_text("from the interrupted run")
    again = train_policy(cfg, table, policy="default", base_model_dir=tiny_dir, run_id="r1", epoch=0)
    assert again.version == "default-v1" and again.path == first.path and not (again.path / "stale-marker").exists()
    assert [r[0] for r in versions_rows(cfg)] == ["default-v1"]
    mlflow.set_tracking_uri(cfg.mlflow_uri)
    registered = MlflowClient().search_model_versions("name = 'calc-default'")
    assert [(v.tags["arclight.version"], str(v.version)) for v in registered] == [("default-v1", again.registry_version)]


@pytest.mark.parametrize("checkpointing", [False, True])
def test_sft_checkpoints_activations_only_when_the_config_says_so(tmp_path, tiny_dir, monkeypatch, checkpointing):
    """trl's SFTConfig, which SFT ran on until it moved to the trainer's own step, turned activation checkpointing
    on by default (and warned through transformers' deprecated name): SFT recomputed every forward pass even with
    ``trainer.gradient_checkpointing: false``. The config decides, as it does for GRPO."""
    import warnings

    from transformers import PreTrainedModel

    enabled = []
    original = PreTrainedModel.activation_checkpointing_enable  # what transformers' Trainer calls
    monkeypatch.setattr(PreTrainedModel, "activation_checkpointing_enable",
                        lambda self, *a, **kw: (enabled.append(type(self).__name__), original(self, *a, **kw))[1])
    cfg = project(tmp_path, "trainer.mode=sft", "trainer.sft_epochs=1", f"trainer.gradient_checkpointing={checkpointing}")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = train_policy(cfg, triplet_table(make_triplets(groups=2, per_group=4, rewarded=2)), policy="default",
                              base_model_dir=tiny_dir, run_id="r1", epoch=0)
    assert result.version == "default-v1"
    assert bool(enabled) is checkpointing, enabled
    # (peft still reads transformers' deprecated `is_gradient_checkpointing` itself: not ours to change)
    ours = [str(w.message) for w in caught if re.search(r"`gradient_checkpointing(_enable)?` is deprecated", str(w.message))]
    assert not ours, ours
