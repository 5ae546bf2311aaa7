"""SFT throughput: trl's SFTTrainer vs Arclight's own trainer step, on the same recorded calls.

The calls are an SFT epoch's kept triplets read from a project's lake (``--project``, e.g. a multi-hop warm start of
``examples/rag/multihop.py``: worked-example prompts of ~600 tokens that every call of a rollout shares, replies of
~20 tokens). Both train the same LoRA from the same base model, fp32 on CPU, at the same learning rate:

- trl: ``trl_sft``, as ``lightning_core/trainer/sft.py`` ran it until this change (``SFTTrainer``, ``completion_only_loss``, ``micro_batch_size``
  calls per optimizer step, activation checkpointing off);
- arclight: ``sft.plan_sft_steps`` + ``grpo.train_grpo``: each call's advantage 1 and no behaviour logprobs, so the
  clipped surrogate's gradient is the token-mean negative log-likelihood's; the same number of calls per step; the
  calls of a step packed into one shared-prefix forward where that encodes fewer tokens (``--shared-prefix``).

It reports seconds per call and the final mean loss of each (same data, same order is not guaranteed: the loss
tells that both learn, not that they match step for step).

    .venv/bin/python benchmarks/sft_bench.py --project examples/rag/.arclight/measure/multihop_sft-<stamp> --calls 48
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from lightning_core import analyst  # noqa: E402
from lightning_core.trainer.batches import make_samples  # noqa: E402
from lightning_core.trainer.sft import select_sft_rows  # noqa: E402


def kept_calls(project: Path, *, epoch: int, min_reward: float, calls: int) -> list:
    con = analyst.connect(project / ".arclight" / "lake")
    result = con.execute("SELECT * FROM triplets WHERE epoch = ? AND policy = 'researcher' "
                         "AND run_id IN (SELECT run_id FROM rollouts WHERE mode = 'train') ORDER BY rollout_id, turn_index",
                         [epoch])
    columns = [d[0] for d in result.description]
    rows = [dict(zip(columns, row)) for row in result.fetchall()]
    picked = select_sft_rows(rows, min_reward=min_reward, top_fraction=None)
    samples, _ = make_samples(picked, max_prompt_length=4096, max_response_length=512, use_recorded_logprobs=False,
                              keep_zero_advantage=True)
    return samples[:calls]


def model(base: Path):
    from lightning_core.trainer.policy_model import load_policy_model

    torch.manual_seed(0)
    return load_policy_model(str(base), finetune="lora", device=torch.device("cpu"), bf16=False, lora_r=16,
                             lora_alpha=32, lora_dropout=0.0, lora_target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                             parent_adapter_dir=None, gradient_checkpointing=False)


def trl_sft(
    model: torch.nn.Module,
    samples: list,
    *,
    tokenizer,
    learning_rate: float,
    weight_decay: float,
    micro_batch_size: int,
    epochs: float,
    max_grad_norm: float,
    max_length: int,
    seed: int,
    bf16: bool,
    device: torch.device,
    activation_checkpointing: bool = False,
) -> list[dict[str, float]]:
    """Fine-tune ``model`` in place on the samples' response tokens; return trl's per-step logs. (What
    ``lightning_core/trainer/sft.py`` ran until the trainer's own step replaced it.)"""
    from datasets import Dataset
    from datasets.utils import disable_progress_bars
    from transformers import PrinterCallback
    from trl import SFTConfig, SFTTrainer

    disable_progress_bars()  # SFTTrainer's dataset passes ("Dropping fully masked examples ...") drew bars in the log

    dataset = Dataset.from_list([
        {"input_ids": s.prompt_ids + s.response_ids,
         "completion_mask": [0] * len(s.prompt_ids) + [1] * len(s.response_ids)}
        for s in samples
    ])
    with tempfile.TemporaryDirectory(prefix="arclight-sft-") as out:
        args = SFTConfig(
            output_dir=out, per_device_train_batch_size=micro_batch_size, learning_rate=learning_rate,
            weight_decay=weight_decay, num_train_epochs=epochs, max_grad_norm=max_grad_norm, max_length=max_length,
            completion_only_loss=True, seed=seed, data_seed=seed, logging_steps=1, report_to="none",
            save_strategy="no", bf16=bf16, use_cpu=device.type == "cpu", lr_scheduler_type="constant",
            disable_tqdm=True, dataloader_num_workers=0,
            # trl's own default is on (every forward pass computed twice); the config's setting decides
            activation_checkpointing=activation_checkpointing,
        )
        trainer = SFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer)
        trainer.remove_callback(PrinterCallback)  # with tqdm off it printed every step's log dict; the caller logs them
        trainer.train()
        return [h for h in trainer.state.log_history if "loss" in h]


def run_trl(base: Path, samples, *, micro: int, lr: float, checkpointing: bool = False) -> dict:
    from transformers import AutoTokenizer

    m = model(base)
    started = time.perf_counter()
    logs = trl_sft(m, samples, tokenizer=AutoTokenizer.from_pretrained(str(base)), learning_rate=lr,
                     weight_decay=0.0, micro_batch_size=micro, epochs=1.0, max_grad_norm=1.0, max_length=4608, seed=0,
                     bf16=False, device=torch.device("cpu"), activation_checkpointing=checkpointing)
    wall = time.perf_counter() - started
    return {"wall_s": wall, "steps": len(logs), "last_loss": logs[-1]["loss"]}


def run_arclight(base: Path, samples, *, micro: int, lr: float, shared_prefix: str) -> dict:
    from lightning_core.trainer.grpo import train_grpo
    from lightning_core.trainer.sft import plan_sft_steps
    from lightning_core.trainer.tree_attention import prepare_attention

    m = model(base)
    attention = prepare_attention(m, "auto", device=torch.device("cpu"))
    started = time.perf_counter()
    steps = plan_sft_steps(samples, calls_per_step=micro, passes=1.0, seed=0, shared_prefix=shared_prefix,
                           micro_batch_tokens=2048)
    optimizer = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    logs = train_grpo(m, steps, optimizer=optimizer, epsilon_low=0.2, epsilon_high=0.2, beta=0.0, max_grad_norm=1.0,
                      device=torch.device("cpu"), autocast_dtype=None, reference=None, pad_token_id=0,
                      attention=attention)
    wall = time.perf_counter() - started
    return {"wall_s": wall, "steps": len(logs), "last_loss": logs[-1]["nll"],
            "shared_prefix_steps": sum(s.shared_prefix for s in steps), "encoded_tokens": sum(s["encoded_tokens"] for s in logs)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--project", type=Path, required=True, help="a measured project with an SFT epoch in its lake")
    ap.add_argument("--epoch", type=int, default=0)
    ap.add_argument("--min-reward", type=float, default=0.6)
    ap.add_argument("--calls", type=int, default=48)
    ap.add_argument("--micro", type=int, default=4)
    ap.add_argument("--lr", type=float, default=6.25e-4)
    ap.add_argument("--model", type=Path, default=REPO / "models" / "SmolLM2-135M-Instruct")
    ap.add_argument("--only", choices=["trl", "arclight"])
    ap.add_argument("--trl-checkpointing", action="store_true",
                    help="also run trl with activation checkpointing on (its default, what SFT ran before 98c9703)")
    args = ap.parse_args()
    samples = kept_calls(args.project, epoch=args.epoch, min_reward=args.min_reward, calls=args.calls)
    tokens = sum(s.tokens for s in samples)
    result = {"calls": len(samples), "tokens": tokens, "threads": torch.get_num_threads(),
              "uptime_before": subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()}
    if args.only != "arclight":
        result["trl"] = run_trl(args.model, samples, micro=args.micro, lr=args.lr)
        if args.trl_checkpointing:
            result["trl_checkpointing"] = run_trl(args.model, samples, micro=args.micro, lr=args.lr, checkpointing=True)
    if args.only != "trl":
        result["arclight_plain"] = run_arclight(args.model, samples, micro=args.micro, lr=args.lr, shared_prefix="off")
        result["arclight_shared"] = run_arclight(args.model, samples, micro=args.micro, lr=args.lr, shared_prefix="on")
    result["uptime_after"] = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    for name in ("trl", "trl_checkpointing", "arclight_plain", "arclight_shared"):
        if name in result:
            r = result[name]
            print(f"{name:16s} {r['wall_s']:7.1f} s  {r['wall_s'] / len(samples):5.2f} s/call  {r['steps']} steps  "
                  f"last loss {r['last_loss']:.3f}")
    print(json.dumps(result, default=lambda v: None if isinstance(v, float) and math.isnan(v) else v))


if __name__ == "__main__":
    main()
