"""Training on samples an older version drew (asynchronous epochs): the ratio against the recorded behaviour
logprobs, AReaL's decoupled objective with a truncated behaviour weight, and the staleness bound."""

from __future__ import annotations

import math

import pytest
import torch

from lightning_core.trainer.batches import collate, loss_weights, make_samples, plan_steps, within_staleness
from lightning_core.trainer.grpo import grpo_loss, response_logps, train_grpo
from lightning_core.trainer.policy_model import load_policy_model, seed_everything
from tests.tiny_llama import build_tiny_llama, make_triplets

CPU = torch.device("cpu")
SHIFT = 0.3  # the behaviour policy gave every sampled token this much less log-probability than the policy now


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return build_tiny_llama(tmp_path_factory.mktemp("tiny") / "model")


def lora_model(tiny_dir):
    seed_everything(0)
    model = load_policy_model(tiny_dir, finetune="lora", device=CPU, bf16=False, lora_r=8, lora_alpha=16,
                              lora_dropout=0.0, lora_target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
    for name, p in model.named_parameters():  # a policy that has moved away from the base model
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.1)
    return model


def stale_samples(model, *, shift: float = SHIFT):
    """Samples whose recorded (behaviour) logprobs are the current policy's minus ``shift``."""
    rows = make_triplets(groups=2, per_group=4, rewarded=0, seed=11)
    samples, _ = make_samples(rows, max_prompt_length=64, max_response_length=64, use_recorded_logprobs=False)
    batch = collate(samples, weights=loss_weights(samples, normalization="token"), pad_token_id=0, device=CPU)
    with torch.no_grad():
        now, _ = response_logps(model, batch)
    for i, s in enumerate(samples):
        s.logprobs = (now[i, : len(s.response_ids)] - shift).tolist()
    return samples


def one_step(model, samples, **kw):
    steps = plan_steps(samples, tokens_per_step=10_000, micro_batch_size=8, normalization="token", seed=0)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.0)  # measure, do not move
    return train_grpo(model, steps, optimizer=opt, epsilon_low=0.2, epsilon_high=0.2, beta=0.0, max_grad_norm=1.0,
                      device=CPU, **kw)[0]


def test_the_ratio_is_against_the_recorded_behaviour_logprobs_and_clips_stale_tokens(tiny_dir):
    model = lora_model(tiny_dir)
    metrics = one_step(model, stale_samples(model))
    assert metrics["ratio/mean"] == pytest.approx(math.exp(SHIFT), rel=1e-4)  # pi_now / pi_behaviour, not 1
    # e^0.3 = 1.35 > 1 + epsilon: every token of a positive advantage is clipped (zero gradient), negative ones not
    assert 0.2 < metrics["clip_ratio"] < 0.8


def test_the_decoupled_objective_clips_against_the_proximal_policy_and_weights_by_the_truncated_behaviour_ratio(tiny_dir):
    model = lora_model(tiny_dir)
    samples = stale_samples(model)
    metrics = one_step(model, samples, behaviour_correction="decoupled", importance_cap=2.0)
    assert metrics["ratio/mean"] == pytest.approx(1.0, abs=1e-6) and metrics["clip_ratio"] == 0.0
    assert metrics["behaviour_weight/mean"] == pytest.approx(math.exp(SHIFT), rel=1e-4)
    assert metrics["behaviour_weight/capped"] == 0.0
    capped = one_step(model, samples, behaviour_correction="decoupled", importance_cap=1.2)
    assert capped["behaviour_weight/mean"] == pytest.approx(1.2) and capped["behaviour_weight/capped"] == 1.0

    # the loss written out: -min(pi_prox / pi_behaviour, cap) * A per token, summed with the token weights
    batch = collate(samples, weights=loss_weights(samples, normalization="token"), pad_token_id=0, device=CPU)
    logps, _ = response_logps(model, batch)
    loss, _ = grpo_loss(logps=logps, old_logps=batch["old_logps"], advantages=batch["advantages"],
                        mask=batch["response_mask"], weights=batch["weights"], epsilon_low=0.2, epsilon_high=0.2,
                        prox_logps=logps.detach(), importance_cap=1.2)
    expected = -(1.2 * batch["advantages"].unsqueeze(1) * batch["response_mask"] * batch["weights"].unsqueeze(1)).sum()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5, abs=1e-7)
    loss.backward()  # the gradient is the weighted policy gradient: d ratio = d logp at ratio 1
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters() if p.requires_grad)
    with pytest.raises(ValueError, match="behaviour_correction must be one of"):
        one_step(model, samples, behaviour_correction="vtrace")


# log pi_now - log pi_behaviour of the k-th token of the i-th response is SHIFTS[(i + k) % 6], each away from every bound below: the ppo
# clip at 1 -/+ 0.2 (log 0.8 = -0.223, log 1.2 = 0.182) and the cap 1.5 (log 1.5 = 0.405)
SHIFTS = (-0.3, -0.05, 0.0, 0.1, 0.3, 0.8)


def test_decoupled_steps_report_the_capped_behaviour_weight_and_what_ppo_would_have_clipped(tiny_dir):
    """Under decoupled the first pass's ratio is 1 by construction (the proximal logprobs are the current ones), so
    what it clipped says nothing; the step reports what matters instead, computed here token by token."""
    model = lora_model(tiny_dir)
    samples = stale_samples(model, shift=0.0)
    for i, s in enumerate(samples):
        s.logprobs = [lp - SHIFTS[(i + k) % len(SHIFTS)] for k, lp in enumerate(s.logprobs)]
    cap, eps = 1.5, 0.2
    tokens = [(math.exp(SHIFTS[(i + k) % len(SHIFTS)]), s.advantage)
              for i, s in enumerate(samples) for k in range(len(s.response_ids))]
    assert {a > 0 for _, a in tokens} == {True, False}  # both signs of advantage, so both sides of the clip count
    ppo_clipped = sum((w > 1 + eps and a > 0) or (w < 1 - eps and a < 0) for w, a in tokens) / len(tokens)
    capped = sum(w >= cap for w, _ in tokens) / len(tokens)
    weight_mean = sum(min(w, cap) for w, _ in tokens) / len(tokens)
    assert 0 < ppo_clipped < 1 and 0 < capped < 1

    decoupled = one_step(model, samples, behaviour_correction="decoupled", importance_cap=cap)
    assert decoupled["clip_ratio"] == 0.0 and "clip_ratio/first_micro_batch" not in decoupled  # 0 by construction
    assert decoupled["behaviour_weight/capped"] == pytest.approx(capped)
    assert decoupled["behaviour_weight/mean"] == pytest.approx(weight_mean, rel=1e-5)
    assert decoupled["clip_ratio/ppo_equivalent"] == pytest.approx(ppo_clipped)
    # under ppo the same share is what it did clip
    ppo = one_step(model, samples, behaviour_correction="ppo", importance_cap=cap)
    assert ppo["clip_ratio"] == ppo["clip_ratio/first_micro_batch"] == pytest.approx(ppo_clipped)
    assert ppo["clip_ratio/ppo_equivalent"] == pytest.approx(ppo_clipped) and "behaviour_weight/capped" not in ppo


def test_the_epochs_table_and_the_end_of_run_line_show_the_capped_weight_and_what_ppo_would_have_clipped(tmp_path):
    """Each epoch's first-step figures, as the train task hands them on, reach the catalog and the line that ends
    ``arclight train``; an epoch from before (decoupled, its clipped_first a 0.0 by construction) shows no share."""
    from io import StringIO

    from rich.console import Console

    from lightning_core.cli.progress import _print_correction
    from lightning_core.epoch import bookkeeping as ep
    from lightning_core.epoch import reports
    from lightning_core.epoch.context import RunContext
    from tests.conftest import make_config

    ctx = RunContext.of(make_config(tmp_path))
    ctx.catalog.ensure()
    gap = {"logprob_gap/epoch_start_mean": 0.0144, "logprob_gap/epoch_start_max": 0.056}
    decoupled = {**gap, "behaviour_correction": "decoupled", "clip_ratio/epoch_start": math.nan,
                 "clip_ratio/epoch_start_ppo_equivalent": 0.24, "behaviour_weight/epoch_start_capped": 0.31,
                 "behaviour_weight/epoch_start_mean": 0.996}
    ppo = {**gap, "behaviour_correction": "ppo", "clip_ratio/epoch_start": 0.12,
           "clip_ratio/epoch_start_ppo_equivalent": 0.125}
    before = {"logprob_gap_mean": 0.0144, "logprob_gap_max": 0.056, "clipped_first": 0.0,
              "behaviour_correction": "decoupled"}  # a lake written before the ppo-equivalent existed
    for epoch, columns in enumerate([before, reports.epoch_start_columns([decoupled]),
                                     reports.epoch_start_columns([ppo])]):
        ep.set_epoch_status(ctx.catalog, run_id=ctx.run_id, epoch=epoch, status="trained", **columns)
    rows = reports.summary_rows(ctx)
    assert [(r["clipped_first"], r["ppo_clipped_first"], r["behaviour_capped_first"], r["behaviour_weight_first"])
            for r in rows] == [(0.0, None, None, None), (None, 0.24, 0.31, 0.996), (0.12, 0.125, None, None)]

    out = StringIO()
    _print_correction(rows, console=Console(file=out, width=400))
    line = out.getvalue()
    assert "behaviour correction decoupled, ppo" in line, line
    assert "ppo clipped at the first micro-batch: 12.0%" in line, line  # not 0.0-12.0%: the 0.0 measured nothing
    assert "behaviour weight at importance_cap: 31.0% of tokens (mean 0.996); ppo would have clipped 24.0%" in line, line


def test_groups_sampled_more_than_max_staleness_versions_ago_are_left_out_whole_and_steps_report_staleness(tiny_dir):
    rows = make_triplets(groups=4, per_group=2, rewarded=0, seed=3)
    versions = {"g0": 3, "g1": 2, "g2": None, "g3": 1}  # trained from version 3
    for row in rows:
        row["policy_version"] = versions[row["group_id"]]
    rows[-1]["policy_version"] = 3  # one fresh member does not save a group with a stale one (g3)
    kept, counts = within_staleness(rows, trained_from=3, max_staleness=1)
    assert sorted({r["group_id"] for r in kept}) == ["g0", "g1", "g2"]
    assert counts == {"staleness_dropped_groups": 1, "staleness_dropped_triplets": 2, "staleness_unknown": 2}
    assert within_staleness(rows, trained_from=3, max_staleness=2)[1]["staleness_dropped_groups"] == 0
    synchronous, _ = within_staleness(rows, trained_from=3, max_staleness=0)
    assert sorted({r["group_id"] for r in synchronous}) == ["g0", "g2"]

    samples, _ = make_samples(kept, max_prompt_length=64, max_response_length=64, use_recorded_logprobs=True,
                              trained_from=3)
    assert sorted({(s.group_id, s.staleness) for s in samples}) == [("g0", 0), ("g1", 1), ("g2", 0)]
    metrics = one_step(lora_model(tiny_dir), samples)
    assert metrics["staleness/max"] == 1.0 and metrics["staleness/mean"] == pytest.approx(2 / 6)


def test_the_behaviour_correction_is_decoupled_unless_chosen(tmp_path):
    from lightning_core.config import load_config
    from lightning_core.trainer.train import behaviour_correction

    def used(*overrides):
        cfg = load_config(None, overrides=[f"project_dir={tmp_path}", "serving.dtype=float32", "trainer.device=cpu",
                                           *overrides])
        return behaviour_correction(cfg, cfg.trainer_for(cfg.policies[0].name))[0]

    assert used() == "decoupled"  # synchronous epochs, vLLM and the trainer both in fp32 on a CPU: decoupled too
    assert used("trainer.behaviour_correction=ppo") == "ppo"
    assert used("trainer.max_staleness=1") == "decoupled"
    assert used("trainer.max_staleness=1", "trainer.behaviour_correction=ppo") == "ppo"
    assert used("trainer.behaviour_correction=decoupled") == "decoupled"
