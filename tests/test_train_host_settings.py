"""Settings that depend on the machine are resolved on the train host, not on the flow's (issue 71, finding 3): the base
model a version trains from, the tree attention's backend and the behaviour correction's reason; the flow records what
the host reports. The functions a train host runs, called here on a tiny Llama (no Ray cluster); the flow's side with
``train_policy`` and an executor that stands in for a GPU train host (this machine has none)."""

from __future__ import annotations

import dataclasses
import socket
from pathlib import Path

import mlflow
import pytest
from mlflow.tracking import MlflowClient

from lightning_core.config import load_config
from lightning_core.epoch.failures import TrainHostError
from lightning_core.epoch.train_hosts import _with_parent_here
from lightning_core.trainer.train import TrainDone, TrainJob, compute_version, train_policy
from tests.tiny_llama import build_tiny_llama, make_triplets, triplet_table

FAST = ["trainer.micro_batch_size=8", "trainer.learning_rate=0.02", "trainer.lora_r=4", "trainer.lora_alpha=8",
        "trainer.log_samples=0"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return build_tiny_llama(tmp_path_factory.mktemp("tiny") / "model")


def _config(tmp_path: Path, *more: str):
    return load_config(None, overrides=[f"project_dir={tmp_path / 'host'}", f"serving.weights_uri=file://{tmp_path}/store",
                                        *FAST, *more]).resolved()


def _job(config, **kw) -> TrainJob:
    fields = dict(config=config, policy="calc", version="calc-v1", run_id="r1", epoch=0, cfg=config.trainer, samples=[],
                  base_model_dir=str(config.project_dir / "control-only" / "models" / "base"), parent_version=None,
                  parent_adapter_dir=None, parent_state_dir=None, mlflow_run_id="m", first_step=0)
    return TrainJob(**{**fields, **kw})


def test_full_finetuning_from_the_base_loads_the_model_as_the_train_host_resolves_model_path(tmp_path, tiny):
    config = _config(tmp_path, f"model.path={tiny}", "trainer.finetune=full")
    job = _with_parent_here(_job(config))  # epoch 0: the flow's path to the base model is not on this host
    assert job.base_model_dir == str(tiny)
    absent = tmp_path / "models" / "absent"  # model.path names a folder this host lacks, though the flow's host has it
    with pytest.raises(TrainHostError) as refused:
        _with_parent_here(_job(_config(tmp_path, f"model.path={absent}", "trainer.finetune=full"), base_model_dir=str(tiny)))
    text = str(refused.value)
    assert socket.gethostname() in text and str(absent) in text and "model.path" in text


def test_flex_attention_on_a_cpu_flow_host_reaches_the_gpu_train_host_and_its_choices_are_recorded(tmp_path, tiny):
    config = load_config(None, overrides=[f"project_dir={tmp_path}", "name=calc", *FAST, "trainer.attention=flex",
                                          "trainer.device=auto", "serving.dtype=bfloat16"])
    sent: list[TrainJob] = []
    on_gpu = {"attention_backend": "flex", "behaviour_correction_used": "decoupled",
              "behaviour_correction_why": "vLLM computes bfloat16 on cpu, the trainer bfloat16 autocast on cuda"}

    def gpu_train_host(job: TrainJob, should_stop) -> TrainDone:
        """A GPU train host as it reports back: this machine trains the job on its CPU (sdpa), the report says flex."""
        sent.append(job)
        done = compute_version(dataclasses.replace(job, cfg=job.cfg.model_copy(update={"attention": "sdpa"})),
                               on_step=None)
        return dataclasses.replace(done, chosen=on_gpu, host="10.0.0.7")

    result = train_policy(config, triplet_table(make_triplets(groups=2, per_group=4, epoch=0)), policy="default",
                          base_model_dir=tiny, run_id="r1", epoch=0, executor=gpu_train_host)
    assert sent[0].cfg.attention == "flex" and sent[0].vllm_numerics == "bfloat16 on cpu"  # left to the train host
    assert result.version == "default-v1" and result.metrics["behaviour_correction"] == "decoupled"
    mlflow.set_tracking_uri(config.mlflow_uri)
    params = MlflowClient().get_run(result.mlflow_run_id).data.params
    assert {k: params[k] for k in on_gpu} == on_gpu


def test_a_train_host_reports_the_attention_and_behaviour_correction_of_its_own_device(tmp_path, tiny):
    config = _config(tmp_path, f"model.path={tiny}", "trainer.attention=auto", "trainer.dtype=float32")
    from lightning_core.trainer.batches import make_samples, rows_of

    samples, _ = make_samples(rows_of(triplet_table(make_triplets(groups=2, per_group=4, epoch=0))),
                              max_prompt_length=config.trainer.max_prompt_length,
                              max_response_length=config.trainer.max_response_length, use_recorded_logprobs=True)
    job = _job(config, base_model_dir=str(tiny), samples=samples, vllm_numerics="bfloat16 on cuda")  # the flow's view
    done = compute_version(job, on_step=None)
    assert done.chosen == {"attention_backend": "sdpa", "behaviour_correction_used": "decoupled",
                           "behaviour_correction_why": "vLLM computes bfloat16 on cuda, the trainer float32 on cpu"}
