"""torch.distributed collectives of a data-parallel GRPO step: this rank's share of the micro-batches, gradients summed
across ranks in buckets, metric sums, parameters broadcast from rank 0. One process (no group) passes through.

Every rank plans the same steps from the same samples (same seed), takes its share of each step's
micro-batches, accumulates their gradients, and the gradients are summed over ranks once per
step. The loss weights of a step are already normalised by the whole step's token, sequence or
rollout count (``batches.loss_weights``), so the sum over ranks is exactly the single-process
gradient, however unevenly the micro-batches fall (a rank may get none).

The sum is one bucketed ``all_reduce`` per step rather than a ``DistributedDataParallel`` wrapper:
DDP synchronises inside the backward of each forward it wraps, so uneven micro-batch counts and
ranks with nothing to do would need dummy forwards, and its wrapper hides the PEFT model's
``config`` and ``disable_adapter`` that the step and the KL reference use. Communication is the
same: one reduce of the gradients per optimizer step.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.distributed as dist

from lightning_core.trainer.prefix_tree import plain_size, tree_size


# Elements per all-reduce bucket (fp32: 100 MB): few calls for an adapter, bounded memory for full weights.
BUCKET_ELEMENTS = 25_000_000


def world() -> tuple[int, int]:
    """This process's (rank, world size); (0, 1) when no process group is initialised."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def shard(micro_batches: Sequence[list[Any]], *, rank: int, world_size: int, shared_prefix: bool = False) -> list[list[Any]]:
    """This rank's micro-batches of a step: largest first to the least-loaded rank, then in step order.

    A pure function of the step, so every rank computes the same assignment without talking. The
    load of a micro-batch is the tokens its forward encodes (its prefix tree, or its padded batch).
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"rank ({rank}) must be in [0, world_size={world_size})")
    cost = [tree_size(mb) if shared_prefix else plain_size(mb) for mb in micro_batches]
    load = [0] * world_size
    owner = [0] * len(micro_batches)
    for i in sorted(range(len(micro_batches)), key=lambda i: (-cost[i], i)):
        r = min(range(world_size), key=lambda r: (load[r], r))
        owner[i] = r
        load[r] += cost[i]
    return [mb for i, mb in enumerate(micro_batches) if owner[i] == rank]


def all_reduce_gradients(params: Sequence[torch.nn.Parameter]) -> None:
    """Sum the gradients of ``params`` over all ranks, in place (a missing gradient counts as zero)."""
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    bucket: list[torch.nn.Parameter] = []
    size = 0
    for p in params:
        bucket.append(p)
        size += p.numel()
        if size >= BUCKET_ELEMENTS:
            _reduce_bucket(bucket)
            bucket, size = [], 0
    if bucket:
        _reduce_bucket(bucket)


def _reduce_bucket(bucket: list[torch.nn.Parameter]) -> None:
    flat = torch.cat([p.grad.reshape(-1) for p in bucket])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    offset = 0
    for p in bucket:
        n = p.numel()
        p.grad.copy_(flat[offset:offset + n].view_as(p.grad))
        offset += n


def all_reduce_sums(values: dict[str, float], *, device: torch.device) -> dict[str, float]:
    """Sum per-rank scalars (loss, token counts, skip flags) over all ranks."""
    keys = sorted(values)
    t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return dict(zip(keys, t.tolist()))


def all_reduce_max(value: float, *, device: torch.device) -> float:
    """The largest of a per-rank scalar over all ranks."""
    t = torch.tensor([float(value)], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.item()


def broadcast_parameters(params: Sequence[torch.nn.Parameter], *, src: int = 0) -> None:
    """Give every rank rank ``src``'s values of ``params`` (as DDP does when it wraps a model)."""
    for p in params:
        dist.broadcast(p.data, src=src)
