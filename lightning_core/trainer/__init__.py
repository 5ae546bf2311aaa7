"""Training of policies from triplets: GRPO (default) or SFT, LoRA (default) or full weights."""

from lightning_core.trainer.train import TrainResult, train_policies, train_policy

__all__ = ["TrainResult", "train_policies", "train_policy"]
