"""Shared-prefix forward: every distinct prefix of a micro-batch is encoded once.

After *Prefix Grouper* (arXiv 2506.05433), generalised from one shared prompt to a prefix tree.
The micro-batch's sequences (prompt + response) are inserted into a token trie; its nodes, in
creation order, become one packed sequence. A node's position id is its depth and it attends to
its ancestors and itself, so its hidden state is exactly what the plain forward computes at that
position of every sample that passes through it. The samples of a GRPO group share their prompt,
and a rollout's later turns, whose prompts extend its earlier prompt + response, share that too.
Logits are taken only at the nodes that predict a response token. Outputs and gradients equal the
plain forward's (a sum over samples of the same terms), at the cost of the distinct tokens only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Sequence

import numpy as np
import torch

from lightning_core.trainer.token_logps import decoder_and_head, token_logps
from lightning_core.trainer.tree_attention import TREE_FLEX, tree_block_mask

if TYPE_CHECKING:
    from lightning_core.trainer.samples import Sample

# Attention kernels that take an arbitrary (tree) mask; flash-attention-2 only does causal/varlen.
# TREE_FLEX is SDPA that also takes FlexAttention block masks (tree_attention.use_flex).
TREE_ATTENTION = ("sdpa", "eager", TREE_FLEX)


@dataclass
class PrefixTree:
    """A micro-batch packed as one sequence of trie nodes, and where each response token is read."""

    token_ids: np.ndarray      # [N] token of each node
    parents: np.ndarray        # [N] parent node, -1 for the first token of a sequence
    depths: np.ndarray         # [N] position id of each node
    logit_nodes: np.ndarray    # [U] nodes whose logits predict some response token, ascending
    gather: np.ndarray         # [B, W] index into logit_nodes for response token k of sample b (0 where padded)
    response_lengths: np.ndarray  # [B] response tokens of each sample (gather's real entries are [b, :len])

    @property
    def size(self) -> int:
        """Distinct tokens the forward pass encodes."""
        return int(self.token_ids.shape[0])


class TreeCounter:
    """Counts the distinct prefixes (trie nodes) of sequences added one at a time."""

    def __init__(self) -> None:
        self.children: dict[tuple[int, int], int] = {}

    @property
    def size(self) -> int:
        """Trie nodes so far: the tokens a shared-prefix forward of the added samples encodes."""
        return len(self.children)

    def added_by(self, sample: "Sample") -> int:
        """Nodes that adding ``sample`` would create."""
        node, sequence = -1, (*sample.prompt_ids, *sample.response_ids)
        for matched, token in enumerate(sequence):
            node = self.children.get((node, token), -2)
            if node == -2:
                return len(sequence) - matched
        return 0

    def add(self, sample: "Sample") -> None:
        """Insert ``sample``'s prompt + response."""
        node = -1
        for token in (*sample.prompt_ids, *sample.response_ids):
            node = self.children.setdefault((node, token), len(self.children))


def tree_size(samples: Sequence["Sample"]) -> int:
    """Count the distinct prefixes (trie nodes) of the samples' prompt + response sequences."""
    counter = TreeCounter()
    for s in samples:
        counter.add(s)
    return counter.size


def plain_size(samples: Sequence["Sample"]) -> int:
    """Tokens the plain forward encodes for the samples: the padded batch."""
    if not samples:
        return 0
    prompt = max(len(s.prompt_ids) for s in samples)
    response = max(len(s.response_ids) for s in samples)
    return len(samples) * (prompt + response)


def build_tree(samples: Sequence["Sample"]) -> PrefixTree:
    """Insert each sample's prompt + response into a token trie and record where its responses are predicted."""
    children: dict[tuple[int, int], int] = {}
    tokens: list[int] = []
    parents: list[int] = []
    depths: list[int] = []
    predicting: list[list[int]] = []  # per sample: node of position P+k-1 for each response token k
    for s in samples:
        if not s.prompt_ids:
            raise ValueError(f"sample of row {s.row} has no prompt tokens; a response token needs a prompt token before it")
        node, path = -1, []
        for depth, token in enumerate((*s.prompt_ids, *s.response_ids)):
            key = (node, token)
            child = children.get(key)
            if child is None:
                child = children[key] = len(tokens)
                tokens.append(token)
                parents.append(node)
                depths.append(depth)
            node = child
            path.append(node)
        p = len(s.prompt_ids)
        predicting.append(path[p - 1: p - 1 + len(s.response_ids)])
    logit_nodes = np.unique(np.fromiter((n for row in predicting for n in row), dtype=np.int64))
    width = max((len(row) for row in predicting), default=0)
    gather = np.zeros((len(samples), width), dtype=np.int64)
    for b, row in enumerate(predicting):
        gather[b, : len(row)] = np.searchsorted(logit_nodes, row)
    return PrefixTree(token_ids=np.asarray(tokens, dtype=np.int64), parents=np.asarray(parents, dtype=np.int64),
                      depths=np.asarray(depths, dtype=np.int64), logit_nodes=logit_nodes, gather=gather,
                      response_lengths=np.asarray([len(s.response_ids) for s in samples], dtype=np.int64))


def ancestor_mask(parents: np.ndarray) -> np.ndarray:
    """[N, N] bool: node i may attend to node j when j is i itself or one of its ancestors."""
    n = parents.shape[0]
    mask = np.zeros((n, n), dtype=bool)
    for i in range(n):  # parents come before children, so a parent's row is complete when read
        p = parents[i]
        if p >= 0:
            mask[i, : p + 1] = mask[p, : p + 1]
        mask[i, i] = True
    return mask


def attention_mask(tree: PrefixTree, *, implementation: str, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """The 4D mask transformers uses as given: bool for sdpa, additive (0 / dtype min) for eager."""
    allowed = torch.from_numpy(ancestor_mask(tree.parents)).to(device)[None, None]
    if implementation in ("sdpa", TREE_FLEX):
        return allowed
    if implementation == "eager":
        return torch.zeros(allowed.shape, dtype=dtype, device=device).masked_fill(~allowed, torch.finfo(dtype).min)
    raise ValueError(f"shared-prefix attention needs attn_implementation in {TREE_ATTENTION}, found {implementation!r}")


def attn_implementation(model: torch.nn.Module) -> str:
    """The model's attention kernel name (through PEFT wrappers)."""
    config = getattr(model, "config", None)
    return str(getattr(config, "_attn_implementation", None) or "eager")


def tree_response_logps(model: torch.nn.Module, tree: PrefixTree, response_ids: torch.Tensor, *,
                        with_entropy: bool = False, attention: str = "sdpa", logits_chunk_tokens: int = 1024,
                        ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-token logprobs [B, W] (and entropy, without grad) of the responses, from one packed forward.

    ``attention``: sdpa (a dense [N, N] mask; sdpa or eager kernels) or flex (a FlexAttention block
    mask; the model must have been through ``tree_attention.use_flex``). Logits are computed only for
    the real response tokens, ``logits_chunk_tokens`` at a time (``token_logps``).
    """
    device = response_ids.device
    if attention == "flex":
        mask = tree_block_mask(tree.parents, device=device)
    elif attention == "sdpa":
        compute_dtype = next(p.dtype for p in model.parameters())
        if torch.is_autocast_enabled(device.type):
            compute_dtype = torch.get_autocast_dtype(device.type)
        mask = attention_mask(tree, implementation=attn_implementation(model), dtype=compute_dtype, device=device)
    else:
        raise ValueError(f"tree attention must be 'sdpa' or 'flex', found {attention!r}")
    decoder, head = decoder_and_head(model)
    hidden = decoder(input_ids=torch.from_numpy(tree.token_ids).to(device)[None],
                     position_ids=torch.from_numpy(tree.depths).to(device)[None],
                     attention_mask=mask, use_cache=False).last_hidden_state[0]  # [N, H]
    width = response_ids.size(1)
    real = torch.from_numpy(np.arange(width)[None, :] < tree.response_lengths[:, None]).to(device)  # [B, W]
    b_idx, k_idx = real.nonzero(as_tuple=True)
    nodes = torch.from_numpy(tree.logit_nodes).to(device)[torch.from_numpy(tree.gather).to(device)[b_idx, k_idx]]
    flat, flat_entropy = token_logps(hidden[nodes], response_ids[b_idx, k_idx], head=head,
                                     chunk_tokens=logits_chunk_tokens, with_entropy=with_entropy)
    return scatter_rows(flat, b_idx, k_idx, like=response_ids), (
        scatter_rows(flat_entropy, b_idx, k_idx, like=response_ids) if with_entropy else None)


def scatter_rows(values: torch.Tensor, b_idx: torch.Tensor, k_idx: torch.Tensor, *, like: torch.Tensor) -> torch.Tensor:
    """Per-token values of the real response tokens -> [B, W] fp32, zero where padded."""
    out = torch.zeros(like.shape, dtype=values.dtype, device=values.device)
    return out.index_put((b_idx, k_idx), values)
