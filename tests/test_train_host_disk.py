"""What a train host keeps on its own disk (issue 71, findings 1, 2 and 6): a version trained again after an interrupted
run replaces everything made under its name, a local folder is taken as the parent only when it is the published one,
and each host that trains keeps ``serving.keep_versions`` of what it made and fetched. The functions a train host runs,
called on folders here, a real tiny Llama and a real store (a folder): no Ray, no namespaces."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from lightning_core.common import published
from lightning_core.common.durable import save_atomically
from lightning_core.config import ConfigError, load_config
from lightning_core.epoch import train_hosts
from lightning_core.common.host_weights import publish_state
from lightning_core.epoch.train_hosts import _with_parent_here
from lightning_core.serving.redeploy import merge_adapter
from lightning_core.trainer.train import TrainJob
from tests.tiny_llama import build_tiny_llama


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return build_tiny_llama(tmp_path_factory.mktemp("tiny") / "model")


def _config(tmp_path: Path, *more: str):
    return load_config(None, overrides=[f"project_dir={tmp_path / 'host'}", f"serving.weights_uri=file://{tmp_path}/store",
                                        *more]).resolved()


def _job(config, *, version: str, parent: str | None = None, parent_dir: Path | None = None, **kw) -> TrainJob:
    fields = dict(config=config, policy="calc", version=version, run_id="r1", epoch=2, cfg=config.trainer, samples=[],
                  base_model_dir=str(config.project_dir), parent_version=parent,
                  parent_adapter_dir=str(parent_dir) if parent_dir else None, parent_state_dir=None,
                  mlflow_run_id="m", first_step=0)
    return TrainJob(**{**fields, **kw})


def _lora(tiny: Path, *, seed: int):
    """A LoRA adapter of the tiny Llama whose B matrices are not zero (a trained one), as a function that writes it."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny),
                           LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.5)

    def write(folder: Path, *, moments: bytes = b"") -> None:
        model.save_pretrained(folder)
        (folder / "optimizer.pt").write_bytes(moments or f"moments of seed {seed}".encode())
    return write


def _version(root: Path, name: str, write) -> Path:
    """Save a version as ``compute_version`` does: a folder of that name (an interrupted run's) is replaced."""
    return save_atomically(write, root=root, name=name, replace=True)


def test_a_version_trained_again_publishes_its_own_optimizer_state_not_the_interrupted_runs(tmp_path):
    config = _config(tmp_path)
    root = config.trainer.output_dir / "calc"

    def version(moments: bytes):
        def write(folder: Path) -> None:
            folder.mkdir()
            (folder / "adapter_model.safetensors").write_bytes(b"weights")
            (folder / "optimizer.pt").write_bytes(moments)
        return write

    publish_state(config, _version(root, "calc-v3", version(b"interrupted run's moments")), policy="calc",
                  state_file="optimizer.pt")
    # the flow never recorded calc-v3; the run resumes with another learning_rate and trains calc-v3 again
    publish_state(config, _version(root, "calc-v3", version(b"moments of the version recorded")), policy="calc",
                  state_file="optimizer.pt")
    assert (root / "calc-v3.state" / "optimizer.pt").read_bytes() == b"moments of the version recorded"
    fetched = published.fetch(published.join(f"file://{tmp_path}/store", "calc", "calc-v3.state"), tmp_path / "next-host")
    assert (fetched / "optimizer.pt").read_bytes() == b"moments of the version recorded"


def test_merged_weights_are_made_again_when_their_adapter_was_trained_again_and_reused_when_not(tmp_path, tiny):
    from safetensors.torch import load_file

    root = tmp_path / "calc"
    adapter, out = root / "calc-v3", root / "calc-v3.merged"
    _version(root, "calc-v3", _lora(tiny, seed=1))
    merge_adapter(base_model_dir=tiny, adapter_dir=adapter, out_dir=out, dtype="float32")
    first = load_file(out / "model.safetensors")
    _version(root, "calc-v3", _lora(tiny, seed=2))  # trained again after an interrupted run
    merge_adapter(base_model_dir=tiny, adapter_dir=adapter, out_dir=out, dtype="float32")
    again = load_file(out / "model.safetensors")
    fresh = load_file(merge_adapter(base_model_dir=tiny, adapter_dir=adapter, out_dir=tmp_path / "fresh",
                                    dtype="float32") / "model.safetensors")
    assert all(bool((again[k] == fresh[k]).all()) for k in fresh)
    assert any(not bool((again[k] == first[k]).all()) for k in first)
    made = (out / "model.safetensors").stat().st_mtime_ns
    merge_adapter(base_model_dir=tiny, adapter_dir=adapter, out_dir=out, dtype="float32")  # the same adapter: reused
    assert (out / "model.safetensors").stat().st_mtime_ns == made


def test_a_local_folder_named_like_the_parent_is_used_only_when_it_is_the_published_parent(tmp_path):
    config = _config(tmp_path)
    store = f"file://{tmp_path}/store"
    made = tmp_path / "other-host" / "calc-v2"  # the train host that trained calc-v2 again, after the interrupted run
    made.mkdir(parents=True)
    (made / "adapter_model.safetensors").write_bytes(b"weights of the recorded calc-v2")
    (made.with_name("calc-v2.state")).mkdir()
    (made.with_name("calc-v2.state") / "optimizer.pt").write_bytes(b"moments of the recorded calc-v2")
    for folder in (made, made.with_name("calc-v2.state")):
        published.publish(folder, published.join(store, "calc", folder.name))
    here = config.trainer.output_dir / "calc" / "calc-v2"  # this host's calc-v2, of the run that was interrupted
    here.mkdir(parents=True)
    (here / "adapter_model.safetensors").write_bytes(b"weights of the interrupted run")
    (here / "optimizer.pt").write_bytes(b"moments of the interrupted run")
    job = _with_parent_here(_job(config, version="calc-v3", parent="calc-v2", parent_dir=here))
    assert Path(job.parent_adapter_dir, "adapter_model.safetensors").read_bytes() == b"weights of the recorded calc-v2"
    assert Path(job.parent_state_dir, "optimizer.pt").read_bytes() == b"moments of the recorded calc-v2"
    # the same bytes as published (the optimizer state is published apart): this host's own folder, nothing fetched
    (here / "adapter_model.safetensors").write_bytes(b"weights of the recorded calc-v2")
    job = _with_parent_here(_job(config, version="calc-v3", parent="calc-v2", parent_dir=here))
    assert job.parent_adapter_dir == str(here) and job.parent_state_dir is None


def test_a_train_host_keeps_serving_keep_versions_of_its_versions_merged_weights_states_and_fetched_parents(tmp_path, tiny):
    config = _config(tmp_path, "serving.keep_versions=2", f"model.path={tiny}")  # each host resolves model.path
    root = config.trainer.output_dir / "calc"
    parents = config.project_dir / ".arclight" / "trainer" / "parents" / "calc"
    for n in range(1, 6):
        parent = f"calc-v{n - 1}" if n > 1 else None  # trained here, and as the flow's path says it is not: fetched
        job = _with_parent_here(_job(config, version=f"calc-v{n}", parent=parent, parent_dir=tmp_path / "control" / "x",
                                     base_model_dir=str(tiny), merge_dtype="float32"))
        path = _version(root, job.version, _lora(tiny, seed=n))
        published.publish(path, published.join(config.serving.weights_uri, "calc", job.version),  # as compute_version
                          leave_out=("optimizer.pt",))
        train_hosts.settle_version(config, job, path)
        assert (root / f"calc-v{n}.merged" / "model.safetensors").is_file()
    assert sorted(os.listdir(root)) == ["calc-v4", "calc-v4.merged", "calc-v4.state",
                                        "calc-v5", "calc-v5.merged", "calc-v5.state"]
    assert sorted(os.listdir(parents)) == ["calc-v3", "calc-v3.state", "calc-v4", "calc-v4.state"]
    store = tmp_path / "store" / "calc"  # every version stays published: a pruned one is fetched if ever needed
    assert {f"calc-v{n}{kind}" for n in range(1, 6) for kind in ("", ".state", ".merged")} <= set(os.listdir(store))
    shutil.rmtree(root / "calc-v5")  # a host that lost the newest one fetches it as the parent
    job = _with_parent_here(_job(config, version="calc-v6", parent="calc-v5", parent_dir=root / "calc-v5"))
    assert Path(job.parent_adapter_dir).parent == parents


def test_weights_uri_with_a_vllm_replica_on_another_host_than_the_gateways_is_refused_at_load():
    store = "serving.weights_uri=s3://arclight/weights"
    with pytest.raises(ConfigError) as refused:
        load_config(None, overrides=[store, 'serving.urls=["http://10.0.0.7:8000"]', "gateway.endpoint=http://10.0.0.8:8400"])
    text = str(refused.value)
    assert "http://10.0.0.7:8000" in text and "10.0.0.8" in text
    assert "serving.urls" in text and "gateway.endpoint" in text and "serving.weights_uri" in text
    with pytest.raises(ConfigError, match=r"gateway.host"):  # the gateway started here, a replica on a remote host
        load_config(None, overrides=[store, 'serving.urls=["http://203.0.113.7:8000"]'])
    accepted = [
        [store, 'serving.urls=["http://10.0.0.8:8000"]', "gateway.endpoint=http://10.0.0.8:8400"],  # beside the gateway
        [store, 'serving.urls=["http://localhost:8000", "http://127.0.0.1:8001"]'],  # both here
        ['serving.urls=["http://10.0.0.7:8000"]', "gateway.endpoint=http://10.0.0.8:8400"],  # one disk: no weights_uri
        [store, "serving.host=0.0.0.0", "gateway.host=0.0.0.0"],  # replicas started here, beside the gateway
    ]
    for overrides in accepted:
        assert load_config(None, overrides=overrides).serving.urls is not None
