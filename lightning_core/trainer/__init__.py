"""Training of policies from triplets: GRPO (default) or SFT, LoRA (default) or full weights.

``train_policy``/``train_policies`` (which need MLflow and the catalog) load on first use, so the
GRPO step itself (``batches``, ``grpo``, ``prefix_tree``, ``policy_model``) imports with torch,
transformers, peft and trl alone, e.g. on a GPU machine that runs only the trainer.
"""

from __future__ import annotations

from typing import Any

__all__ = ["TrainResult", "train_policies", "train_policy"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from lightning_core.trainer import train

        return getattr(train, name)
    raise AttributeError(f"module 'lightning_core.trainer' has no attribute {name!r}")
