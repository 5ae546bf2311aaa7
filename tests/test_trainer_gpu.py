"""The trainer on CUDA: the shared-prefix forward (SDPA and FlexAttention) in fp32 and bf16, and a bf16 GRPO step
(skipped without a GPU)."""

from __future__ import annotations

import pytest
import torch

from lightning_core.trainer.batches import plan_steps
from lightning_core.trainer.grpo import train_grpo
from lightning_core.trainer.policy_model import autocast_dtype, load_policy_model, seed_everything
from tests.test_trainer_prefix import loss_and_grads, multi_turn_groups, relative_error
from tests.tiny_llama import build_tiny_llama

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

CUDA = torch.device("cuda")


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return build_tiny_llama(tmp_path_factory.mktemp("tiny") / "model", hidden=64, layers=3)


def cuda_lora(tiny_dir, *, bf16: bool):
    seed_everything(0)
    model = load_policy_model(tiny_dir, finetune="lora", device=CUDA, bf16=bf16, lora_r=8, lora_alpha=16,
                              lora_dropout=0.0, lora_target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.2)
    return model


def test_shared_prefix_equals_the_plain_forward_on_cuda_in_fp32(tiny_dir):
    model = cuda_lora(tiny_dir, bf16=False)
    samples = multi_turn_groups(groups=3, rollouts=4, seed=2)
    plain_logps, plain_grads = loss_and_grads(model, samples, shared=False, device=CUDA)
    tree_logps, tree_grads = loss_and_grads(model, samples, shared=True, device=CUDA)
    assert relative_error(tree_logps, plain_logps) < 1e-4
    for name, grad in plain_grads.items():
        assert relative_error(tree_grads[name], grad) < 1e-4, name


def test_a_bf16_grpo_step_on_cuda_trains_with_the_shared_prefix(tiny_dir):
    assert autocast_dtype("auto", CUDA) == torch.bfloat16
    model = cuda_lora(tiny_dir, bf16=True)
    samples = multi_turn_groups(groups=2, rollouts=4, seed=3)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        plain_logps, _ = loss_and_grads(model, samples, shared=False, device=CUDA)
        tree_logps, _ = loss_and_grads(model, samples, shared=True, device=CUDA)
    assert relative_error(tree_logps, plain_logps) < 2e-2  # bf16 rounding differs between the two layouts
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    steps = plan_steps(samples, tokens_per_step=10_000, micro_batch_size=4, normalization="token", seed=0,
                       shared_prefix="on", micro_batch_tokens=256)
    history = train_grpo(model, steps, optimizer=torch.optim.AdamW([p for p in model.parameters() if p.requires_grad],
                                                                   lr=1e-2),
                         epsilon_low=0.2, epsilon_high=0.2, beta=0.0, max_grad_norm=1.0, device=CUDA,
                         autocast_dtype=torch.bfloat16)
    assert history[0]["skipped"] == 0.0 and history[0]["shared_prefix"] == 1.0
    assert all(torch.isfinite(torch.tensor(h["loss"])) for h in history)
    changed = [n for n, p in model.named_parameters() if p.requires_grad and not torch.equal(p, before[n])]
    assert len(changed) == len(before) and all(p.dtype == torch.float32 for n, p in model.named_parameters() if p.requires_grad)


def test_flex_tree_logprobs_and_lora_gradients_equal_the_plain_forward_on_cuda_in_bf16(tiny_dir):
    from lightning_core.trainer.tree_attention import prepare_attention

    model = cuda_lora(tiny_dir, bf16=True)
    assert prepare_attention(model, "auto", device=CUDA) == "flex"
    samples = multi_turn_groups(groups=3, rollouts=4, seed=2)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        plain_logps, plain_grads = loss_and_grads(model, samples, shared=False, device=CUDA)
        sdpa_logps, sdpa_grads = loss_and_grads(model, samples, shared=True, device=CUDA, attention="sdpa")
        flex_logps, flex_grads = loss_and_grads(model, samples, shared=True, device=CUDA, attention="flex")
    # bf16 rounds differently in each layout: flex must sit as close to the plain forward as SDPA's tree does
    assert relative_error(flex_logps, plain_logps) < 2e-2
    assert relative_error(flex_logps, plain_logps) < 2 * relative_error(sdpa_logps, plain_logps) + 1e-3
    assert plain_grads.keys() == flex_grads.keys() and len(plain_grads) == 3 * 4 * 2
    for name, grad in plain_grads.items():
        assert grad.norm() > 0 and flex_grads[name].norm() > 0, name
        assert relative_error(flex_grads[name], grad) < 5e-2, name
        assert relative_error(flex_grads[name], grad) < 2 * relative_error(sdpa_grads[name], grad) + 1e-2, name


def test_flex_tree_equals_the_plain_forward_on_cuda_in_fp32_and_reports_peak_memory(tiny_dir):
    from lightning_core.trainer.tree_attention import use_flex

    model = cuda_lora(tiny_dir, bf16=False)
    use_flex(model)
    samples = multi_turn_groups(groups=3, rollouts=4, seed=2)
    plain_logps, plain_grads = loss_and_grads(model, samples, shared=False, device=CUDA)
    flex_logps, flex_grads = loss_and_grads(model, samples, shared=True, device=CUDA, attention="flex")
    assert relative_error(flex_logps, plain_logps) < 1e-4
    for name, grad in plain_grads.items():
        assert relative_error(flex_grads[name], grad) < 1e-4, name
    steps = plan_steps(samples, tokens_per_step=10_000, micro_batch_size=4, normalization="token", seed=0,
                       shared_prefix="on", micro_batch_tokens=256)
    history = train_grpo(model, steps, optimizer=torch.optim.SGD([p for p in model.parameters() if p.requires_grad],
                                                                 lr=1e-2),
                         epsilon_low=0.2, epsilon_high=0.2, beta=0.0, max_grad_norm=1.0, device=CUDA, attention="flex")
    assert history[0]["flex_attention"] == 1.0 and 0 < history[0]["peak_memory_gb"] < 80
