"""Tree attention backends and the trainer's memory settings give the same numbers as the plain forward (CPU, fp32).

FlexAttention's forward runs on CPU (its backward does not in torch 2.13): its logprobs are checked
here, its gradients on a GPU (test_trainer_gpu.py).
"""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from torch.nn.attention.flex_attention import create_mask

from lightning_core.config import TrainerConfig
from lightning_core.trainer.batches import collate, loss_weights, plan_steps
from lightning_core.trainer.grpo import response_logps, train_grpo
from lightning_core.trainer.grpo_run import run_grpo
from lightning_core.trainer.policy_model import load_policy_model, seed_everything
from lightning_core.trainer.prefix_tree import ancestor_mask, build_tree, tree_response_logps
from lightning_core.trainer.tree_attention import TREE_FLEX, choose_attention, prepare_attention, tree_mask_mod, use_flex
from tests.test_trainer_prefix import loss_and_grads, lora_model, multi_turn_groups, relative_error

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    from tests.tiny_llama import build_tiny_llama

    return build_tiny_llama(tmp_path_factory.mktemp("tiny") / "model", hidden=64, layers=3)


def random_parents(n: int, *, seed: int) -> np.ndarray:
    """A random tree in creation order: each node's parent is an earlier node (or none)."""
    rng = random.Random(seed)
    return np.array([-1] + [rng.choice([-1] + list(range(i)) + [i - 1] * 3) for i in range(1, n)])


@pytest.mark.parametrize("seed", range(4))
def test_flex_mask_function_is_the_ancestor_mask(seed):
    parents = random_parents(150, seed=seed)
    dense = create_mask(tree_mask_mod(parents, device=CPU), 1, 1, len(parents), len(parents), device="cpu")
    assert dense[0, 0].tolist() == ancestor_mask(parents).tolist()


def test_flex_tree_logprobs_equal_the_plain_and_the_sdpa_tree_forward(tiny_dir):
    model = lora_model(tiny_dir)
    samples = multi_turn_groups(groups=3, rollouts=4, seed=2)  # shared prompts, branches of different lengths
    tree = build_tree(samples)
    assert len(set(tree.response_lengths.tolist())) > 3 and (tree.parents[1:] != np.arange(tree.size - 1)).sum() > 10
    batch = collate(samples, weights=loss_weights(samples, normalization="token"), pad_token_id=0, device=CPU)
    mask = batch["response_mask"]
    with torch.no_grad():  # FlexAttention has no backward on CPU
        plain, _ = response_logps(model, batch)
        sdpa, _ = tree_response_logps(model, tree, batch["response_ids"], attention="sdpa")
        use_flex(model)
        flex, flex_entropy = tree_response_logps(model, tree, batch["response_ids"], attention="flex",
                                                 with_entropy=True)
        after, _ = response_logps(model, batch)  # the plain forward is still SDPA's on a flex-enabled model
    assert model.base_model.model.config._attn_implementation == TREE_FLEX
    torch.testing.assert_close(flex * mask, plain * mask, rtol=0, atol=1e-5)
    torch.testing.assert_close(flex * mask, sdpa * mask, rtol=0, atol=1e-5)
    assert torch.equal(after, plain)
    assert bool((flex_entropy[mask.bool()] > 0).all())


def test_auto_is_sdpa_on_cpu_and_flex_refuses_to_train_there(tiny_dir):
    assert choose_attention("auto", device=CPU) == "sdpa"
    assert choose_attention("sdpa", device=CPU) == "sdpa"
    assert choose_attention("flex", device=CPU, training=False) == "flex"
    with pytest.raises(ValueError, match="trainer.attention=flex cannot train on cpu: FlexAttention has no backward"):
        choose_attention("flex", device=CPU)
    model = lora_model(tiny_dir)
    assert prepare_attention(model, "auto", device=CPU) == "sdpa"
    assert model.base_model.model.config._attn_implementation == "sdpa"
    samples = multi_turn_groups(groups=1, rollouts=2, seed=1)
    cfg = TrainerConfig(attention="flex", shared_prefix="on", beta=0.0)
    with pytest.raises(ValueError, match="cannot train on cpu"):
        run_grpo(model, samples, cfg=cfg, base_model_dir=tiny_dir, device=CPU, amp=None, seed=0, on_step=None)


@pytest.mark.parametrize("shared", [False, True], ids=["plain", "shared_prefix"])
def test_gradient_checkpointing_gives_the_same_loss_and_gradients(tiny_dir, shared):
    samples = multi_turn_groups(groups=2, rollouts=4, seed=5)
    results = []
    for checkpointing in (False, True):
        seed_everything(0)
        model = load_policy_model(tiny_dir, finetune="lora", device=CPU, bf16=False, lora_r=8, lora_alpha=16,
                                  lora_dropout=0.0, lora_target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                                  gradient_checkpointing=checkpointing)
        for name, p in model.named_parameters():  # same draws in both runs: the RNG was seeded above
            if "lora_B" in name:
                torch.nn.init.normal_(p, std=0.2)
        model.train()
        assert model.get_base_model().is_activation_checkpointing == checkpointing
        results.append(loss_and_grads(model, samples, shared=shared))
    (logps_off, grads_off), (logps_on, grads_on) = results
    torch.testing.assert_close(logps_on, logps_off, rtol=0, atol=1e-6)
    assert grads_on.keys() == grads_off.keys() and len(grads_on) == 3 * 4 * 2
    for name, grad in grads_off.items():
        assert grad.norm() > 0, name
        assert relative_error(grads_on[name], grad) < 1e-5, name


@pytest.mark.parametrize("shared", [False, True], ids=["plain", "shared_prefix"])
def test_chunked_logits_run_the_lm_head_on_response_tokens_only_with_the_same_numbers(tiny_dir, shared):
    model = lora_model(tiny_dir)
    samples = multi_turn_groups(groups=2, rollouts=4, seed=6)
    response_tokens = sum(len(s.response_ids) for s in samples)
    rows: list[int] = []
    hook = model.get_base_model().lm_head.register_forward_hook(lambda m, args, out: rows.append(args[0].shape[0]))
    whole_logps, whole_grads = loss_and_grads(model, samples, shared=shared)
    assert rows == [response_tokens]  # one chunk: the head saw each real response token once, no padding, no prompt
    rows.clear()
    chunked_logps, chunked_grads = loss_and_grads(model, samples, shared=shared, logits_chunk_tokens=7)
    hook.remove()
    assert max(rows) == 7 and sum(rows) == 2 * response_tokens  # each chunk again in backward (checkpointed)
    torch.testing.assert_close(chunked_logps, whole_logps, rtol=0, atol=1e-6)
    for name, grad in whole_grads.items():
        assert relative_error(chunked_grads[name], grad) < 1e-5, name


def test_a_cpu_step_records_sdpa_and_no_gpu_memory(tiny_dir):
    model = lora_model(tiny_dir)
    samples = multi_turn_groups(groups=2, rollouts=3, seed=7)
    steps = plan_steps(samples, tokens_per_step=10_000, micro_batch_size=4, normalization="token", seed=0,
                       shared_prefix="on")
    history = train_grpo(model, steps, optimizer=torch.optim.SGD([p for p in model.parameters() if p.requires_grad],
                                                                 lr=0.1),
                         epsilon_low=0.2, epsilon_high=0.2, beta=0.0, max_grad_norm=1.0, device=CPU)
    assert history[0]["shared_prefix"] == 1.0 and history[0]["flex_attention"] == 0.0
    assert "peak_memory_gb" not in history[0]
