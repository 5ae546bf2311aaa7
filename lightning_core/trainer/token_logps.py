"""Log-probabilities of chosen tokens from hidden states, with full-vocabulary logits for those tokens only.

The forwards (plain and shared-prefix) run the decoder alone, gather the hidden states of the
positions that predict a response token, and hand them here. The LM head and the log-softmax then
run over chunks of ``chunk_tokens`` rows; with more than one chunk, each chunk is checkpointed, so
backward keeps no chunk's [chunk, vocab] logits and recomputes them one chunk at a time: peak
memory holds one chunk's logits, not all of them (at the cost of the LM head run twice). A single
chunk runs as a plain computation.
"""

from __future__ import annotations

import torch
from torch.utils.checkpoint import checkpoint
from trl.trainer.utils import selective_log_softmax, selective_log_softmax_and_entropy

# Causal-LM heads that do more than ``lm_head(hidden)``: their logits need the model's own forward.
_HEAD_EXTRAS = ("final_logit_softcapping", "logit_scale", "logits_scaling")


def decoder_and_head(model: torch.nn.Module) -> tuple[torch.nn.Module, torch.nn.Module]:
    """The causal LM's decoder stack and LM head (through PEFT wrappers; LoRA layers sit inside them)."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    extras = [k for k in _HEAD_EXTRAS if getattr(inner.config, k, None) not in (None, 1.0)]
    if extras:
        raise ValueError(f"{type(inner).__name__} scales or caps its logits ({', '.join(extras)}); the trainer's "
                         "response logprobs take logits as lm_head(hidden) and do not support it")
    return inner.get_decoder(), inner.get_output_embeddings()


def token_logps(hidden: torch.Tensor, targets: torch.Tensor, *, head: torch.nn.Module, chunk_tokens: int,
                with_entropy: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """log p(targets[i] | hidden[i]) for rows [R, H] -> [R] fp32 (and the entropy, without grad)."""
    if chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be >= 1, found {chunk_tokens}")
    chunks = list(zip(hidden.split(chunk_tokens), targets.split(chunk_tokens)))
    save_memory = len(chunks) > 1 and torch.is_grad_enabled()
    outs = [checkpoint(_chunk, h, t, head, with_entropy, use_reentrant=False) if save_memory
            else _chunk(h, t, head, with_entropy) for h, t in chunks]
    if not outs:
        empty = hidden.new_zeros(0, dtype=torch.float32)
        return empty, (empty if with_entropy else None)
    logps = torch.cat([o[0] for o in outs])
    entropy = torch.cat([o[1] for o in outs]) if with_entropy else None
    return logps, entropy


def _chunk(hidden: torch.Tensor, targets: torch.Tensor, head: torch.nn.Module, with_entropy: bool):
    logits = head(hidden).float()
    if with_entropy:
        return selective_log_softmax_and_entropy(logits, targets, entropy_requires_grad=False)
    return selective_log_softmax(logits, targets), None
