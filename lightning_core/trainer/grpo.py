"""The GRPO step: batch -> response logprobs -> ratio -> clipped loss (+ KL) -> metrics.

``grpo_loss`` is the loss of trl's GRPOTrainer (two-sided clip with epsilon low/high, k3 KL to the
reference) with the normalisation folded into per-sample weights (see ``batches.loss_weights``).
``train_grpo`` runs the optimizer steps: micro-batches accumulate gradients to a token budget,
gradients are clipped, and a step whose loss or gradients are not finite is skipped and reported.
Under torch.distributed each rank runs its share of a step's micro-batches and the gradients are
summed over ranks before clipping (``collectives``), so every rank takes the single-process step.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from typing import Callable

import torch

from lightning_core.trainer import collectives
from lightning_core.trainer.samples import Sample, Step
from lightning_core.trainer.batches import collate
from lightning_core.trainer.prefix_tree import PrefixTree, build_tree, scatter_rows, tree_response_logps
from lightning_core.trainer.token_logps import decoder_and_head, token_logps

log = logging.getLogger(__name__)

BEHAVIOUR_CORRECTIONS = ("ppo", "decoupled")


class TrainingStopped(Exception):
    """A GRPO run ended early because its ``should_stop`` said so; no version comes of it."""


def response_logps(model: torch.nn.Module, batch: dict[str, torch.Tensor], *, with_entropy: bool = False,
                   logits_chunk_tokens: int = 1024) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-token logprobs [B, W] (and entropy, without grad) of the response tokens; logits only for the real ones."""
    decoder, head = decoder_and_head(model)
    hidden = decoder(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                     position_ids=batch["position_ids"], use_cache=False).last_hidden_state  # [B, L, H]
    response_ids = batch["response_ids"]
    b_idx, k_idx = batch["response_mask"].bool().nonzero(as_tuple=True)
    # prompts are left-padded and responses right-padded: position L-W-1+k predicts response token k
    at = hidden.size(1) - response_ids.size(1) - 1 + k_idx
    flat, flat_entropy = token_logps(hidden[b_idx, at], response_ids[b_idx, k_idx], head=head,
                                     chunk_tokens=logits_chunk_tokens, with_entropy=with_entropy)
    return scatter_rows(flat, b_idx, k_idx, like=response_ids), (
        scatter_rows(flat_entropy, b_idx, k_idx, like=response_ids) if with_entropy else None)


def micro_batch_logps(model: torch.nn.Module, batch: dict[str, torch.Tensor], tree: PrefixTree | None, *,
                      with_entropy: bool = False, attention: str = "sdpa", logits_chunk_tokens: int = 1024,
                      ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Response logprobs of a micro-batch: one packed shared-prefix forward when ``tree`` is given, else padded."""
    if tree is not None:
        return tree_response_logps(model, tree, batch["response_ids"], with_entropy=with_entropy, attention=attention,
                                   logits_chunk_tokens=logits_chunk_tokens)
    return response_logps(model, batch, with_entropy=with_entropy, logits_chunk_tokens=logits_chunk_tokens)


def grpo_loss(
    *,
    logps: torch.Tensor,
    old_logps: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    weights: torch.Tensor,
    epsilon_low: float,
    epsilon_high: float,
    beta: float = 0.0,
    ref_logps: torch.Tensor | None = None,
    prox_logps: torch.Tensor | None = None,
    importance_cap: float = 2.0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped surrogate loss summed with per-sample token weights; NaN old logps mean on-policy.

    ``old_logps`` are the behaviour policy's (recorded when the call was sampled). Without ``prox_logps`` the
    ratio is against them (PPO, trl's loss). With ``prox_logps`` (the trainer's own logprobs before this update)
    the loss is AReaL's decoupled objective: the ratio is against the proximal policy and clipped there, and
    each token is weighted by the behaviour importance weight prox / behaviour, truncated at ``importance_cap``
    (verl's truncated importance sampling), so stale samples still correct for the policy that sampled them.
    Whatever the correction, ``ppo_clipped_sum`` counts the tokens plain PPO's ratio (against the behaviour
    logprobs) clips, and under decoupled ``behaviour_capped_sum`` those whose behaviour weight reached the cap.
    """
    behaviour = torch.where(torch.isnan(old_logps), logps.detach(), old_logps)
    if prox_logps is None:
        centre, behaviour_weight = behaviour, None
    else:
        centre = prox_logps.detach()
        behaviour_weight = torch.exp(centre - behaviour).clamp(max=importance_cap)
    ratio = torch.exp(logps - centre)
    adv = advantages.unsqueeze(1)
    clipped = torch.clamp(ratio, 1 - epsilon_low, 1 + epsilon_high)
    per_token = -torch.min(ratio * adv, clipped * adv)
    if behaviour_weight is not None:
        per_token = behaviour_weight * per_token
    kl = None
    if beta != 0.0:
        if ref_logps is None:
            raise ValueError("beta > 0 needs ref_logps (the reference model's response logprobs)")
        delta = ref_logps - logps
        kl = torch.exp(delta) - delta - 1
        per_token = per_token + beta * kl
    weight = mask * weights.unsqueeze(1)
    loss = (per_token * weight).sum()
    n = mask.sum().clamp(min=1.0)
    def clips(r: torch.Tensor) -> torch.Tensor:  # where min(r A, clip(r) A) takes the clipped term: no gradient
        return ((r < 1 - epsilon_low) & (adv < 0)) | ((r > 1 + epsilon_high) & (adv > 0))

    is_clipped = clips(ratio)
    # what plain PPO would clip here: its ratio pi_theta / pi_behaviour (under ppo the ratio above)
    ppo_clipped = is_clipped if prox_logps is None else clips(torch.exp(logps.detach() - behaviour))
    zero = torch.zeros((), device=logps.device)
    # the inference engine's logprobs against the trainer's, on the tokens it recorded them for: the gap that enters
    # a PPO ratio even on-policy (other dtype, other kernels)
    recorded = mask * (~torch.isnan(old_logps)).float()
    gap = torch.where(recorded > 0, (logps.detach() - behaviour).abs(), torch.zeros_like(logps))
    stats = {
        "ratio_sum": (ratio.detach() * mask).sum(),
        "nll_sum": -(logps.detach() * mask).sum(),
        "clipped_sum": (is_clipped.float() * mask).sum(),
        "ppo_clipped_sum": (ppo_clipped.float() * mask).sum(),
        "gap_sum": gap.sum(),
        "gap_max": gap.max() if gap.numel() else zero,
        "gap_tokens": recorded.sum(),
        "kl_sum": (kl.detach() * mask).sum() if kl is not None else zero,
        "tokens": n,
        "behaviour_weight_sum": (behaviour_weight * mask).sum() if behaviour_weight is not None else zero,
        "behaviour_capped_sum": ((behaviour_weight >= importance_cap).float() * mask).sum()
        if behaviour_weight is not None else zero,
    }
    return loss, stats


def train_grpo(
    model: torch.nn.Module,
    steps: list[Step],
    *,
    optimizer: torch.optim.Optimizer,
    epsilon_low: float,
    epsilon_high: float,
    beta: float,
    max_grad_norm: float,
    device: torch.device,
    autocast_dtype: torch.dtype | None = None,
    reference: Callable[[dict[str, torch.Tensor], PrefixTree | None], torch.Tensor] | None = None,
    pad_token_id: int = 0,
    on_step: Callable[[int, dict[str, float]], None] | None = None,
    passes: int = 1,
    max_steps: int | None = None,
    attention: str = "sdpa",
    logits_chunk_tokens: int = 1024,
    behaviour_correction: str = "ppo",
    importance_cap: float = 2.0,
    should_stop: Callable[[], bool] | None = None,
) -> list[dict[str, float]]:
    """Run the optimizer steps; return one metrics dict per step (skipped steps included).

    ``attention`` is the shared-prefix forward's kernel (``tree_attention.choose_attention``); on CUDA
    each step also reports ``peak_memory_gb``, the most GPU memory allocated during it (on CPU, nothing).
    ``behaviour_correction``: ppo (the ratio against the recorded behaviour logprobs) or decoupled (``grpo_loss``);
    every step reports the staleness of its samples (versions between the one that sampled them and the one
    trained from: ``staleness/max``, ``staleness/mean``). ``should_stop`` is asked before every micro-batch: when it
    answers True the run raises ``TrainingStopped`` and the parameters are left as the last finished step made them
    (a run stopped from another thread: Ctrl-C while an asynchronous epoch trains beside the next one's rollouts).
    """
    if behaviour_correction not in BEHAVIOUR_CORRECTIONS:
        raise ValueError(f"behaviour_correction must be one of {BEHAVIOUR_CORRECTIONS}, found {behaviour_correction!r}")
    decoupled = behaviour_correction == "decoupled"
    params = [p for p in model.parameters() if p.requires_grad]
    rank, world_size = collectives.world()
    first_pass_logps: dict[int, list[float]] = {}  # on-policy "old" logprobs, reused by later passes
    proximal_logps: dict[int, list[float]] = {}  # decoupled: every sample's logprobs before the step's first pass
    history: list[dict[str, float]] = []
    model.train()
    for step_index, step in enumerate(s for _ in range(passes) for s in steps):
        if max_steps is not None and step_index >= max_steps:
            break
        t0 = time.perf_counter()
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        optimizer.zero_grad(set_to_none=True)
        totals = {"loss": 0.0, "ratio_sum": 0.0, "nll_sum": 0.0, "clipped_sum": 0.0, "ppo_clipped_sum": 0.0,
                  "kl_sum": 0.0, "tokens": 0.0,
                  "entropy_sum": 0.0, "encoded": 0.0, "behaviour_weight_sum": 0.0, "behaviour_capped_sum": 0.0,
                  "gap_sum": 0.0, "gap_tokens": 0.0, "gap_max": 0.0, "first_clipped": math.nan, "micro_batches": 0.0}
        ran = 0  # the micro-batches this rank ran in the step (summed over ranks in totals)
        skip_reason = None
        mine = (step.micro_batches if world_size == 1 else
                collectives.shard(step.micro_batches, rank=rank, world_size=world_size, shared_prefix=step.shared_prefix))
        for micro in mine:
            if should_stop is not None and should_stop():
                optimizer.zero_grad(set_to_none=True)
                raise TrainingStopped(f"training stopped at step {step_index}: a stop was asked for")
            samples = _with_first_pass_logps(micro, first_pass_logps)
            batch = collate(samples, weights=step.weights, pad_token_id=pad_token_id, device=device)
            tree = build_tree(samples) if step.shared_prefix else None
            totals["encoded"] += tree.size if tree is not None else batch["input_ids"].numel()
            with _autocast(device, autocast_dtype):
                ref = None
                if beta != 0.0:
                    with torch.no_grad():
                        ref = reference(batch, tree).float()
                logps, entropy = micro_batch_logps(model, batch, tree, with_entropy=True, attention=attention,
                                                   logits_chunk_tokens=logits_chunk_tokens)
                logps = logps.float()
                prox = _proximal(samples, logps, proximal_logps) if decoupled else None
                loss, stats = grpo_loss(
                    logps=logps, old_logps=batch["old_logps"], advantages=batch["advantages"],
                    mask=batch["response_mask"], weights=batch["weights"], epsilon_low=epsilon_low,
                    epsilon_high=epsilon_high, beta=beta, ref_logps=ref, prox_logps=prox, importance_cap=importance_cap,
                )
            if not torch.isfinite(loss):
                skip_reason = "loss"
                break
            loss.backward()
            ran += 1
            totals["micro_batches"] += 1.0
            if passes > 1:
                _remember(samples, logps, first_pass_logps)
            totals["loss"] += loss.item()
            for key in ("ratio_sum", "nll_sum", "clipped_sum", "ppo_clipped_sum", "kl_sum", "tokens",
                        "behaviour_weight_sum", "behaviour_capped_sum", "gap_sum", "gap_tokens"):
                totals[key] += stats[key].item()
            totals["gap_max"] = max(totals["gap_max"], stats["gap_max"].item())
            if math.isnan(totals["first_clipped"]):  # the first micro-batch: what clipping drops before any update
                totals["first_clipped"] = stats["clipped_sum"].item() / max(stats["tokens"].item(), 1.0)
            totals["entropy_sum"] += (entropy.float() * batch["response_mask"]).sum().item()
        if world_size > 1:  # every rank reaches here, whatever its share, so the collectives always pair up
            gap_max, first = totals.pop("gap_max"), totals.pop("first_clipped")
            totals = collectives.all_reduce_sums({**totals, "skip": float(skip_reason is not None)}, device=device)
            totals["gap_max"] = collectives.all_reduce_max(gap_max, device=device)
            totals["first_clipped"] = first  # this rank's first micro-batch (rank 0 logs)
            if totals.pop("skip") > 0 and skip_reason is None:  # a non-finite loss on any rank skips the step everywhere
                skip_reason = "loss"
            if skip_reason is None:
                collectives.all_reduce_gradients(params)
        grad_norm = math.nan
        if skip_reason is None:
            grad_norm = torch.nn.utils.clip_grad_norm_(params, max_grad_norm).item()
            if not math.isfinite(grad_norm):
                skip_reason = "grad"
        if skip_reason is None:
            optimizer.step()
        else:
            optimizer.zero_grad(set_to_none=True)
            log.warning("step %d skipped: non-finite %s; parameters left unchanged", step_index, skip_reason)
        elapsed = time.perf_counter() - t0
        tokens = sum(s.tokens for s in step.samples)
        n = max(totals["tokens"], 1.0)
        metrics = {
            "loss": totals["loss"] if skip_reason is None else math.nan,
            "kl": totals["kl_sum"] / n,
            "clip_ratio": totals["clipped_sum"] / n,
            "clip_ratio/ppo_equivalent": totals["ppo_clipped_sum"] / n,
            "ratio/mean": totals["ratio_sum"] / n,
            "nll": totals["nll_sum"] / n,  # the responses' mean negative logprob before the step (SFT's loss)
            "logprob_gap/mean": totals["gap_sum"] / totals["gap_tokens"] if totals["gap_tokens"] else math.nan,
            "logprob_gap/max": totals["gap_max"] if totals["gap_tokens"] else math.nan,
            "entropy": totals["entropy_sum"] / n,
            "grad_norm": grad_norm,
            "tokens_per_s": tokens / elapsed,
            "step_time_s": elapsed,
            "step_tokens": float(tokens),
            "encoded_tokens": totals["encoded"],
            "shared_prefix": 1.0 if step.shared_prefix else 0.0,
            "flex_attention": 1.0 if (step.shared_prefix and attention == "flex") else 0.0,
            "step_triplets": float(len(step.samples)),
            "micro_batches": totals["micro_batches"],  # run in the step, over all ranks
            "micro_batches/rank": float(ran),  # run by this process (rank 0's is logged)
            "world_size": float(world_size),
            "skipped": 0.0 if skip_reason is None else 1.0,
            "staleness/max": float(max((s.staleness for s in step.samples), default=0)),
            "staleness/mean": sum(s.staleness for s in step.samples) / max(len(step.samples), 1),
        }
        if decoupled:  # the first pass's ratio is 1 by construction (_proximal), so nothing it clipped is reported
            metrics["behaviour_weight/mean"] = totals["behaviour_weight_sum"] / n
            metrics["behaviour_weight/capped"] = totals["behaviour_capped_sum"] / n
        else:
            metrics["clip_ratio/first_micro_batch"] = totals["first_clipped"]
        if device.type == "cuda":
            metrics["peak_memory_gb"] = torch.cuda.max_memory_allocated(device) / 2**30
        history.append(metrics)
        if on_step is not None:
            on_step(step_index, metrics)
    return history


def _with_first_pass_logps(samples: list[Sample], seen: dict[int, list[float]]) -> list[Sample]:
    """In passes after the first, samples without recorded logprobs use those of the first pass."""
    out = []
    for s in samples:
        if s.logprobs is None and s.row in seen:
            s = Sample(**{**s.__dict__, "logprobs": seen[s.row]})
        out.append(s)
    return out


def _proximal(samples: list[Sample], logps: torch.Tensor, seen: dict[int, list[float]]) -> torch.Tensor:
    """The proximal policy's logprobs [B, W]: this pass's own (detached) the first time a sample is seen, the
    first pass's afterwards (the parameters before the epoch's updates, as trl's old logprobs)."""
    prox = logps.detach().clone()
    for i, s in enumerate(samples):
        if s.row in seen:
            prox[i, : len(s.response_ids)] = torch.tensor(seen[s.row], dtype=prox.dtype, device=prox.device)
        else:
            seen[s.row] = prox[i, : len(s.response_ids)].float().cpu().tolist()
    return prox


def _remember(samples: list[Sample], logps: torch.Tensor, seen: dict[int, list[float]]) -> None:
    for i, s in enumerate(samples):
        if s.logprobs is None and s.row not in seen:
            seen[s.row] = logps[i, : len(s.response_ids)].detach().float().cpu().tolist()


def _autocast(device: torch.device, dtype: torch.dtype | None):
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)
