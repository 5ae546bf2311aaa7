"""Data-parallel GRPO over torch.distributed (gloo, 2 CPU processes) takes exactly the single-process step."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from lightning_core.config import load_config
from lightning_core.trainer.train import train_policy
from lightning_core.trainer.batches import make_samples, plan_steps
from lightning_core.trainer.collectives import shard
from lightning_core.trainer.grpo import train_grpo
from lightning_core.trainer.policy_model import load_policy_model, reference_logps_fn, seed_everything
from lightning_core.trainer.prefix_tree import plain_size
from lightning_core.common.services import free_port
from tests.tiny_llama import build_tiny_llama, make_triplets, triplet_table

CPU = torch.device("cpu")
WORLD = 2
# Each case is one optimizer step: (loss normalisation, shared-prefix forward, micro_batch_size, beta).
CASES = [
    ("token", "off", 2, 0.0),     # 9 samples in 5 micro-batches: 3 on one rank, 2 on the other
    ("sequence", "off", 4, 0.04),  # 3 micro-batches (4, 4, 1 samples) and the KL term through the adapter-off reference
    ("rollout", "on", 2, 0.0),    # packed prefix trees, one per group: 3 micro-batches
    ("token", "off", 16, 0.0),    # a single micro-batch: the second rank has nothing and still joins the sum
]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return build_tiny_llama(tmp_path_factory.mktemp("tiny") / "model")


def step_rows():
    rows = make_triplets(groups=3, per_group=3, rewarded=1, seed=5, logprobs=True)
    for i, row in enumerate(rows):  # unequal lengths, so the normalisations differ; some off-policy logprobs
        row["response_token_ids"] = row["response_token_ids"][: 2 + i % 4]
        row["response_logprobs"] = None if i % 3 == 0 else [-4.0 + 0.3 * ((i + k) % 4) for k in range(len(row["response_token_ids"]))]
        row["prompt_token_ids"] = row["prompt_token_ids"] + [3 + i % 2] * (i % 3)
    samples, _ = make_samples(rows, max_prompt_length=64, max_response_length=64, use_recorded_logprobs=True)
    return samples


def case_steps(normalization, shared_prefix, micro_batch_size):
    return plan_steps(step_rows(), tokens_per_step=10_000, micro_batch_size=micro_batch_size,
                      normalization=normalization, seed=0, shared_prefix=shared_prefix, micro_batch_tokens=20)


def one_step_gradients(tiny_dir: Path, steps, *, beta: float) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """Run ``train_grpo`` for one step with a zero learning rate; return the gradients it applied and its metrics."""
    seed_everything(0)
    model = load_policy_model(tiny_dir, finetune="lora", device=CPU, bf16=False, lora_r=4, lora_alpha=8,
                              lora_dropout=0.0, lora_target_modules=["q_proj", "v_proj"])
    gen = torch.Generator().manual_seed(1)
    for name, p in model.named_parameters():  # LoRA B starts at zero, which makes A's gradient zero: move off it
        if p.requires_grad:
            p.data = torch.randn(p.shape, generator=gen) * 0.2
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    reference = reference_logps_fn(model, base_model_dir=tiny_dir, finetune="lora", device=CPU) if beta else None
    [metrics] = train_grpo(model, steps, optimizer=torch.optim.SGD(list(params.values()), lr=0.0), epsilon_low=0.2,
                           epsilon_high=0.2, beta=beta, max_grad_norm=1e9, device=CPU, reference=reference)
    return {n: p.grad.detach().clone() for n, p in params.items()}, metrics


def _rank(rank: int, world_size: int, port: int, tiny_dir: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    try:
        results = []
        for normalization, shared_prefix, micro_batch_size, beta in CASES:
            steps = case_steps(normalization, shared_prefix, micro_batch_size)
            grads, metrics = one_step_gradients(Path(tiny_dir), steps, beta=beta)
            results.append({"metrics": metrics, "grads": grads})
        torch.save(results, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def relative_error(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    num = math.sqrt(sum(float((a[n] - b[n]).double().pow(2).sum()) for n in b))
    den = math.sqrt(sum(float(b[n].double().pow(2).sum()) for n in b))
    return num / den


def test_two_gloo_ranks_give_the_single_process_lora_gradients_with_an_uneven_split(tiny_dir, tmp_path):
    torch.multiprocessing.start_processes(_rank, args=(WORLD, free_port(), str(tiny_dir), str(tmp_path)), nprocs=WORLD,
                                          join=True, start_method="spawn")
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]
    for i, (normalization, shared_prefix, micro_batch_size, beta) in enumerate(CASES):
        steps = case_steps(normalization, shared_prefix, micro_batch_size)
        assert len(steps) == 1 and steps[0].shared_prefix == (shared_prefix == "on")
        expected, alone = one_step_gradients(tiny_dir, steps, beta=beta)
        micro = steps[0].micro_batches
        assert alone["world_size"] == 1 and alone["micro_batches/rank"] == alone["micro_batches"] == len(micro)
        # what each rank ran, as the trainer counted it: its own share, not the whole step (which sums alike)
        seen = [ranks[r][i]["metrics"] for r in range(WORLD)]
        assert [m["world_size"] for m in seen] == [WORLD] * WORLD, f"case {CASES[i]}: the world size each rank saw"
        counts = [int(m["micro_batches/rank"]) for m in seen]
        shares = [shard(micro, rank=r, world_size=WORLD, shared_prefix=steps[0].shared_prefix) for r in range(WORLD)]
        assert counts == [len(s) for s in shares], f"case {CASES[i]}: ranks ran {counts} of {len(micro)} micro-batches"
        assert sum(counts) == len(micro) and counts[0] != counts[1], counts  # uneven on purpose
        assert all(m["micro_batches"] == len(micro) for m in seen)  # the step's count, summed over the ranks
        assert sum(len(mb) for s in shares for mb in s) == 9
        assert all(float(g.abs().sum()) > 0 for g in expected.values())  # every LoRA matrix gets a gradient
        for r in range(WORLD):
            err = relative_error(ranks[r][i]["grads"], expected)
            assert err < 1e-4, f"case {CASES[i]} rank {r}: relative gradient error {err:.2e}"


def test_shard_gives_each_micro_batch_to_exactly_one_rank_balancing_tokens():
    samples = step_rows()
    micro = [samples[i:i + 2] for i in range(0, len(samples), 2)]
    shares = [shard(micro, rank=r, world_size=3) for r in range(3)]
    assert sorted(id(mb) for s in shares for mb in s) == sorted(id(mb) for mb in micro)
    loads = [sum(plain_size(mb) for mb in s) for s in shares]
    assert max(loads) - min(loads) <= max(plain_size(mb) for mb in micro)  # no rank waits a whole micro-batch longer
    assert sorted(len(s) for s in shares) == [1, 2, 2]
    assert shares == [shard(micro, rank=r, world_size=3) for r in range(3)]  # every rank computes the same split
    assert shard(micro[:1], rank=1, world_size=2) == []  # fewer micro-batches than ranks: a rank may get none
    with pytest.raises(ValueError, match=r"rank \(2\) must be in \[0, world_size=2\)"):
        shard(micro, rank=2, world_size=2)


def test_train_policy_on_two_processes_saves_the_single_process_adapter(tmp_path, tiny_dir):
    from safetensors.torch import load_file

    rows = triplet_table(make_triplets(groups=3, per_group=4, rewarded=1, seed=2, epoch=0))
    saved = {}
    for processes in (1, 2):
        cfg = load_config(None, overrides=[
            f"project_dir={tmp_path / str(processes)}", "name=calc", "trainer.micro_batch_size=3",
            "trainer.tokens_per_step=80", "trainer.learning_rate=0.02", "trainer.lora_r=4", "trainer.lora_alpha=8",
            "trainer.log_samples=0", "trainer.shared_prefix=off", f"trainer.processes={processes}"])
        result = train_policy(cfg, rows, policy="default", base_model_dir=tiny_dir, run_id="r1", epoch=0)
        assert result.version == "default-v1" and result.metrics["optimizer_steps"] >= 2
        saved[processes] = (load_file(str(result.path / "adapter_model.safetensors")), result.steps,
                            torch.load(result.path / "optimizer.pt", weights_only=True))
    (one, steps_one, opt_one), (two, steps_two, opt_two) = saved[1], saved[2]
    assert set(one) == set(two)
    assert relative_error(two, one) < 1e-4
    moved = {n for n in one if n.endswith("lora_B.weight") and float(one[n].abs().sum()) > 0}
    assert moved  # the steps changed the adapter (LoRA B starts at zero)
    assert len(steps_one) == len(steps_two)
    for a, b in zip(steps_one, steps_two):
        assert (a["world_size"], b["world_size"]) == (1, 2)
        assert b["micro_batches"] == a["micro_batches"] >= 2  # the step's micro-batches, summed over the ranks ...
        assert 0 < b["micro_batches/rank"] < b["micro_batches"], b  # ... of which rank 0 ran its share, not all
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-4, abs=1e-7)
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-4)
    assert opt_two["state"][0]["step"] == opt_one["state"][0]["step"]
