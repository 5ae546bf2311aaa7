"""The shared-prefix forward gives the plain forward's logprobs and LoRA gradients, at fewer tokens."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from lightning_core.trainer.samples import Sample
from lightning_core.trainer.batches import collate, loss_weights, plan_steps
from lightning_core.trainer.grpo import grpo_loss, response_logps, train_grpo
from lightning_core.trainer.policy_model import load_policy_model, seed_everything
from lightning_core.trainer.prefix_tree import ancestor_mask, build_tree, plain_size, tree_response_logps, tree_size
from tests.tiny_llama import VOCAB, build_tiny_llama

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return build_tiny_llama(tmp_path_factory.mktemp("tiny") / "model", hidden=64, layers=3)


def lora_model(tiny_dir, *, attn: str = "sdpa", seed: int = 0):
    seed_everything(seed)
    model = load_policy_model(tiny_dir, finetune="lora", device=CPU, bf16=False, lora_r=8, lora_alpha=16,
                              lora_dropout=0.0, lora_target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
    model.base_model.model.config._attn_implementation = attn
    for name, p in model.named_parameters():  # a fresh adapter's B is zero: make it non-zero so its A gets gradients
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.2)
    return model


def multi_turn_groups(*, groups: int = 3, rollouts: int = 4, seed: int = 0) -> list[Sample]:
    """Samples as an agent's turns give them: per group one prompt; turn t+1's prompt extends turn t's
    prompt + response with a tool result; some later prompts re-encode the last response token
    differently (as a chat template can), so they share only the longest common prefix."""
    rng = random.Random(seed)
    tok = lambda n: [rng.randrange(3, VOCAB) for _ in range(n)]  # noqa: E731
    samples, row = [], 0
    for g in range(groups):
        prompt = tok(rng.randint(5, 14))
        for r in range(rollouts):
            context = list(prompt)
            for turn in range(rng.randint(1, 3)):
                response = tok(rng.randint(1, 9))
                samples.append(Sample(prompt_ids=list(context), response_ids=response,
                                      logprobs=[-3.0 - 0.1 * k for k in range(len(response))],
                                      advantage=rng.choice([-1.2, -0.4, 0.7, 1.5]), reward=0.0,
                                      rollout_id=f"g{g}-r{r}", group_id=f"g{g}", row=row))
                row += 1
                written = response if rng.random() < 0.6 else response[:-1] + tok(1)
                context = context + written + tok(rng.randint(2, 5))
    return samples


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def loss_and_grads(model, samples, *, shared: bool, device: torch.device = CPU, attention: str = "sdpa",
                   logits_chunk_tokens: int = 1024):
    weights = loss_weights(samples, normalization="token")
    batch = collate(samples, weights=weights, pad_token_id=0, device=device)
    model.zero_grad(set_to_none=True)
    if shared:
        logps, _ = tree_response_logps(model, build_tree(samples), batch["response_ids"], attention=attention,
                                       logits_chunk_tokens=logits_chunk_tokens)
    else:
        logps, _ = response_logps(model, batch, logits_chunk_tokens=logits_chunk_tokens)
    loss, _ = grpo_loss(logps=logps.float(), old_logps=batch["old_logps"], advantages=batch["advantages"],
                        mask=batch["response_mask"], weights=batch["weights"], epsilon_low=0.2, epsilon_high=0.2)
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    return logps.detach() * batch["response_mask"], grads


def test_tree_holds_each_distinct_prefix_once_and_reads_every_response_token():
    samples = multi_turn_groups(seed=1)
    tree = build_tree(samples)
    assert tree.size == tree_size(samples) < sum(s.tokens for s in samples) / 2
    for b, s in enumerate(samples):
        sequence = s.prompt_ids + s.response_ids
        for k in range(len(s.response_ids)):
            node = int(tree.logit_nodes[tree.gather[b, k]])
            # the predicting node sits at position P+k-1 and its path spells the sample's tokens up to there
            assert tree.depths[node] == len(s.prompt_ids) + k - 1
            path = []
            while node >= 0:
                path.append(int(tree.token_ids[node]))
                node = int(tree.parents[node])
            assert path[::-1] == sequence[: len(s.prompt_ids) + k]


def test_ancestor_mask_is_the_causal_mask_on_one_sequence_and_blocks_siblings():
    parents = np.array([-1, 0, 1, 1, 3])  # 0-1-2 and 0-1-3-4: nodes 2 and 3 are siblings
    mask = ancestor_mask(parents)
    assert mask.tolist() == [
        [True, False, False, False, False],
        [True, True, False, False, False],
        [True, True, True, False, False],
        [True, True, False, True, False],
        [True, True, False, True, True],
    ]


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_shared_prefix_logprobs_and_lora_gradients_equal_the_plain_forward(tiny_dir, attn):
    model = lora_model(tiny_dir, attn=attn)
    samples = multi_turn_groups(groups=3, rollouts=4, seed=2)
    assert len({len(s.prompt_ids) for s in samples}) > 5 and len({len(s.response_ids) for s in samples}) > 5
    plain_logps, plain_grads = loss_and_grads(model, samples, shared=False)
    tree_logps, tree_grads = loss_and_grads(model, samples, shared=True)
    assert relative_error(tree_logps, plain_logps) < 1e-4
    assert plain_grads.keys() == tree_grads.keys() and len(plain_grads) == 3 * 4 * 2
    for name, grad in plain_grads.items():
        assert grad.norm() > 0, name
        assert relative_error(tree_grads[name], grad) < 1e-4, name


def test_a_shared_prefix_step_updates_the_adapter_as_the_plain_step_does(tiny_dir):
    samples = multi_turn_groups(groups=2, rollouts=4, seed=3)
    after = {}
    for mode in ("off", "on"):
        model = lora_model(tiny_dir)
        steps = plan_steps(samples, tokens_per_step=10_000, micro_batch_size=4, normalization="token", seed=0,
                           shared_prefix=mode, micro_batch_tokens=60)
        assert all(step.shared_prefix == (mode == "on") for step in steps)
        if mode == "on":  # the budget split the step into several packed micro-batches, each within it
            assert len(steps[0].micro_batches) > 1 and all(tree_size(mb) <= 60 or len(mb) == 1 for mb in steps[0].micro_batches)
        optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
        history = train_grpo(model, steps, optimizer=optimizer, epsilon_low=0.2, epsilon_high=0.2, beta=0.04,
                             max_grad_norm=100.0, device=CPU, reference=_reference(model), pad_token_id=0)
        assert history[0]["shared_prefix"] == (1.0 if mode == "on" else 0.0)
        after[mode] = ({n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}, history[0])
    (plain, plain_metrics), (shared, shared_metrics) = after["off"], after["on"]
    for name, value in plain.items():
        assert relative_error(shared[name], value) < 1e-4, name
    assert shared_metrics["loss"] == pytest.approx(plain_metrics["loss"], rel=1e-4)
    assert shared_metrics["kl"] == pytest.approx(plain_metrics["kl"], rel=1e-3)
    assert shared_metrics["encoded_tokens"] < plain_metrics["encoded_tokens"] / 2


def _reference(model):
    from lightning_core.trainer.grpo import micro_batch_logps

    def reference(batch, tree):
        with model.disable_adapter():
            return micro_batch_logps(model, batch, tree)[0]
    return reference


def test_auto_uses_the_shared_prefix_only_where_it_saves_tokens():
    grouped = multi_turn_groups(groups=2, rollouts=6, seed=4)
    rng = random.Random(5)
    distinct = [Sample(prompt_ids=[3 + i] + [rng.randrange(3, VOCAB) for _ in range(7)], response_ids=[5, 6], logprobs=None,
                       advantage=1.0, reward=1.0, rollout_id=f"r{i}", group_id=f"g{i}", row=i) for i in range(8)]
    plan = lambda samples: plan_steps(samples, tokens_per_step=10_000, micro_batch_size=8,  # noqa: E731
                                      normalization="token", seed=0, shared_prefix="auto")
    assert plan(grouped)[0].shared_prefix is True
    assert plan(distinct)[0].shared_prefix is False
    assert tree_size(distinct) == plain_size(distinct) == 80
