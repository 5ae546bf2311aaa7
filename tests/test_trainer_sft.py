"""SFT on the trainer's own step (``sft.plan_sft_steps`` + ``grpo.train_grpo``): the plan, and that its update is the
token-mean negative log-likelihood's, through the plain and the shared-prefix forward alike."""

from __future__ import annotations

import pytest
import torch

from lightning_core.trainer.batches import make_samples
from lightning_core.trainer.grpo import train_grpo
from lightning_core.trainer.policy_model import load_policy_model, seed_everything
from lightning_core.trainer.sft import plan_sft_steps
from tests.tiny_llama import build_tiny_llama, make_triplets

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return build_tiny_llama(tmp_path_factory.mktemp("tiny") / "model")


def sft_samples(**kw):
    rows = make_triplets(**kw)
    for row in rows:  # recorded logprobs, a group-relative advantage: SFT uses neither
        row["response_logprobs"] = [-3.0] * len(row["response_token_ids"])
    samples, _ = make_samples(rows, max_prompt_length=64, max_response_length=64, use_recorded_logprobs=True,
                              keep_zero_advantage=True)
    return samples


def test_the_plan_takes_every_call_once_per_pass_a_rollouts_calls_together_at_advantage_one():
    samples = sft_samples(groups=3, per_group=2, rewarded=0, turns=3)  # 6 rollouts of 3 calls
    steps = plan_sft_steps(samples, calls_per_step=4, passes=2.5, seed=0, shared_prefix="off", micro_batch_tokens=1024)
    assert len(steps) == 13  # ceil(18 / 4) = 5 steps a pass: two passes and half of a third (ceil 12.5)
    first, second = ([s.row for st in steps[5 * p:5 * p + 5] for s in st.samples] for p in range(2))
    assert sorted(first) == sorted(second) == sorted(s.row for s in samples) and first != second  # reshuffled
    assert all(len(st.samples) == 4 for st in steps[:4]) and len(steps[4].samples) == 2
    assert {(s.advantage, s.logprobs) for st in steps for s in st.samples} == {(1.0, None)}
    order = [s.rollout_id for st in steps[:5] for s in st.samples]
    assert all(len(set(order[i:i + 3])) == 1 for i in range(0, 18, 3))  # each rollout's calls one after another
    # the calls' weights: each step's mean over its response tokens
    for st in steps:
        assert sum(st.weights[s.row] * len(s.response_ids) for s in st.samples) == pytest.approx(1.0)


@pytest.mark.parametrize("shared_prefix", ["off", "on"])
def test_an_sft_step_moves_the_weights_as_the_token_mean_negative_log_likelihood_does(tiny_dir, shared_prefix):
    samples = sft_samples(groups=2, per_group=2, rewarded=0, turns=2, seed=4)
    steps = plan_sft_steps(samples, calls_per_step=8, passes=1, seed=0, shared_prefix=shared_prefix,
                           micro_batch_tokens=1024)
    assert len(steps) == 1 and steps[0].shared_prefix is (shared_prefix == "on")

    def model():
        seed_everything(0)
        m = load_policy_model(tiny_dir, finetune="lora", device=CPU, bf16=False, lora_r=4, lora_alpha=8,
                              lora_dropout=0.0, lora_target_modules=["q_proj", "v_proj"])
        for name, p in m.named_parameters():  # LoRA's B starts at zero: give both factors a gradient
            if "lora_B" in name:
                torch.nn.init.normal_(p, std=0.02)
        return m

    ours = model()
    metrics = train_grpo(ours, steps, optimizer=torch.optim.SGD([p for p in ours.parameters() if p.requires_grad], lr=1.0),
                         epsilon_low=0.2, epsilon_high=0.2, beta=0.0, max_grad_norm=1e9, device=CPU,
                         attention="sdpa")

    plain = model()  # the loss written out: every call unpadded, mean over all response tokens, one SGD step
    logps = []
    for s in steps[0].samples:
        logits = plain(input_ids=torch.tensor([s.prompt_ids + s.response_ids])).logits[0]
        logp = torch.log_softmax(logits.float(), dim=-1)
        logps += [logp[len(s.prompt_ids) - 1 + t, tok] for t, tok in enumerate(s.response_ids)]
    nll = -torch.stack(logps).mean()
    nll.backward()
    with torch.no_grad():
        for p in plain.parameters():
            if p.requires_grad:
                p -= p.grad
    assert metrics[0]["nll"] == pytest.approx(nll.item(), rel=1e-5)
    trained = dict(ours.named_parameters())
    for name, p in plain.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(trained[name], p, rtol=1e-4, atol=1e-6)
    assert any(not torch.equal(p, q) for (_, p), (_, q) in zip(model().named_parameters(), plain.named_parameters()))
