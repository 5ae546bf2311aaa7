"""SFT from traces: keep the best triplets and fine-tune on their response tokens with trl's SFTTrainer.

The triplets are already token ids, so the dataset is pre-tokenised (``input_ids`` +
``completion_mask``); with ``completion_only_loss=True`` SFTTrainer masks the prompt tokens.
"""

from __future__ import annotations

import tempfile
from collections import defaultdict
from typing import Any

import torch

from lightning_core.trainer.samples import Sample, group_key


def select_sft_rows(rows: list[dict[str, Any]], *, min_reward: float | None, top_fraction: float | None) -> list[dict[str, Any]]:
    """Keep triplets with reward >= ``min_reward`` and/or in the top ``top_fraction`` of their group."""
    kept = [r for r in rows if r.get("reward") is not None]
    if min_reward is not None:
        kept = [r for r in kept if float(r["reward"]) >= min_reward]
    if top_fraction is not None:
        groups: dict[str, list[dict[str, Any]]] = defaultdict(list)
        for r in kept:
            groups[group_key(r)].append(r)
        top = []
        for members in groups.values():
            rollouts = sorted({(float(r["reward"]), str(r.get("rollout_id"))) for r in members}, reverse=True)
            n = max(1, round(len(rollouts) * top_fraction))
            best = {rid for _, rid in rollouts[:n]}
            top.extend(r for r in members if str(r.get("rollout_id")) in best)
        kept = top
    return kept


def train_sft(
    model: torch.nn.Module,
    samples: list[Sample],
    *,
    tokenizer,
    learning_rate: float,
    weight_decay: float,
    micro_batch_size: int,
    epochs: float,
    max_grad_norm: float,
    max_length: int,
    seed: int,
    bf16: bool,
    device: torch.device,
    activation_checkpointing: bool = False,
) -> list[dict[str, float]]:
    """Fine-tune ``model`` in place on the samples' response tokens; return trl's per-step logs."""
    from datasets import Dataset
    from datasets.utils import disable_progress_bars
    from transformers import PrinterCallback
    from trl import SFTConfig, SFTTrainer

    disable_progress_bars()  # SFTTrainer's dataset passes ("Dropping fully masked examples ...") drew bars in the log

    dataset = Dataset.from_list([
        {"input_ids": s.prompt_ids + s.response_ids,
         "completion_mask": [0] * len(s.prompt_ids) + [1] * len(s.response_ids)}
        for s in samples
    ])
    with tempfile.TemporaryDirectory(prefix="arclight-sft-") as out:
        args = SFTConfig(
            output_dir=out, per_device_train_batch_size=micro_batch_size, learning_rate=learning_rate,
            weight_decay=weight_decay, num_train_epochs=epochs, max_grad_norm=max_grad_norm, max_length=max_length,
            completion_only_loss=True, seed=seed, data_seed=seed, logging_steps=1, report_to="none",
            save_strategy="no", bf16=bf16, use_cpu=device.type == "cpu", lr_scheduler_type="constant",
            disable_tqdm=True, dataloader_num_workers=0,
            # trl's own default is on (every forward pass computed twice); the config's setting decides
            activation_checkpointing=activation_checkpointing,
        )
        trainer = SFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer)
        trainer.remove_callback(PrinterCallback)  # with tqdm off it printed every step's log dict; the caller logs them
        trainer.train()
        return [h for h in trainer.state.log_history if "loss" in h]
