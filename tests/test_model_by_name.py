"""model.path as a Hugging Face id: resolved once through the Hugging Face cache, offline, to the one folder that
vLLM's command line, the trainer and retokenizing all use; a missing id says how to get it. No network: the hub's
address points at a closed port, and the cache entry is laid out from the local SmolLM2 folder."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from lightning_core.common import model as model_mod
from lightning_core.common.model import DEFAULT_MODEL_DIR, ModelError, is_model_dir, resolve_model
from lightning_core.common.services import ServiceError
from lightning_core.config import load_config

HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
COMMIT = "a" * 40
OTHER_COMMIT = "b" * 40


@pytest.fixture
def local_model(request) -> Path:
    """The prepared SmolLM2 folder, or the tiny test model where `arclight model prepare` has not run."""
    return DEFAULT_MODEL_DIR if is_model_dir(DEFAULT_MODEL_DIR) else request.getfixturevalue("tiny_model_dir")


def lay_out_cache_entry(cache: Path, repo_id: str, source: Path, *, commit: str, ref: str | None = "main") -> Path:
    """A Hugging Face cache entry as `hf download` leaves it: snapshots/<commit>/<file> (links) and refs/<ref>."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    for file in source.iterdir():
        if file.is_file():
            (snapshot / file.name).symlink_to(file.resolve())
    if ref is not None:
        (repo / "refs").mkdir(exist_ok=True)
        (repo / "refs" / ref).write_text(commit)
    return snapshot


@pytest.fixture
def hub_cache(tmp_path, monkeypatch, local_model) -> tuple[Path, Path]:
    """An HF_HUB_CACHE holding HUB_ID at COMMIT (refs/main), with the hub unreachable and offline mode on."""
    cache = tmp_path / "hf-cache"
    snapshot = lay_out_cache_entry(cache, HUB_ID, local_model, commit=COMMIT)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens there: a hub call would fail at once
    return cache, snapshot


def config_for(tmp_path: Path, *overrides: str):
    return load_config(None, overrides=[f"project_dir={tmp_path}", f"serving.vllm_python={sys.executable}", *overrides])


def test_a_hub_id_stays_an_id_and_an_existing_folder_wins(tmp_path):
    (tmp_path / "org" / "local").mkdir(parents=True)
    assert config_for(tmp_path, f"model.path={HUB_ID}").model.path == HUB_ID
    assert config_for(tmp_path, "model.path=org/local").model.path == str((tmp_path / "org" / "local").resolve())
    assert config_for(tmp_path, "model.path=./org/other").model.path == str((tmp_path / "org" / "other").resolve())
    assert config_for(tmp_path, "model.path=models/a/b").model.path == str((tmp_path / "models" / "a" / "b").resolve())


def test_a_hub_id_resolves_offline_to_its_cached_snapshot(hub_cache, tmp_path):
    cache, snapshot = hub_cache
    cfg = config_for(tmp_path, f"model.path={HUB_ID}")
    assert resolve_model(cfg) == snapshot
    assert is_model_dir(resolve_model(cfg))


def test_model_offline_needs_no_environment_variable(hub_cache, tmp_path, monkeypatch):
    cache, snapshot = hub_cache
    monkeypatch.delenv("HF_HUB_OFFLINE")
    assert resolve_model(config_for(tmp_path, f"model.path={HUB_ID}", "model.offline=true")) == snapshot


def test_model_revision_picks_that_snapshot(hub_cache, tmp_path, local_model):
    cache, _ = hub_cache
    other = lay_out_cache_entry(cache, HUB_ID, local_model, commit=OTHER_COMMIT, ref="v2")
    assert resolve_model(config_for(tmp_path, f"model.path={HUB_ID}", "model.revision=v2")) == other
    assert resolve_model(config_for(tmp_path, f"model.path={HUB_ID}", f"model.revision={OTHER_COMMIT}")) == other


def test_vllm_the_trainer_and_retokenizing_get_the_same_snapshot_folder(hub_cache, tmp_path, monkeypatch):
    from lightning_core.epoch import stages
    from lightning_core.epoch.context import RunContext
    from lightning_core.pipeline import triplets
    from lightning_core.serving import vllm
    from lightning_core.trainer import train as trainer

    _, snapshot = hub_cache
    cfg = config_for(tmp_path, f"model.path={HUB_ID}")
    argv = vllm.vllm_argv(cfg, port=8000, machine=vllm.Machine(cpu_count=2))
    assert argv[argv.index("--model") + 1] == str(snapshot)
    assert vllm.vllm_env(cfg, machine=vllm.Machine(cpu_count=2))["HF_HUB_OFFLINE"] == "1"  # it reads a local folder

    seen = {}
    monkeypatch.setattr(stages.ep, "sampling_counts", lambda catalog, run_id, epoch: {})
    monkeypatch.setattr(trainer, "train_policies", lambda config, **kw: seen.update(kw) or [])
    stages.train(RunContext(config=cfg, catalog=None), run_id="r", epoch=0)
    assert Path(seen["base_model_dir"]) == snapshot
    assert triplets._tokenizer_path(cfg) == snapshot

    # what the trainer loads from that folder, offline
    from lightning_core.common.model import load_tokenizer
    from lightning_core.trainer.policy_model import load_policy_model

    tokenizer = load_tokenizer(seen["base_model_dir"])
    assert tokenizer.decode(tokenizer("2 + 3")["input_ids"]) == "2 + 3"
    import torch

    policy = load_policy_model(seen["base_model_dir"], finetune="lora", device=torch.device("cpu"), bf16=False,
                               lora_r=4, lora_alpha=8, lora_dropout=0.0, lora_target_modules=["q_proj"])
    assert any(p.requires_grad for p in policy.parameters())


def test_the_hub_is_asked_once_per_run(hub_cache, tmp_path, monkeypatch):
    import huggingface_hub

    calls = []
    real = huggingface_hub.snapshot_download
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda *a, **kw: calls.append(a) or real(*a, **kw))
    cfg = config_for(tmp_path, f"model.path={HUB_ID}")
    assert resolve_model(cfg) == resolve_model(cfg) == resolve_model(cfg)
    assert len(calls) == 1


def test_a_missing_id_names_the_id_the_cache_and_the_download_command(hub_cache, tmp_path):
    cache, _ = hub_cache
    cfg = config_for(tmp_path, "model.path=nobody/no-such-model")
    with pytest.raises(ModelError) as err:
        resolve_model(cfg)
    message = str(err.value)
    assert "nobody/no-such-model" in message and str(cache) in message
    assert "`hf download nobody/no-such-model`" in message and "huggingface-cli download nobody/no-such-model" in message
    assert "\n" not in message  # one paragraph
    from lightning_core.serving import vllm

    with pytest.raises(ServiceError, match="hf download nobody/no-such-model"):  # what starting vLLM reports
        vllm.model_dir(cfg)


def test_the_cache_folder_follows_hf_home(monkeypatch, tmp_path):
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    assert model_mod.hub_cache_dir() == tmp_path / "hf" / "hub"
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "elsewhere"))
    assert model_mod.hub_cache_dir() == tmp_path / "elsewhere"


def test_a_local_folder_is_used_as_before(tmp_path, local_model):
    assert resolve_model(config_for(tmp_path, f"model.path={local_model}")) == Path(local_model)
    with pytest.raises(ModelError, match="is not a prepared model folder"):
        resolve_model(config_for(tmp_path, f"model.path={tmp_path / 'empty'}"))
