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

if TYPE_CHECKING:
    from lightning_core.trainer.samples import Sample

# Attention kernels that take an arbitrary (tree) mask; flash-attention-2 only does causal/varlen.
TREE_ATTENTION = ("sdpa", "eager")


@dataclass
class PrefixTree:
    """A micro-batch packed as one sequence of trie nodes, and where each response token is read."""

    token_ids: np.ndarray      # [N] token of each node
    parents: np.ndarray        # [N] parent node, -1 for the first token of a sequence
    depths: np.ndarray         # [N] position id of each node
    logit_nodes: np.ndarray    # [U] nodes whose logits predict some response token, ascending
    gather: np.ndarray         # [B, W] index into logit_nodes for response token k of sample b (0 where padded)

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
                      depths=np.asarray(depths, dtype=np.int64), logit_nodes=logit_nodes, gather=gather)


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
    if implementation == "sdpa":
        return allowed
    if implementation == "eager":
        return torch.zeros(allowed.shape, dtype=dtype, device=device).masked_fill(~allowed, torch.finfo(dtype).min)
    raise ValueError(f"shared-prefix attention needs attn_implementation in {TREE_ATTENTION}, found {implementation!r}")


def attn_implementation(model: torch.nn.Module) -> str:
    """The model's attention kernel name (through PEFT wrappers)."""
    config = getattr(model, "config", None)
    return str(getattr(config, "_attn_implementation", None) or "eager")


def tree_response_logps(model: torch.nn.Module, tree: PrefixTree, response_ids: torch.Tensor, *,
                        with_entropy: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-token logprobs [B, W] (and entropy, without grad) of the responses, from one packed forward."""
    device = response_ids.device
    compute_dtype = next(p.dtype for p in model.parameters())
    if torch.is_autocast_enabled(device.type):
        compute_dtype = torch.get_autocast_dtype(device.type)
    mask = attention_mask(tree, implementation=attn_implementation(model), dtype=compute_dtype, device=device)
    out = model(input_ids=torch.from_numpy(tree.token_ids).to(device)[None],
                position_ids=torch.from_numpy(tree.depths).to(device)[None],
                attention_mask=mask, logits_to_keep=torch.from_numpy(tree.logit_nodes).to(device), use_cache=False)
    logp_nodes = torch.log_softmax(out.logits[0].float(), dim=-1)  # [U, V]
    gather = torch.from_numpy(tree.gather).to(device)
    logps = logp_nodes[gather, response_ids]  # [B, W]
    entropy = None
    if with_entropy:
        with torch.no_grad():
            per_node = -(logp_nodes.exp() * logp_nodes).sum(-1)
            entropy = per_node[gather]
    return logps, entropy
