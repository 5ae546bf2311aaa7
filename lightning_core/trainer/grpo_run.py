"""One process's GRPO (or SFT) run of an epoch: the steps planned from the samples, AdamW continued from the parent
version, the reference model when a KL term is on, then ``grpo.train_grpo``. Takes the trainer settings as an object (a
``config.TrainerConfig``) and imports neither the catalog, MLflow nor the config."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from lightning_core.trainer.batches import plan_steps
from lightning_core.trainer.grpo import train_grpo
from lightning_core.trainer.policy_model import drop_reference_adapter, reference_logps_fn
from lightning_core.trainer.sft import plan_sft_steps
from lightning_core.trainer.prefix_tree import TREE_ATTENTION, attn_implementation
from lightning_core.trainer.tree_attention import prepare_attention

if TYPE_CHECKING:
    from lightning_core.config import TrainerConfig

log = logging.getLogger(__name__)


OPTIMIZER_STATE = "optimizer.pt"


def run_grpo(model, samples, *, cfg: TrainerConfig, base_model_dir, device, amp, seed, on_step, parent_dir=None,
              parent_adapter_dir=None, should_stop=None, reference_dir=None):
    """``reference_dir``: the KL reference when it is not the base model (``trainer.kl_reference: warm_start``)."""
    attention = prepare_attention(model, cfg.attention, device=device)
    steps = plan_steps(samples, tokens_per_step=cfg.tokens_per_step, micro_batch_size=cfg.micro_batch_size,
                       normalization=cfg.loss_normalization, seed=seed,
                       shared_prefix=shared_prefix_mode(cfg.shared_prefix, model),
                       micro_batch_tokens=cfg.micro_batch_tokens)
    optimizer = adamw(model, cfg=cfg, parent_dir=parent_dir)
    reference = (reference_logps_fn(model, base_model_dir=base_model_dir, finetune=cfg.finetune, device=device,
                                    attention=attention, logits_chunk_tokens=cfg.logits_chunk_tokens,
                                    reference_dir=reference_dir)
                 if cfg.beta != 0.0 else None)
    pad_id = getattr(getattr(model, "config", None), "pad_token_id", None) or 0
    try:
        metrics = train_grpo(model, steps, optimizer=optimizer, epsilon_low=cfg.epsilon_low,
                             epsilon_high=cfg.epsilon_high, beta=cfg.beta, max_grad_norm=cfg.max_grad_norm,
                             device=device, autocast_dtype=amp, reference=reference, pad_token_id=pad_id,
                             on_step=on_step, passes=cfg.passes, max_steps=cfg.max_steps, attention=attention,
                             logits_chunk_tokens=cfg.logits_chunk_tokens, behaviour_correction=cfg.behaviour_correction,
                             importance_cap=cfg.importance_cap, should_stop=should_stop)
    finally:
        drop_reference_adapter(model)
    return metrics, optimizer


def run_sft(model, samples, *, cfg: TrainerConfig, device, amp, seed, on_step, parent_dir=None, should_stop=None):
    """SFT on the trainer's own step (``sft.plan_sft_steps``): ``trainer.sft_epochs`` passes, ``micro_batch_size``
    calls per optimizer step, the shared-prefix forward where it saves tokens, AdamW continued from the parent's
    moments as GRPO's is (and handed on to the versions after). Each step's ``loss`` is the responses' token-mean
    negative log-likelihood before it."""
    attention = prepare_attention(model, cfg.attention, device=device)
    steps = plan_sft_steps(samples, calls_per_step=cfg.micro_batch_size, passes=cfg.sft_epochs, seed=seed,
                           shared_prefix=shared_prefix_mode(cfg.shared_prefix, model),
                           micro_batch_tokens=cfg.micro_batch_tokens)
    optimizer = adamw(model, cfg=cfg, parent_dir=parent_dir)
    pad_id = getattr(getattr(model, "config", None), "pad_token_id", None) or 0
    def sft_metrics(m: dict) -> dict:  # SFT's loss is the likelihood's, not the surrogate's (-1 at ratio 1)
        return {**m, "loss": m["nll"]}

    report = (lambda i, m: on_step(i, sft_metrics(m))) if on_step is not None else None
    metrics = train_grpo(model, steps, optimizer=optimizer, epsilon_low=cfg.epsilon_low, epsilon_high=cfg.epsilon_high,
                         beta=0.0, max_grad_norm=cfg.max_grad_norm, device=device, autocast_dtype=amp,
                         pad_token_id=pad_id, on_step=report, attention=attention,
                         logits_chunk_tokens=cfg.logits_chunk_tokens, should_stop=should_stop)
    return [sft_metrics(m) for m in metrics], optimizer


def adamw(model, *, cfg: TrainerConfig, parent_dir=None) -> torch.optim.Optimizer:
    """AdamW over the trainable parameters, with the parent version's moments when ``keep_optimizer_state``."""
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.learning_rate,
                                  weight_decay=cfg.weight_decay)
    if cfg.keep_optimizer_state and parent_dir is not None:
        resume_optimizer(optimizer, Path(parent_dir) / OPTIMIZER_STATE, cfg=cfg)
    return optimizer


def resume_optimizer(optimizer: torch.optim.Optimizer, path: Path, *, cfg: TrainerConfig) -> bool:
    """Load the parent version's AdamW moments into ``optimizer``; False (fresh moments) when absent or mismatched.

    A fresh AdamW's first steps move every parameter by about the full learning rate whatever the
    gradient's size (its second moment is just that gradient squared), so restarting it each epoch
    turns the small, noisy gradients of a nearly solved task into full-size random steps.
    """
    if not path.is_file():
        return False
    state = torch.load(path, map_location="cpu", weights_only=True)
    params = [p for group in optimizer.param_groups for p in group["params"]]
    saved = state.get("state", {})
    shapes_match = len(state.get("param_groups", [{}])[0].get("params", [])) == len(params) and all(
        saved[i]["exp_avg"].shape == p.shape for i, p in enumerate(params) if i in saved)
    if not shapes_match:
        log.warning("optimizer state in %s does not match this model's trainable parameters; starting AdamW afresh", path)
        return False
    optimizer.load_state_dict(state)
    for group in optimizer.param_groups:  # the config, not the parent, sets the hyperparameters
        group["lr"], group["weight_decay"] = cfg.learning_rate, cfg.weight_decay
    return True


def shared_prefix_mode(mode: str, model: torch.nn.Module) -> str:
    """The configured shared-prefix mode, or off when the model's attention kernel cannot take a tree mask."""
    kernel = attn_implementation(model)
    if mode == "off" or kernel in TREE_ATTENTION:
        return mode
    if mode == "on":
        raise ValueError(f"trainer.shared_prefix=on needs attn_implementation in {TREE_ATTENTION}, found {kernel!r}; "
                         "set trainer.shared_prefix=auto or off")
    log.info("shared-prefix forward off: attention kernel %r takes no tree mask", kernel)
    return "off"
