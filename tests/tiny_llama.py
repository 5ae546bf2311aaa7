"""A tiny random Llama with a 64-token word-level tokenizer, and triplet tables shaped like the lake's.

The trainer only needs token ids, so its tests do not need the SmolLM2 tokenizer (49k vocab).
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import pyarrow as pa

VOCAB = 64


def build_tiny_llama(out_dir: Path, *, seed: int = 0, hidden: int = 32, layers: int = 2) -> Path:
    """Save a random LlamaForCausalLM (vocab 64) and a matching tokenizer to ``out_dir``."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         pad_token_id=0, eos_token_id=1, bos_token_id=2, tie_word_embeddings=False)
    LlamaForCausalLM(config).save_pretrained(out_dir)
    vocab = {"<pad>": 0, "<eos>": 1, "<bos>": 2, **{f"t{i}": i for i in range(3, VOCAB)}}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", bos_token="<bos>").save_pretrained(out_dir)
    return out_dir


def group_advantages(rewards: list[float]) -> list[float]:
    """GRPO's group-relative advantage: (r - mean) / (std + 1e-4), population std."""
    mean = sum(rewards) / len(rewards)
    std = (sum((r - mean) ** 2 for r in rewards) / len(rewards)) ** 0.5
    return [(r - mean) / (std + 1e-4) for r in rewards]


def make_triplets(
    *,
    groups: int,
    per_group: int,
    rewarded: int | None = 0,
    seed: int = 0,
    prompt_len: int = 6,
    response_len: int = 5,
    run_id: str = "r1",
    epoch: int = 0,
    policy: str = "default",
    logprobs: bool = False,
    turns: int = 1,
) -> list[dict[str, Any]]:
    """Rows of the triplet contract: in each group the ``rewarded``-th rollout gets reward 1, others 0."""
    rng = random.Random(seed)
    rows = []
    for g in range(groups):
        prompt = [rng.randrange(3, VOCAB) for _ in range(prompt_len)]
        rewards = [1.0 if i == rewarded else 0.0 for i in range(per_group)]
        advantages = group_advantages(rewards)
        for i in range(per_group):
            for turn in range(turns):
                response = [rng.randrange(3, VOCAB) for _ in range(response_len + turn)]
                rows.append({
                    "run_id": run_id, "epoch": epoch, "policy": policy, "rollout_id": f"g{g}-s{i}", "task_id": f"task{g}",
                    "group_id": f"g{g}", "attempt": 0, "agent_name": "agent", "turn_index": turn,
                    "trace_id": f"{g:016x}{i:016x}", "span_id": f"{turn:016x}", "start_ns": 1000 * turn,
                    "prompt_token_ids": prompt + [3] * turn, "response_token_ids": response,
                    "response_logprobs": [-4.0 - 0.01 * k for k in range(len(response))] if logprobs else None,
                    "prompt_messages": json.dumps([{"role": "user", "content": " ".join(f"t{t}" for t in prompt)}]),
                    "response_text": " ".join(f"t{t}" for t in response), "reward": rewards[i],
                    "advantage": advantages[i], "policy_version": None, "model": "tiny", "flags": [],
                })
    return rows


def triplet_table(rows: list[dict[str, Any]]) -> pa.Table:
    """The rows as a pyarrow Table with the lake's triplet schema."""
    from lightning_core.store.outputs import TRIPLET_SCHEMA  # here, not at the top: the GPU machine has no deltalake

    schema = pa.schema(list(TRIPLET_SCHEMA)[: TRIPLET_SCHEMA.get_field_index("flags") + 1])
    return pa.Table.from_pylist(rows, schema=schema)
