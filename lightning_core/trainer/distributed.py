"""Data-parallel GRPO: the micro-batches of each optimizer step are shared out over torch.distributed ranks.

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

``spawn_grpo`` launches the ranks on one machine (``trainer.processes``), gloo on CPU and nccl on GPU.
"""

from __future__ import annotations

import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.distributed as dist

from lightning_core.trainer.prefix_tree import plain_size, tree_size

log = logging.getLogger(__name__)

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


def broadcast_parameters(params: Sequence[torch.nn.Parameter], *, src: int = 0) -> None:
    """Give every rank rank ``src``'s values of ``params`` (as DDP does when it wraps a model)."""
    for p in params:
        dist.broadcast(p.data, src=src)


# --- launching the ranks on one machine -------------------------------------------------------------


@dataclass(frozen=True)
class GrpoJob:
    """What each rank needs to load the model and run the epoch's GRPO steps (picklable)."""

    base_model_dir: str
    parent_adapter_dir: str | None
    parent_dir: str | None       # the parent version's folder (its AdamW moments are continued from there)
    cfg: Any                     # TrainerConfig
    samples: list[Any]           # batches.Sample
    seed: int
    device: str                  # cpu, or cuda (rank r uses cuda:r)
    backend: str                 # gloo | nccl
    init_method: str             # tcp://127.0.0.1:PORT
    out_path: str                # rank 0 writes {"history", "trainable", "optimizer"} here


def backend_for(device: torch.device) -> str:
    """nccl for CUDA ranks, gloo for CPU ranks."""
    return "nccl" if device.type == "cuda" else "gloo"


def spawn_grpo(job_fields: dict[str, Any], *, processes: int) -> dict[str, Any]:
    """Run the GRPO steps on ``processes`` ranks of this machine; return rank 0's history, weights and optimizer state."""
    from lightning_core.services import free_port

    if processes < 2:
        raise ValueError(f"spawn_grpo needs at least 2 processes, found {processes}")
    if job_fields["device"].startswith("cuda") and torch.cuda.device_count() < processes:
        raise ValueError(f"trainer.processes={processes} needs {processes} GPUs, found {torch.cuda.device_count()}")
    with tempfile.TemporaryDirectory(prefix="arclight-ddp-") as tmp:
        out_path = str(Path(tmp) / "rank0.pt")
        job = GrpoJob(**job_fields, init_method=f"tcp://127.0.0.1:{free_port()}", out_path=out_path)
        torch.multiprocessing.start_processes(_rank_main, args=(processes, job), nprocs=processes, join=True,
                                              start_method="spawn")
        return torch.load(out_path, map_location="cpu", weights_only=False)


def _rank_main(rank: int, world_size: int, job: GrpoJob) -> None:
    """One rank: join the group, load the model, run the steps as one process would; rank 0 saves the result."""
    from lightning_core.trainer.policy_model import autocast_dtype, load_policy_model, seed_everything
    from lightning_core.trainer.train import _run_grpo

    cfg = job.cfg
    if job.device == "cpu":  # ranks share the cores instead of each taking all of them
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world_size))
        device = torch.device("cpu")
    else:
        device = torch.device("cuda", rank)
        torch.cuda.set_device(device)
    dist.init_process_group(job.backend, init_method=job.init_method, rank=rank, world_size=world_size)
    try:
        seed_everything(job.seed)
        amp = autocast_dtype(cfg.dtype, device)
        model = load_policy_model(
            job.base_model_dir, finetune=cfg.finetune, device=device, bf16=amp is not None, lora_r=cfg.lora_r,
            lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout, lora_target_modules=cfg.lora_target_modules,
            parent_adapter_dir=job.parent_adapter_dir, gradient_checkpointing=cfg.gradient_checkpointing,
        )
        trainable = [p for p in model.parameters() if p.requires_grad]
        broadcast_parameters(trainable)
        history, optimizer = _run_grpo(model, job.samples, cfg=cfg, base_model_dir=job.base_model_dir, device=device,
                                       amp=amp, seed=job.seed, on_step=None, parent_dir=job.parent_dir)
        if rank == 0:
            names = [n for n, p in model.named_parameters() if p.requires_grad]
            torch.save({"history": history,
                        "trainable": {n: p.detach().cpu() for n, p in zip(names, trainable)},
                        "optimizer": _cpu(optimizer.state_dict())}, job.out_path)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _cpu(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.cpu()
    if isinstance(value, dict):
        return {k: _cpu(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_cpu(v) for v in value]
    return value
