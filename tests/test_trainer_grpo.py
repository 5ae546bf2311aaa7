"""The GRPO step on a tiny Llama: loss/ratio against trl's formula, a real learning signal, safety."""

from __future__ import annotations

import math

import pytest
import torch

from lightning_core.trainer.batches import collate, epoch_stats, loss_weights, make_samples, plan_steps
from lightning_core.trainer.grpo import grpo_loss, response_logps, train_grpo
from lightning_core.trainer.policy_model import load_policy_model, seed_everything
from tests.tiny_llama import build_tiny_llama, make_triplets

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return build_tiny_llama(tmp_path_factory.mktemp("tiny") / "model")


def lora_model(tiny_dir, *, seed=0, r=8):
    seed_everything(seed)
    return load_policy_model(tiny_dir, finetune="lora", device=CPU, bf16=False, lora_r=r, lora_alpha=2 * r,
                             lora_dropout=0.0, lora_target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])


def samples_of(rows, **kw):
    samples, _ = make_samples(rows, max_prompt_length=64, max_response_length=64, use_recorded_logprobs=True, **kw)
    return samples


def plain_sequence_logps(model, prompt, response):
    """Log-probs of ``response`` after ``prompt``: one unpadded sequence, full logits, log_softmax + gather."""
    ids = torch.tensor([prompt + response])
    logits = model(input_ids=ids).logits[0]
    logp = torch.log_softmax(logits.float(), dim=-1)
    return torch.stack([logp[len(prompt) - 1 + t, tok] for t, tok in enumerate(response)])


def test_loss_and_ratio_match_trls_grpo_formula_written_out(tiny_dir):
    seed_everything(1)
    model = load_policy_model(tiny_dir, finetune="full", device=CPU, bf16=False, lora_r=1, lora_alpha=1,
                              lora_dropout=0.0, lora_target_modules=[])
    rows = make_triplets(groups=2, per_group=3, rewarded=1, seed=3)
    for i, row in enumerate(rows):  # unequal lengths and recorded logprobs off the current policy
        row["prompt_token_ids"] = row["prompt_token_ids"][: 3 + i % 4]
        row["response_token_ids"] = row["response_token_ids"][: 2 + i % 4]
        row["response_logprobs"] = None if i == 2 else [-4.3 + 0.2 * ((i + k) % 5) for k in range(len(row["response_token_ids"]))]
    samples = samples_of(rows)
    eps_low, eps_high, beta = 0.2, 0.28, 0.04
    ref = {s.row: [-4.1 - 0.05 * k for k in range(len(s.response_ids))] for s in samples}

    # The straightforward computation: trl GRPOTrainer._compute_loss, loss_type="grpo" (mean over tokens of a
    # sequence, then over sequences) and "bnpo" (mean over all tokens), one sequence at a time.
    per_seq, all_tokens, ratios, clipped = [], [], [], 0
    for s in samples:
        logp = plain_sequence_logps(model, s.prompt_ids, s.response_ids)
        old = torch.tensor(s.logprobs) if s.logprobs is not None else logp.detach()
        ref_logp = torch.tensor(ref[s.row])
        coef_1 = torch.exp(logp - old)
        coef_2 = torch.clamp(coef_1, 1 - eps_low, 1 + eps_high)
        per_token_kl = torch.exp(ref_logp - logp) - (ref_logp - logp) - 1
        per_token_loss = -torch.min(coef_1 * s.advantage, coef_2 * s.advantage) + beta * per_token_kl
        per_seq.append(per_token_loss.mean())
        all_tokens.append(per_token_loss)
        ratios.append(coef_1.detach())
        clipped += int((((coef_1 < 1 - eps_low) & (s.advantage < 0)) | ((coef_1 > 1 + eps_high) & (s.advantage > 0))).sum())
    expected = {"sequence": torch.stack(per_seq).mean(), "token": torch.cat(all_tokens).mean()}
    expected_ratio = torch.cat(ratios).mean().item()
    assert 0 < clipped < sum(len(s.response_ids) for s in samples)  # the batch exercises the clip

    for normalization in ("sequence", "token"):
        model.zero_grad()
        expected[normalization].backward(retain_graph=True)
        expected_grad = model.model.layers[0].self_attn.q_proj.weight.grad.clone()
        model.zero_grad()
        batch = collate(samples, weights=loss_weights(samples, normalization=normalization), pad_token_id=0, device=CPU)
        ref_padded = torch.zeros_like(batch["old_logps"])
        for i, s in enumerate(samples):
            ref_padded[i, : len(s.response_ids)] = torch.tensor(ref[s.row])
        logps, _ = response_logps(model, batch)
        loss, stats = grpo_loss(logps=logps, old_logps=batch["old_logps"], advantages=batch["advantages"],
                                mask=batch["response_mask"], weights=batch["weights"], epsilon_low=eps_low,
                                epsilon_high=eps_high, beta=beta, ref_logps=ref_padded)
        loss.backward()
        grad = model.model.layers[0].self_attn.q_proj.weight.grad
        assert loss.item() == pytest.approx(expected[normalization].item(), rel=1e-5, abs=1e-6)
        assert (stats["ratio_sum"] / stats["tokens"]).item() == pytest.approx(expected_ratio, rel=1e-5)
        assert stats["clipped_sum"].item() == clipped
        torch.testing.assert_close(grad, expected_grad, rtol=1e-4, atol=1e-7)


def test_rollout_normalisation_gives_each_rollout_equal_weight():
    rows = make_triplets(groups=1, per_group=2, rewarded=0, turns=1)
    rows += make_triplets(groups=1, per_group=2, rewarded=0, turns=3, seed=5)
    for r in rows[2:]:
        r["rollout_id"] = "long-" + r["rollout_id"]
    samples = samples_of(rows)
    w = loss_weights(samples, normalization="rollout")
    per_rollout = {}
    for s in samples:
        per_rollout[s.rollout_id] = per_rollout.get(s.rollout_id, 0.0) + w[s.row] * len(s.response_ids)
    assert len(per_rollout) == 4
    assert all(v == pytest.approx(0.25) for v in per_rollout.values())
    token_w = loss_weights(samples, normalization="token")
    assert sum(token_w[s.row] * len(s.response_ids) for s in samples) == pytest.approx(1.0)
    assert len({round(v, 12) for v in token_w.values()}) == 1


def test_logprobs_do_not_depend_on_padding_or_batch_neighbours(tiny_dir):
    model = lora_model(tiny_dir)
    rows = make_triplets(groups=1, per_group=3, rewarded=0)
    rows[0]["prompt_token_ids"] = rows[0]["prompt_token_ids"][:2]
    rows[1]["response_token_ids"] = rows[1]["response_token_ids"][:2]
    samples = samples_of(rows)
    w = loss_weights(samples, normalization="token")
    with torch.no_grad():
        together, _ = response_logps(model, collate(samples, weights=w, pad_token_id=0, device=CPU))
        for i, s in enumerate(samples):
            alone, _ = response_logps(model, collate([s], weights=w, pad_token_id=0, device=CPU))
            plain = plain_sequence_logps(model, s.prompt_ids, s.response_ids)
            torch.testing.assert_close(together[i, : len(s.response_ids)], alone[0], rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(alone[0], plain, rtol=1e-5, atol=1e-5)


def test_rewarded_response_gains_logprob_over_the_others_after_a_few_steps(tiny_dir):
    model = lora_model(tiny_dir)
    rows = make_triplets(groups=4, per_group=4, rewarded=0, seed=7)
    samples = samples_of(rows)
    steps = plan_steps(samples, tokens_per_step=10_000, micro_batch_size=8, normalization="token", seed=0)
    assert len(steps) == 1 and len(steps[0].micro_batches) == 2

    def margins():
        with torch.no_grad():
            batch = collate(samples, weights=steps[0].weights, pad_token_id=0, device=CPU)
            logps, _ = response_logps(model, batch)
            seq = (logps * batch["response_mask"]).sum(1)
        by_group = {}
        for s, lp in zip(samples, seq.tolist()):
            by_group.setdefault(s.group_id, {})[s.rollout_id] = lp
        return {g: v[f"{g}-s0"] - sum(x for k, x in v.items() if k != f"{g}-s0") / 3 for g, v in by_group.items()}

    before = margins()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-2)
    history = []
    for _ in range(10):  # ten on-policy iterations (no recorded logprobs: ratio 1, nothing clipped)
        history += train_grpo(model, steps, optimizer=opt, epsilon_low=0.2, epsilon_high=0.2, beta=0.0,
                              max_grad_norm=1.0, device=CPU)
    after = margins()
    assert len(history) == 10 and not any(h["skipped"] for h in history)
    gains = {g: after[g] - before[g] for g in before}
    assert all(gain > 0.75 for gain in gains.values()), gains  # nats of sequence logprob, in every group
    assert sum(gains.values()) / len(gains) > 1.0, gains
    assert all(h["clip_ratio"] == 0.0 and h["ratio/mean"] == pytest.approx(1.0) for h in history)
    assert all(math.isfinite(h["grad_norm"]) and h["entropy"] > 0 for h in history)


def test_later_passes_are_clipped_against_the_first_pass(tiny_dir):
    model = lora_model(tiny_dir)
    samples = samples_of(make_triplets(groups=2, per_group=4, rewarded=0, seed=7))
    steps = plan_steps(samples, tokens_per_step=10_000, micro_batch_size=8, normalization="token", seed=0)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-2)
    history = train_grpo(model, steps, optimizer=opt, epsilon_low=0.2, epsilon_high=0.2, beta=0.0, max_grad_norm=1.0,
                         device=CPU, passes=4)
    assert history[0]["clip_ratio"] == 0.0
    assert history[-1]["clip_ratio"] > 0.0 and history[-1]["ratio/mean"] != pytest.approx(1.0)


def test_kl_to_reference_is_zero_at_start_and_grows_with_training(tiny_dir):
    from lightning_core.trainer.policy_model import reference_logps_fn

    model = lora_model(tiny_dir)
    for name, p in model.named_parameters():  # peft inits lora_B to zero: start exactly at the reference
        if "lora_B" in name:
            assert torch.all(p == 0)
    samples = samples_of(make_triplets(groups=2, per_group=4, rewarded=0))
    steps = plan_steps(samples, tokens_per_step=10_000, micro_batch_size=8, normalization="sequence", seed=0)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ref = reference_logps_fn(model, base_model_dir=tiny_dir, finetune="lora", device=CPU)
    history = train_grpo(model, steps, optimizer=opt, epsilon_low=0.2, epsilon_high=0.2, beta=0.1,
                         max_grad_norm=1.0, device=CPU, reference=ref, passes=4)
    assert history[0]["kl"] == pytest.approx(0.0, abs=1e-9)
    assert history[-1]["kl"] > 1e-4


def test_non_finite_loss_skips_the_step_and_leaves_weights_unchanged(tiny_dir):
    model = lora_model(tiny_dir)
    samples = samples_of(make_triplets(groups=2, per_group=2, rewarded=0))
    steps = plan_steps(samples, tokens_per_step=30, micro_batch_size=2, normalization="token", seed=0)
    assert len(steps) >= 2
    calls = {"n": 0}

    def poison_first_call(module, args, output):
        calls["n"] += 1
        return output * float("nan") if calls["n"] == 1 else output

    hook = model.base_model.model.model.norm.register_forward_hook(poison_first_call)
    trainable = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    snapshots = []
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    history = train_grpo(model, steps[:2], optimizer=opt, epsilon_low=0.2, epsilon_high=0.2, beta=0.0,
                         max_grad_norm=1.0, device=CPU,
                         on_step=lambda i, m: snapshots.append({n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}))
    hook.remove()
    assert [h["skipped"] for h in history] == [1.0, 0.0]
    assert math.isnan(history[0]["loss"]) and math.isfinite(history[1]["loss"])
    assert all(torch.equal(snapshots[0][n], trainable[n]) for n in trainable)
    assert any(not torch.equal(snapshots[1][n], trainable[n]) for n in trainable)


def test_samples_and_epoch_stats_count_what_cannot_train():
    rows = make_triplets(groups=3, per_group=2, rewarded=0, logprobs=True)
    for r in rows[2:4]:  # group g1: equal rewards
        r["reward"], r["advantage"] = 0.0, 0.0
    rows[4]["response_token_ids"] = []
    rows[5]["response_logprobs"] = [-1.0]  # wrong length: treated as not recorded
    stats = epoch_stats(rows, success_reward=1.0)
    assert stats["reward/mean"] == pytest.approx(2 / 6)
    assert stats["success_rate"] == pytest.approx(2 / 6)
    assert stats["zero_adv_groups"] == 1 and stats["groups"] == 3 and stats["triplets"] == 6
    samples, counts = make_samples(rows, max_prompt_length=4, max_response_length=3, use_recorded_logprobs=True)
    assert [s.row for s in samples] == [0, 1, 5]
    assert counts["dropped_zero_advantage"] == 2 and counts["dropped_no_tokens"] == 1
    assert counts["logprobs_mismatched"] == 1 and counts["truncated_prompt"] == 3
    assert samples[0].prompt_ids == rows[0]["prompt_token_ids"][-4:]
    assert samples[0].logprobs == rows[0]["response_logprobs"][:3] and samples[2].logprobs is None


def test_steps_are_balanced_not_a_full_step_and_a_remainder():
    samples = samples_of(make_triplets(groups=4, per_group=5, rewarded=0))
    per = [s.tokens for s in samples]
    budget = sum(per) * 9 // 10  # two steps; cutting at the budget would give 90% and 10% of the data
    steps = plan_steps(samples, tokens_per_step=budget, micro_batch_size=4, normalization="token", seed=0)
    sizes = [sum(s.tokens for mb in st.micro_batches for s in mb) for st in steps]
    assert len(steps) == 2 and sum(sizes) == sum(per)
    assert abs(sizes[0] - sizes[1]) <= max(per)
    few = plan_steps(samples, tokens_per_step=sum(per) // 3 + 1, micro_batch_size=4, normalization="token", seed=0)
    sizes = [sum(s.tokens for mb in st.micro_batches for s in mb) for st in few]
    assert len(few) == 3 and max(sizes) - min(sizes) <= max(per)
