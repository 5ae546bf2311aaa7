"""The loss normalisations on a hand-made epoch: token, sequence and rollout (Agent Lightning 1.0's per_rollout_mean),
worked by hand, and the rollout one still counting each rollout once when its calls are split over micro-batches,
ranks or optimizer steps."""

from __future__ import annotations

import pytest
import torch

from lightning_core.trainer import collectives
from lightning_core.trainer.batches import collate, loss_weights, plan_steps
from lightning_core.trainer.grpo import grpo_loss
from lightning_core.trainer.samples import Sample

# Two rollouts of one group. On-policy (no recorded logprobs) the ratio is 1, so a token's loss is -advantage:
#   rollout A: 1 call,  2 tokens, loss 2 each           -> A1 [2, 2]          sum 4, mean 2
#   rollout B: 3 calls, 1 + 3 + 4 tokens                -> B1 [5]             sum 5, mean 5
#                                                          B2 [2, 2, 2]       sum 6, mean 2
#                                                          B3 [1, 1, 1, 1]    sum 4, mean 1
# token:    all 10 tokens weigh alike:          (4 + 5 + 6 + 4) / 10              = 19/10 = 1.9
# sequence: the mean of the 4 calls' means:     (2 + 5 + 2 + 1) / 4               = 10/4  = 2.5
# rollout:  the mean of the 2 rollouts' means:  (4/2 + (5 + 6 + 4)/8) / 2 = (2 + 1.875) / 2 = 1.9375
#           (B's three calls weigh as much together as A's one: more calls do not weigh more)
EXPECTED = {"token": 1.9, "sequence": 2.5, "rollout": 1.9375}
CALLS = [("A", 2, 2.0), ("B", 1, 5.0), ("B", 3, 2.0), ("B", 4, 1.0)]  # rollout, response tokens, per-token loss


def hand_made_samples() -> list[Sample]:
    return [Sample(prompt_ids=[3 + row, 4, 5], response_ids=[6 + k for k in range(tokens)], logprobs=None,
                   advantage=-loss, reward=0.0, rollout_id=rollout, group_id="g", row=row)
            for row, (rollout, tokens, loss) in enumerate(CALLS)]


def summed_loss(micro_batches: list[list[Sample]], weights: dict[int, float]) -> float:
    """What the optimizer step's gradient is the gradient of: grpo_loss summed over micro-batches, ratio 1."""
    total = 0.0
    for micro in micro_batches:
        batch = collate(micro, weights=weights, pad_token_id=0, device="cpu")
        logps = torch.full_like(batch["old_logps"], -1.0)  # any logprobs: on-policy, so the ratio is exactly 1
        loss, _ = grpo_loss(logps=logps, old_logps=batch["old_logps"], advantages=batch["advantages"],
                            mask=batch["response_mask"], weights=batch["weights"], epsilon_low=0.2, epsilon_high=0.2)
        total += loss.item()
    return total


@pytest.mark.parametrize("normalization", ["token", "sequence", "rollout"])
def test_loss_normalisations_give_the_hand_worked_aggregate_over_micro_batches_and_ranks(normalization):
    samples = hand_made_samples()
    (step,) = plan_steps(samples, tokens_per_step=10_000, micro_batch_size=1, normalization=normalization, seed=0)
    assert len(step.micro_batches) == 4  # every call in a micro-batch of its own: rollout B spans three
    assert summed_loss(step.micro_batches, step.weights) == pytest.approx(EXPECTED[normalization], abs=1e-6)
    # two ranks: each runs its share of the micro-batches and the gradients are summed (collectives)
    shares = [collectives.shard(step.micro_batches, rank=r, world_size=2) for r in (0, 1)]
    assert all(shares) and sum(len(s) for s in shares) == 4
    assert sum(summed_loss(s, step.weights) for s in shares) == pytest.approx(EXPECTED[normalization], abs=1e-6)


def test_rollout_loss_counts_a_rollout_split_over_two_steps_once():
    """Step 1 holds A and B's first call, step 2 B's other two. B is 1/8 of its tokens in step 1 and 7/8 in step 2,
    so step 1 holds 1 + 1/8 rollouts and step 2 holds 7/8:
      step 1: (1 x mean(A) + 1/8 x mean(B1)) / (9/8) = (2 + 5/8) / (9/8) = 21/9 = 2.3333
      step 2: (7/8 x mean(B2, B3)) / (7/8)           = (6 + 4) / 7       = 10/7 = 1.4286
    Counting B's one token in step 1 as a whole rollout (the per-step count) gives (2 + 5) / 2 = 3.5 there: one
    token of B weighing as much as all of A."""
    samples = hand_made_samples()
    whole = {"A": 2, "B": 8}
    first = loss_weights(samples[:2], normalization="rollout", rollout_tokens=whole)
    second = loss_weights(samples[2:], normalization="rollout", rollout_tokens=whole)
    assert summed_loss([samples[:2]], first) == pytest.approx(21 / 9, abs=1e-6)
    assert summed_loss([samples[2:]], second) == pytest.approx(10 / 7, abs=1e-6)
    # B's tokens weigh alike wherever they fall: 1 / (8 x 9/8) = 1/9 in step 1, 1 / (8 x 7/8) = 1/7 in step 2,
    # each step's weights summing to 1 over its tokens (a mean, as under token and sequence)
    assert first[1] == pytest.approx(1 / 9) and second[2] == pytest.approx(1 / 7) and second[3] == pytest.approx(1 / 7)
    assert sum(first[s.row] * len(s.response_ids) for s in samples[:2]) == pytest.approx(1.0)
    # plan_steps passes the epoch's token counts: the same split through it gives the same weights
    steps = plan_steps(samples, tokens_per_step=15, micro_batch_size=4, normalization="rollout", seed=0)
    rows = [[s.row for s in step.samples] for step in steps]
    assert len(steps) == 2 and all(set(r) & {1, 2, 3} for r in rows), rows  # B's calls fall in both steps
    for step in steps:
        total = {"A": 2, "B": 8}
        held = sum(len(s.response_ids) / total[s.rollout_id] for s in step.samples)
        for s in step.samples:
            assert step.weights[s.row] == pytest.approx(1 / (total[s.rollout_id] * held))
