"""Data-parallel GRPO on one machine: ``spawn_grpo`` launches ``trainer.processes`` ranks (gloo on CPU, nccl with one
GPU per rank); each loads the model and runs the epoch's steps as one process would (``grpo_run.run_grpo``), taking
its share of each step's micro-batches (``collectives``); rank 0's weights and AdamW state come back to the caller
(``run_grpo_distributed``).
"""

from __future__ import annotations

import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist

from lightning_core.common.services import free_port
from lightning_core.trainer.collectives import broadcast_parameters
from lightning_core.trainer.grpo_run import run_grpo
from lightning_core.trainer.policy_model import autocast_dtype, load_policy_model, seed_everything

if TYPE_CHECKING:
    from lightning_core.config import TrainerConfig

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class GrpoJob:
    """What each rank needs to load the model and run the epoch's GRPO steps (picklable)."""

    base_model_dir: str
    parent_adapter_dir: str | None
    parent_dir: str | None       # the parent version's folder (its AdamW moments are continued from there)
    cfg: Any                     # TrainerConfig
    samples: list[Any]           # samples.Sample
    seed: int
    device: str                  # cpu, or cuda (rank r uses cuda:device_ids[r], default cuda:r)
    backend: str                 # gloo | nccl
    init_method: str             # tcp://127.0.0.1:PORT
    out_path: str                # rank 0 writes {"history", "trainable", "optimizer"} here
    device_ids: list[int] | None = None  # trainer.devices: the CUDA devices of the ranks, in rank order
    reference_dir: str | None = None     # the KL reference when not the base model (trainer.kl_reference: warm_start)


def backend_for(device: torch.device) -> str:
    """nccl for CUDA ranks, gloo for CPU ranks."""
    return "nccl" if device.type == "cuda" else "gloo"


def spawn_grpo(job_fields: dict[str, Any], *, processes: int) -> dict[str, Any]:
    """Run the GRPO steps on ``processes`` ranks of this machine; return rank 0's history, weights and optimizer state."""
    if processes < 2:
        raise ValueError(f"spawn_grpo needs at least 2 processes, found {processes}")
    ids = job_fields.get("device_ids")
    if job_fields["device"].startswith("cuda") and ids is not None and len(ids) < processes:
        raise ValueError(f"trainer.processes={processes} needs {processes} GPUs, but the trainer has {len(ids)}: {ids} "
                         "(vLLM takes the first GPU unless serving.devices or trainer.devices say otherwise)")
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
    cfg = job.cfg
    if job.device == "cpu":  # ranks share the cores instead of each taking all of them
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world_size))
        device = torch.device("cpu")
    else:
        device = torch.device("cuda", job.device_ids[rank] if job.device_ids else rank)
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
        history, optimizer = run_grpo(model, job.samples, cfg=cfg, base_model_dir=job.base_model_dir, device=device,
                                       amp=amp, seed=job.seed, on_step=None, parent_dir=job.parent_dir,
                                       reference_dir=job.reference_dir)
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


def run_grpo_distributed(model, samples, *, cfg: TrainerConfig, base_model_dir, device, amp, seed, on_step,
                          parent_dir=None, parent_adapter_dir=None, should_stop=None, reference_dir=None):
    """The GRPO steps on ``cfg.processes`` ranks (``trainer.distributed``); rank 0's weights and AdamW land in ``model``.

    ``should_stop`` is not asked: the ranks are processes of their own, in this process's group, and stop with it."""
    result = spawn_grpo(dict(
        base_model_dir=str(base_model_dir), parent_adapter_dir=str(parent_adapter_dir) if parent_adapter_dir else None,
        parent_dir=str(parent_dir) if parent_dir else None, cfg=cfg, samples=samples, seed=seed, device=device.type, backend=backend_for(device),
        device_ids=list(cfg.devices) if device.type == "cuda" and getattr(cfg, "devices", None) else None,
        reference_dir=str(reference_dir) if reference_dir else None,
    ), processes=cfg.processes)
    named = dict(model.named_parameters())
    missing = sorted(set(result["trainable"]) - set(named))
    if missing:
        raise RuntimeError(f"rank 0 trained parameters this process's model does not have: {missing[:5]}")
    with torch.no_grad():
        for name, value in result["trainable"].items():
            named[name].copy_(value.to(named[name].device))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.learning_rate,
                                  weight_decay=cfg.weight_decay)
    optimizer.load_state_dict(result["optimizer"])
    for i, metrics in enumerate(result["history"]):
        on_step(i, metrics)
    return result["history"], optimizer
