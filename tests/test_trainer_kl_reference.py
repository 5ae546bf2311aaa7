"""trainer.kl_reference: the KL term's reference is the base model or the warm-start version (the SFT adapter the GRPO
epochs started from), with trl's k3 estimator; on a tiny Llama."""

from __future__ import annotations

import math

import pytest
import torch

from lightning_core.config import load_config
from lightning_core.store.catalog import Catalog
from lightning_core.trainer.batches import collate, loss_weights
from lightning_core.trainer.grpo import grpo_loss, response_logps
from lightning_core.trainer.policy_model import (REFERENCE_ADAPTER, drop_reference_adapter, load_policy_model,
                                                 reference_logps_fn, seed_everything)
from lightning_core.trainer.samples import Sample
from lightning_core.trainer.train import kl_reference_dir, train_policy
from lightning_core.trainer.versions import record_version
from tests.tiny_llama import build_tiny_llama, make_triplets, triplet_table

CPU = torch.device("cpu")
LORA = dict(finetune="lora", device=CPU, bf16=False, lora_r=4, lora_alpha=8, lora_dropout=0.0,
            lora_target_modules=["q_proj", "v_proj"])


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return build_tiny_llama(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="module")
def sft_adapter(tiny_dir, tmp_path_factory):
    """A LoRA adapter whose weights move the policy away from the base (lora_B is 0 in a fresh one)."""
    seed_everything(0)
    model = load_policy_model(tiny_dir, **LORA)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.5)
    out = tmp_path_factory.mktemp("sft") / "adapter"
    model.save_pretrained(str(out))
    return out


def test_k3_kl_on_hand_worked_numbers():
    """k3 = exp(ref - logp) - (ref - logp) - 1 per token (trl, Search-R1):
      ref - logp = 0     -> 1 - 0 - 1                   = 0
      ref - logp = ln 2  -> 2 - ln 2 - 1   = 0.306853
      ref - logp = -ln 2 -> 1/2 + ln 2 - 1 = 0.193147   (sum 0.5 exactly; token mean 1/6)
    With advantage 0 the loss is beta x the weighted KL: 0.1 x 0.5/3 = 0.0166667."""
    logps = torch.tensor([[-1.0, -2.0, -1.0]])
    ref = logps + torch.tensor([[0.0, math.log(2), -math.log(2)]])
    loss, stats = grpo_loss(logps=logps, old_logps=torch.full_like(logps, math.nan), advantages=torch.zeros(1),
                            mask=torch.ones_like(logps), weights=torch.tensor([1 / 3]), epsilon_low=0.2,
                            epsilon_high=0.2, beta=0.1, ref_logps=ref)
    assert stats["kl_sum"].item() == pytest.approx(0.5, abs=1e-6)
    assert loss.item() == pytest.approx(0.1 * 0.5 / 3, abs=1e-7)


def test_warm_start_reference_logprobs_come_from_the_warm_start_adapter_not_the_base(tiny_dir, sft_adapter, tmp_path):
    policy = load_policy_model(tiny_dir, parent_adapter_dir=sft_adapter, **LORA)  # the policy as the epoch starts
    trainable = {n for n, p in policy.named_parameters() if p.requires_grad}
    samples = [Sample(prompt_ids=[3, 4, 5, 6], response_ids=[7, 8, 9, 10, 11], logprobs=None, advantage=1.0, reward=1.0,
                      rollout_id="r", group_id="g", row=0)]
    batch = collate(samples, weights=loss_weights(samples, normalization="token"), pad_token_id=0, device=CPU)
    warm = reference_logps_fn(policy, base_model_dir=tiny_dir, finetune="lora", device=CPU, reference_dir=sft_adapter)
    base = reference_logps_fn(policy, base_model_dir=tiny_dir, finetune="lora", device=CPU)
    policy.train()
    with torch.no_grad():
        own = response_logps(policy, batch)[0]
        ref_warm, ref_base = warm(batch, None), base(batch, None)

    def k3(ref):
        return (torch.exp(ref - own) - (ref - own) - 1).sum().item()

    assert k3(ref_warm) == pytest.approx(0.0, abs=1e-9)  # the policy is the warm start: no KL
    assert k3(ref_base) > 1e-3  # the adapter moved it away from the base
    # the policy is left as it was: its adapter active and trainable, the reference's frozen, in train mode
    assert policy.active_adapter == "default" and policy.training
    assert {n for n, p in policy.named_parameters() if p.requires_grad} == trainable
    assert all(REFERENCE_ADAPTER not in n for n in trainable)
    drop_reference_adapter(policy)  # the version saves the policy's adapter alone
    policy.save_pretrained(str(tmp_path / "v"))
    assert not (tmp_path / "v" / REFERENCE_ADAPTER).exists() and list(policy.peft_config) == ["default"]


def record(catalog, version, *, parent, run, mode, kind="lora"):
    record_version(catalog, version=version, policy="default", parent_version=parent, run_id=run, epoch=0,
                   path=f"/versions/{version}", metrics={"mode": mode}, kind=kind, base_model="/models/base",
                   mlflow_run_id=None, registry_version=None)


def test_warm_start_is_the_newest_sft_version_or_the_one_the_run_continued_and_is_refused_without_one(tmp_path):
    cfg = load_config(None, overrides=[f"project_dir={tmp_path}", "trainer.beta=0.01", "trainer.kl_reference=warm_start"])
    catalog = Catalog.from_config(cfg)
    catalog.ensure()
    for version, parent, run, mode in [("default-v1", None, "r1", "sft"), ("default-v2", "default-v1", "r1", "sft"),
                                       ("default-v3", "default-v2", "r1", "grpo"), ("default-v4", "default-v3", "r1", "grpo"),
                                       ("default-v5", None, "r0", "grpo")]:
        record(catalog, version, parent=parent, run=run, mode=mode)

    def reference(parent, *, run="r1", **trainer):
        return kl_reference_dir(catalog, cfg.trainer.model_copy(update=trainer), policy="default", run_id=run,
                                parent_version=parent, base_model_dir="/versions/parent")

    assert reference("default-v4") == ("default-v2", "/versions/default-v2")  # the last SFT epoch's
    assert reference("default-v2") == ("default-v2", "/versions/default-v2")  # the first GRPO epoch: its parent
    assert reference("default-v4", run="r2") == ("default-v4", "/versions/default-v4")  # a run continuing another
    assert reference("default-v4", beta=0.0) == (None, None)  # no KL term, no reference pass
    assert reference("default-v4", kl_reference="base") == (None, None)  # LoRA: the adapter switched off
    # full fine-tuning: the base model at the lineage's root, not the parent checkpoint it loads
    assert reference("default-v4", kl_reference="base", finetune="full") == (None, "/models/base")
    for parent in ("default-v5", None):  # GRPO from the base alone: nothing to take the KL to
        with pytest.raises(ValueError, match=r"trainer\.kl_reference=warm_start.*set trainer\.kl_reference=base"):
            reference(parent, run="r0")


def test_grpo_after_sft_takes_its_kl_to_the_sft_version_and_records_it(tmp_path, tiny_dir):
    """An SFT epoch, then two GRPO epochs with kl_reference=warm_start: both take the KL to the SFT version. The first
    GRPO step of the first GRPO epoch starts at the SFT policy (KL 0); the second epoch's starts away from it."""
    fast = [f"project_dir={tmp_path}", "name=calc", "trainer.micro_batch_size=8", "trainer.learning_rate=0.02",
            "trainer.lora_r=4", "trainer.lora_alpha=8", "trainer.log_samples=0", "trainer.beta=0.05",
            "trainer.kl_reference=warm_start", "trainer.max_steps=2", "trainer.tokens_per_step=200"]
    sft = train_policy(load_config(None, overrides=[*fast, "trainer.mode=sft"]),
                       triplet_table(make_triplets(groups=3, per_group=4, epoch=0)), policy="default",
                       base_model_dir=tiny_dir, run_id="r1", epoch=0)
    assert sft.version == "default-v1" and sft.metrics["mode"] == "sft"
    grpo = load_config(None, overrides=fast)
    first = train_policy(grpo, triplet_table(make_triplets(groups=3, per_group=4, epoch=1)), policy="default",
                         base_model_dir=tiny_dir, parent_adapter_dir=sft.path, run_id="r1", epoch=1)
    second = train_policy(grpo, triplet_table(make_triplets(groups=3, per_group=4, epoch=2)), policy="default",
                          base_model_dir=tiny_dir, parent_adapter_dir=first.path, run_id="r1", epoch=2)
    for result in (first, second):
        assert result.metrics["kl_reference"] == "warm_start" and result.metrics["kl_reference_version"] == "default-v1"
        assert not (result.path / REFERENCE_ADAPTER).exists()  # the version holds the policy's adapter alone
    assert first.steps[0]["kl"] == pytest.approx(0.0, abs=1e-7)
    assert second.steps[0]["kl"] > 1e-6 and second.metrics["kl"] > 0
