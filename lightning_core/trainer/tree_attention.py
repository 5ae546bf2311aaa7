"""Attention over a packed prefix tree: SDPA with a dense mask, or FlexAttention with a block mask.

The shared-prefix forward (``prefix_tree``) packs a micro-batch's trie as one sequence; node i may
attend to node j when j is i or one of its ancestors. SDPA takes that as a dense [N, N] boolean
mask and computes every block of it. FlexAttention takes it as a mask function over per-node
tensors plus a block mask built from it, and skips the blocks no query of a block may see (on an
H100 about 3x faster than the dense mask for a 3B-shaped layer; FACTS.md). In torch 2.13 its
backward runs only on CUDA ("FlexAttention does not support backward on CPU"), so ``auto`` picks
flex on CUDA and SDPA elsewhere.

The model keeps its SDPA kernel for everything else: ``use_flex`` switches it to ``TREE_FLEX``, an
attention function that runs FlexAttention when the mask it is given is a ``BlockMask`` and
transformers' SDPA function otherwise (so the plain forward is unchanged), with SDPA's mask maker.
"""

from __future__ import annotations

import functools

import numpy as np
import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

try:
    from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention
except ImportError:  # a torch without FlexAttention: SDPA only
    BlockMask = create_block_mask = flex_attention = None

ATTENTION_SETTINGS = ("auto", "sdpa", "flex")
TREE_FLEX = "arclight_tree_flex"
BLOCK = 128  # FlexAttention's default block size; per-node tensors are padded to a multiple of it


def flex_trains_on(device: torch.device) -> bool:
    """Whether FlexAttention's forward and backward run on ``device`` (CUDA; not CPU in torch 2.13)."""
    return flex_attention is not None and device.type == "cuda"


def choose_attention(setting: str, *, device: torch.device, training: bool = True) -> str:
    """The tree-attention backend for ``trainer.attention``: auto is flex where it trains (CUDA), else sdpa."""
    if setting not in ATTENTION_SETTINGS:
        raise ValueError(f"trainer.attention must be one of {ATTENTION_SETTINGS}, found {setting!r}")
    if setting == "sdpa":
        return "sdpa"
    if setting == "auto":
        return "flex" if flex_trains_on(device) else "sdpa"
    if flex_attention is None:
        raise ValueError(f"trainer.attention=flex needs torch.nn.attention.flex_attention, which torch "
                         f"{torch.__version__} lacks; set trainer.attention=auto or sdpa")
    if training and not flex_trains_on(device):
        raise ValueError(f"trainer.attention=flex cannot train on {device.type}: FlexAttention has no backward "
                         f"there in torch {torch.__version__} (it runs on CUDA); set trainer.attention=auto or sdpa")
    return "flex"


def tree_block_mask(parents: np.ndarray, *, device: torch.device) -> "BlockMask":
    """FlexAttention's block mask of a packed tree (``parents`` of each node, -1 for a root)."""
    n = int(parents.shape[0])
    return create_block_mask(tree_mask_mod(parents, device=device), None, None, n, n, device=device,
                             BLOCK_SIZE=BLOCK, _compile=device.type == "cuda")


def tree_mask_mod(parents: np.ndarray, *, device: torch.device):
    """FlexAttention mask function of a packed tree: query q sees key k when k is q or one of its ancestors.

    Nodes come in creation order, parents before children, so the tree splits into *runs* of
    consecutive nodes, each the child of the one before. A node's ancestors are the earlier nodes of
    its own run and, in each run its path passes through, the nodes up to where it leaves that run:
    ``reach[run of q, run of k]`` holds that last node (-1 for a run off the path). The mask
    function reads a per-node tensor and that table: ``k <= q and k <= reach[run[q], run[k]]``.
    """
    n = int(parents.shape[0])
    starts = parents != np.arange(n) - 1  # a node whose parent is not the node before it starts a run
    starts[:1] = True
    run = np.cumsum(starts) - 1
    runs = int(run[-1]) + 1 if n else 0
    reach = np.full((runs, runs), -1, dtype=np.int64)
    for r, first in enumerate(np.flatnonzero(starts)):
        parent = parents[first]
        if parent >= 0:
            reach[r] = reach[run[parent]]
            reach[r, run[parent]] = parent
        reach[r, r] = n  # the run's own nodes up to q itself (k <= q bounds them)
    padded = -(-max(n, 1) // BLOCK) * BLOCK  # mask functions may be evaluated past n inside the last block
    run_t = torch.zeros(padded, dtype=torch.int64)
    run_t[:n] = torch.from_numpy(run)
    run_t, reach_t = run_t.to(device), torch.from_numpy(reach).to(device)

    def ancestor_or_self(b, h, q_idx, kv_idx):
        return (kv_idx <= q_idx) & (kv_idx <= reach_t[run_t[q_idx], run_t[kv_idx]])

    return ancestor_or_self


@functools.cache
def _flex_kernel(device_type: str):
    """flex_attention compiled (its fused kernel) on CUDA; eager elsewhere (forward only, unfused)."""
    return torch.compile(flex_attention) if device_type == "cuda" else flex_attention


def flex_or_sdpa_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                           attention_mask, scaling: float | None = None, dropout: float = 0.0, **kwargs):
    """transformers attention function: FlexAttention for a ``BlockMask`` (the tree), SDPA for anything else."""
    if not isinstance(attention_mask, BlockMask):
        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout,
                                      **kwargs)
    if dropout > 0:
        raise ValueError(f"tree FlexAttention takes no attention dropout, found {dropout}")
    group = query.shape[1] // key.shape[1]
    if group & (group - 1):  # FlexAttention's GQA wants a power-of-two group (heads 9/3, 12/2, 28/4): share K/V out
        key, value = key.repeat_interleave(group, dim=1), value.repeat_interleave(group, dim=1)
    out = _flex_kernel(query.device.type)(query, key, value, block_mask=attention_mask, scale=scaling,
                                          enable_gqa=key.shape[1] != query.shape[1])
    return out.transpose(1, 2).contiguous(), None


AttentionInterface.register(TREE_FLEX, flex_or_sdpa_attention)
AttentionMaskInterface.register(TREE_FLEX, sdpa_mask)


def prepare_attention(model: torch.nn.Module, setting: str, *, device: torch.device) -> str:
    """Choose the tree attention for ``trainer.attention`` and ``model``, switch the model to it, return sdpa|flex.

    FlexAttention stands in for the sdpa kernel only: a model on eager or flash kernels keeps sdpa
    under auto (its shared-prefix forward is as before) and fails under flex.
    """
    backend = choose_attention(setting, device=device)
    kernel = _base(model).config._attn_implementation
    if backend == "flex" and kernel not in ("sdpa", TREE_FLEX):
        if setting == "flex":
            raise ValueError(f"trainer.attention=flex needs the model's sdpa attention kernel, found {kernel!r}; "
                             "set trainer.attention=auto or sdpa")
        return "sdpa"
    if backend == "flex":
        use_flex(model)
    return backend


def _base(model: torch.nn.Module) -> torch.nn.Module:
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def use_flex(model: torch.nn.Module) -> None:
    """Let ``model`` (a transformers model, or PEFT around one) take block masks; other masks still go to SDPA."""
    inner = _base(model)
    current = inner.config._attn_implementation
    if current == TREE_FLEX:
        return
    if current != "sdpa":
        raise ValueError(f"FlexAttention for the shared-prefix forward replaces the model's sdpa kernel, "
                         f"found attn_implementation {current!r}")
    inner.config._attn_implementation = TREE_FLEX
