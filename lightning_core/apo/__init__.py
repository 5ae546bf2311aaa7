"""Prompt optimisation: beam search over a prompt resource with a critic's textual gradients; prompts as versions."""
