"""GPUs shared by vLLM and the trainer: which devices each takes, and how much memory vLLM may claim.

Pure functions over numbers, so the choices can be tested without a GPU:

    plan = device_plan(gpus=1)                                   # DevicePlan(serving=[0], trainer=[0]): shared
    need = trainer_memory(ModelShape.from_dir(folder), micro_batch_size=8, sequence_length=2048)
    share = vllm_memory_share(total_bytes=80 * GIB, trainer_bytes=need.total)

The trainer's memory is an estimate, not a measurement (docs/gpu.md): bf16 base weights, LoRA weights
with their gradients and AdamW moments in fp32, the activations one micro-batch keeps for backward,
and the full-vocabulary logits of at most one chunk of its response tokens (trainer.logits_chunk_tokens).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from lightning_core.config import ArclightConfig

GIB = 1024**3
# CUDA contexts of two processes (~0.5 GiB each), the allocators' fragmentation and NCCL buffers
MARGIN_BYTES = 2 * GIB
MIN_VLLM_SHARE, MAX_VLLM_SHARE = 0.1, 0.9


@dataclass(frozen=True)
class ModelShape:
    """The sizes of a Llama-style decoder that decide its memory (from its config.json)."""

    hidden_size: int
    layers: int
    heads: int
    kv_heads: int
    intermediate_size: int
    vocab_size: int
    tie_embeddings: bool = False
    head_dim: int | None = None

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> "ModelShape":
        """The shape of a Hugging Face config.json (Llama, Qwen2, Mistral, ... field names)."""
        heads = config["num_attention_heads"]
        return cls(hidden_size=config["hidden_size"], layers=config["num_hidden_layers"], heads=heads,
                   kv_heads=config.get("num_key_value_heads") or heads, intermediate_size=config["intermediate_size"],
                   vocab_size=config["vocab_size"], tie_embeddings=bool(config.get("tie_word_embeddings", False)),
                   head_dim=config.get("head_dim"))

    @classmethod
    def from_dir(cls, folder: Path) -> "ModelShape":
        """The shape of the model in ``folder``."""
        return cls.from_config(json.loads((Path(folder) / "config.json").read_text()))

    @property
    def dim(self) -> int:
        """Size of one attention head."""
        return self.head_dim or self.hidden_size // self.heads

    def module_dims(self) -> dict[str, tuple[int, int]]:
        """(in, out) of each linear layer of one decoder layer, by its usual module name."""
        h, q, kv, i = self.hidden_size, self.heads * self.dim, self.kv_heads * self.dim, self.intermediate_size
        return {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h),
                "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}

    @property
    def params(self) -> int:
        """Parameter count: embeddings, the output head (unless tied), each layer's linears and norms."""
        layer = sum(a * b for a, b in self.module_dims().values()) + 2 * self.hidden_size
        head = 0 if self.tie_embeddings else self.vocab_size * self.hidden_size
        return self.vocab_size * self.hidden_size + head + self.layers * layer + self.hidden_size


def lora_params(shape: ModelShape, *, r: int, targets: Sequence[str]) -> int:
    """Trainable LoRA parameters: r x (in + out) per wrapped module per layer (unknown names count as h -> h)."""
    dims = shape.module_dims()
    h = shape.hidden_size
    return shape.layers * sum(r * sum(dims.get(name, (h, h))) for name in targets)


@dataclass(frozen=True)
class TrainerMemory:
    """The trainer's estimated peak GPU memory, in bytes, by what holds it."""

    weights: int        # base weights (bf16 for LoRA; counted in `trainable` for full fine-tuning)
    trainable: int      # trainable weights, gradients and AdamW moments, fp32: 16 bytes per parameter
    activations: int    # what one micro-batch's forward keeps for the backward
    logits: int         # full-vocabulary logits, fp32, and their gradient, for the tokens that have them at once

    @property
    def total(self) -> int:
        """All of it."""
        return self.weights + self.trainable + self.activations + self.logits


def trainer_memory(shape: ModelShape, *, micro_batch_size: int, sequence_length: int, finetune: str = "lora",
                   lora_r: int = 16, lora_targets: Sequence[str] = ("q_proj", "k_proj", "v_proj", "o_proj"),
                   weight_bytes: int = 2, gradient_checkpointing: bool = False,
                   logits_tokens: int | None = None) -> TrainerMemory:
    """Estimate the trainer's peak memory for one micro-batch of ``micro_batch_size`` x ``sequence_length`` tokens.

    Activations: a Llama-style layer keeps about 8 x hidden + 4 x intermediate values per token for its backward
    (norm inputs and outputs, q/k/v, the attention output, the MLP's gate, up, activation and product; no attention
    scores, as SDPA and flash attention recompute them), in bf16. With gradient checkpointing only each layer's
    input (hidden values) is kept, plus one layer's full set while it is recomputed.

    Logits: 8 bytes x vocab for each of ``logits_tokens`` tokens, the fp32 logits and their fp32 gradient (the bf16
    head output and the bf16 gradient handed back to the head are transient, left to the margin). The loss computes
    logits only for the real response tokens, trainer.logits_chunk_tokens at a time, recomputing each chunk in
    backward when there are several (lightning_core/trainer/token_logps.py), so at peak one chunk's are held:
    ``logits_tokens`` = min(response tokens of the micro-batch, logits_chunk_tokens). None counts every token of the
    micro-batch (prompt and response; the estimate before chunking, an upper bound).
    """
    tokens = micro_batch_size * sequence_length
    if logits_tokens is None:
        logits_tokens = tokens
    elif logits_tokens < 0:
        raise ValueError(f"logits_tokens must be >= 0, found {logits_tokens}")
    h, i = shape.hidden_size, shape.intermediate_size
    per_layer = 2 * (8 * h + 4 * i) * tokens
    activations = (shape.layers * 2 * h * tokens + per_layer) if gradient_checkpointing else shape.layers * per_layer
    if finetune == "full":
        weights, trainable = 0, 16 * shape.params
    else:
        weights, trainable = weight_bytes * shape.params, 16 * lora_params(shape, r=lora_r, targets=lora_targets)
    return TrainerMemory(weights=weights, trainable=trainable, activations=activations,
                         logits=8 * logits_tokens * shape.vocab_size)


def trainer_memory_for(config: ArclightConfig, model: Path) -> TrainerMemory:
    """The estimate for this config's trainer on the model in ``model``: the largest over its policies' settings, for
    sequences of trainer.max_prompt_length + max_response_length tokens (at most serving.max_model_len), with logits
    for min(micro_batch_size x max_response_length, logits_chunk_tokens) tokens at once."""
    shape = ModelShape.from_dir(model)
    needs = []
    for policy in config.policies:
        t = config.trainer_for(policy.name)
        needs.append(trainer_memory(
            shape, micro_batch_size=t.micro_batch_size, finetune=t.finetune, lora_r=t.lora_r,
            sequence_length=min(t.max_prompt_length + t.max_response_length, config.serving.max_model_len),
            lora_targets=t.lora_target_modules, weight_bytes=4 if t.dtype == "float32" else 2,
            gradient_checkpointing=t.gradient_checkpointing,
            logits_tokens=min(t.micro_batch_size * t.max_response_length, t.logits_chunk_tokens)))
    return max(needs, key=lambda need: need.total)


def vllm_memory_share(*, total_bytes: int, trainer_bytes: int, margin_bytes: int = MARGIN_BYTES) -> float:
    """vLLM's --gpu-memory-utilization on a device it shares with the trainer: what the trainer and a margin leave,
    as a share of the device, kept within [0.1, 0.9] and rounded down to 0.01."""
    if total_bytes <= 0:
        raise ValueError(f"total_bytes must be positive, found {total_bytes}")
    share = (total_bytes - trainer_bytes - margin_bytes) / total_bytes
    return max(MIN_VLLM_SHARE, min(MAX_VLLM_SHARE, int(share * 100) / 100))


@dataclass(frozen=True)
class DevicePlan:
    """The CUDA devices vLLM's servers and the trainer use (empty on a machine without GPUs)."""

    serving: list[int]
    trainer: list[int]

    @property
    def shared(self) -> bool:
        """True when vLLM and the trainer use a device in common."""
        return bool(set(self.serving) & set(self.trainer))


def device_plan(*, gpus: int, serving: Sequence[int] | None = None, trainer: Sequence[int] | None = None) -> DevicePlan:
    """Split ``gpus`` devices between vLLM and the trainer.

    Defaults: one GPU is shared; with two or more, vLLM takes the first and the trainer the rest. A list given for
    one side leaves the other the devices it does not name (or shares them when it names them all).
    """
    if gpus <= 0:
        if serving or trainer:
            raise ValueError(f"serving.devices {list(serving or [])} / trainer.devices {list(trainer or [])} name CUDA "
                             "devices, but this machine has no GPU")
        return DevicePlan(serving=[], trainer=[])
    for what, chosen in (("serving.devices", serving), ("trainer.devices", trainer)):
        if chosen is not None:
            bad = [d for d in chosen if not 0 <= d < gpus]
            if not chosen or bad:
                raise ValueError(f"{what} must list CUDA device indices 0..{gpus - 1} of this machine's {gpus} GPUs, "
                                 f"found {list(chosen)}")
    every = list(range(gpus))
    if serving is None and trainer is None:
        serving = [0]
    if serving is None:
        rest = [d for d in every if d not in trainer]
        serving = rest[:1] or list(trainer)[:1]
    if trainer is None:
        trainer = [d for d in every if d not in serving] or list(serving)
    return DevicePlan(serving=list(serving), trainer=list(trainer))


def replica_devices(serving: Sequence[int], *, servers: int, index: int) -> list[int]:
    """The devices of vLLM server ``index`` of ``servers``: the list split into equal runs, or, with fewer devices
    than servers, one device each in turn (servers then share it)."""
    if not serving:
        return []
    per = max(1, len(serving) // servers)
    start = (index * per) % len(serving)
    return list(serving[start:start + per])
