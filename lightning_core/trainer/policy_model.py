"""Load the model a policy trains: base weights, plus a fresh or parent LoRA adapter, on a device."""

from __future__ import annotations

import logging
import random
from pathlib import Path

import numpy as np
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM

from lightning_core.common import hardware

log = logging.getLogger(__name__)


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (CPU and CUDA)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def pick_device(name: str) -> torch.device:
    """``auto`` is cuda when available, else cpu; anything else is passed to torch."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def autocast_dtype(dtype: str, device: torch.device) -> torch.dtype | None:
    """bf16 autocast on GPU (``auto``) or when asked; None means plain fp32."""
    if dtype == "bfloat16" and device.type == "cpu" and not hardware.cpu_has_bf16():
        log.warning("trainer.dtype=bfloat16 on a CPU without native bf16 (no AVX512-BF16/AMX): bf16 is emulated "
                    "and many times slower than fp32 here; set trainer.dtype=auto")
    if dtype == "bfloat16" or (dtype == "auto" and device.type == "cuda"):
        return torch.bfloat16
    return None


def load_policy_model(
    base_model_dir: str | Path,
    *,
    finetune: str,
    device: torch.device,
    bf16: bool,
    lora_r: int,
    lora_alpha: int,
    lora_dropout: float,
    lora_target_modules: list[str],
    parent_adapter_dir: str | Path | None = None,
    gradient_checkpointing: bool = False,
) -> torch.nn.Module:
    """Return a trainable model: a PeftModel (LoRA) or the full model, with fp32 trainable weights."""
    # LoRA keeps the frozen base in bf16 when autocasting; full fine-tuning keeps fp32 master weights.
    weight_dtype = torch.bfloat16 if (bf16 and finetune == "lora") else torch.float32
    model = AutoModelForCausalLM.from_pretrained(str(base_model_dir), dtype=weight_dtype)
    if finetune == "lora":
        if parent_adapter_dir is not None:
            model = PeftModel.from_pretrained(model, str(parent_adapter_dir), is_trainable=True)
        else:
            model = get_peft_model(model, LoraConfig(
                r=lora_r, lora_alpha=lora_alpha, lora_dropout=lora_dropout,
                target_modules=list(lora_target_modules), task_type="CAUSAL_LM",
            ))
        for p in model.parameters():  # adapters train in fp32 even on a bf16 base
            if p.requires_grad and p.dtype != torch.float32:
                p.data = p.data.float()
    elif parent_adapter_dir is not None:
        raise ValueError(f"finetune='full' continues from a full checkpoint (pass it as base_model_dir), "
                         f"not from an adapter ({parent_adapter_dir})")
    if gradient_checkpointing:
        model.activation_checkpointing_enable()  # transformers' name for it now (gradient_... is deprecated)
        if hasattr(model, "enable_input_require_grads"):
            model.enable_input_require_grads()
    return model.to(device)


REFERENCE_ADAPTER = "reference"


def reference_logps_fn(model: torch.nn.Module, *, base_model_dir: str | Path, finetune: str, device: torch.device,
                       attention: str = "sdpa", logits_chunk_tokens: int = 1024, reference_dir: str | Path | None = None):
    """Return (batch, tree) -> reference response logprobs (call it under no_grad).

    Without ``reference_dir``: the base model, i.e. the adapter switched off (LoRA) or a frozen copy of
    ``base_model_dir`` (full). With it (``trainer.kl_reference: warm_start``): LoRA loads that adapter beside the
    policy's on the same base, as peft adapter ``reference``, and switches to it for the reference pass (in eval
    mode); full loads a frozen copy of that checkpoint. ``drop_reference_adapter`` removes the adapter again."""
    from lightning_core.trainer.grpo import micro_batch_logps
    from lightning_core.trainer.tree_attention import use_flex

    kw = dict(attention=attention, logits_chunk_tokens=logits_chunk_tokens)
    if finetune == "lora" and reference_dir is None:
        def reference(batch, tree):
            with model.disable_adapter():
                return micro_batch_logps(model, batch, tree, **kw)[0]
        return reference
    if finetune == "lora":
        model.load_adapter(str(reference_dir), adapter_name=REFERENCE_ADAPTER, is_trainable=False)
        policy_adapter = model.active_adapter

        def reference_adapter(batch, tree):
            trainable = [p for p in model.parameters() if p.requires_grad]  # set_adapter moves requires_grad
            was_training = model.training
            model.set_adapter(REFERENCE_ADAPTER)
            model.eval()
            try:
                return micro_batch_logps(model, batch, tree, **kw)[0]
            finally:
                model.set_adapter(policy_adapter)
                model.train(was_training)
                for p in model.parameters():
                    p.requires_grad_(False)
                for p in trainable:
                    p.requires_grad_(True)
        return reference_adapter
    ref = AutoModelForCausalLM.from_pretrained(str(reference_dir or base_model_dir), dtype=torch.float32).to(device).eval()
    ref.requires_grad_(False)
    if attention == "flex":
        use_flex(ref)
    return lambda batch, tree: micro_batch_logps(ref, batch, tree, **kw)[0]


def drop_reference_adapter(model: torch.nn.Module) -> None:
    """Remove the ``reference`` adapter ``reference_logps_fn`` loaded, so the version saves the policy's alone."""
    if REFERENCE_ADAPTER in getattr(model, "peft_config", {}):
        model.delete_adapter(REFERENCE_ADAPTER)
