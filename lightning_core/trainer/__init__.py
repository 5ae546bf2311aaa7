"""Training of policies from triplets: GRPO (default) or SFT, LoRA (default) or full weights.

``train.train_policies`` is the epoch's training stage (it reads the triplets, logs to MLflow and records the new
version). The GRPO step itself (``samples``, ``batches``, ``prefix_tree``, ``policy_model``, ``grpo``,
``collectives``, ``grpo_run``, ``distributed``) imports with torch, transformers, peft and trl alone -- neither
the catalog, MLflow nor the config -- e.g. on a GPU machine that runs only the trainer (a contract in
pyproject.toml keeps it so).
"""
