"""Training throughput: Arclight's GRPO step vs trl's GRPOTrainer fed the same stored samples.

Both train the same LoRA (r=16, alpha=32 on q,k,v,o_proj; AdamW lr 5e-4; grad clip 1.0; beta 0;
fp32 on CPU, bf16 autocast on GPU) on the same samples: G groups x N samples, prompt P tokens,
response C tokens, one optimizer step per generation batch, micro-batch M. trl gets the samples
through ``rollout_func`` (its documented hook for external rollouts) and a reward function
returning the stored rewards; it recomputes group advantages itself (same values here).
tokens/s = (prompt + response tokens of one optimizer step) / wall time of the step, median over
the timed steps after one warm-up step.

    python benchmarks/trainer_bench.py                    # SmolLM2-135M shape, random weights
    python benchmarks/trainer_bench.py --model models/SmolLM2-135M-Instruct
    python benchmarks/trainer_bench.py --tiny --steps 2   # smoke test
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

LORA = dict(r=16, alpha=32, targets=["q_proj", "k_proj", "v_proj", "o_proj"])


def build_model(out: Path, *, tiny: bool) -> Path:
    """A random Llama with SmolLM2-135M's shape (or a tiny one), plus a word-level tokenizer."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    torch.manual_seed(0)
    if tiny:
        cfg = LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048)
    else:  # HuggingFaceTB/SmolLM2-135M-Instruct's config
        cfg = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                          num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192,
                          rope_theta=100000.0, rms_norm_eps=1e-5, tie_word_embeddings=True)
    cfg.pad_token_id, cfg.eos_token_id, cfg.bos_token_id = 0, 1, 2
    LlamaForCausalLM(cfg).save_pretrained(out)
    vocab = {"<pad>": 0, "<eos>": 1, "<bos>": 2, **{f"t{i}": i for i in range(3, cfg.vocab_size)}}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>").save_pretrained(out)
    return out


def make_samples(*, groups: int, per_group: int, prompt_len: int, response_len: int, vocab: int, seed: int = 0):
    """Stored samples: one prompt per group, per_group responses, the first rewarded."""
    rng = random.Random(seed)
    out = []
    for g in range(groups):
        prompt = [rng.randrange(3, vocab) for _ in range(prompt_len)]
        rewards = [1.0 if i == 0 else 0.0 for i in range(per_group)]
        mean = sum(rewards) / per_group
        std = (sum((r - mean) ** 2 for r in rewards) / per_group) ** 0.5
        for i in range(per_group):
            out.append({"group_id": f"g{g}", "rollout_id": f"g{g}-{i}", "prompt_token_ids": prompt,
                        "prompt_text": f"task {g}",
                        "response_token_ids": [rng.randrange(3, vocab) for _ in range(response_len)],
                        "reward": rewards[i], "advantage": (rewards[i] - mean) / (std + 1e-4)})
    return out


def bench_arclight(model_dir: Path, rows, *, micro: int, steps: int, device: torch.device) -> dict:
    from lightning_core.trainer.batches import make_samples as to_samples, plan_steps
    from lightning_core.trainer.grpo import train_grpo
    from lightning_core.trainer.policy_model import autocast_dtype, load_policy_model, seed_everything

    seed_everything(0)
    amp = autocast_dtype("auto", device)
    model = load_policy_model(model_dir, finetune="lora", device=device, bf16=amp is not None, lora_r=LORA["r"],
                              lora_alpha=LORA["alpha"], lora_dropout=0.0, lora_target_modules=LORA["targets"])
    samples, _ = to_samples(rows, max_prompt_length=4096, max_response_length=4096, use_recorded_logprobs=False)
    plan = plan_steps(samples, tokens_per_step=10**9, micro_batch_size=micro, normalization="sequence", seed=0)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-4)
    history = train_grpo(model, plan, optimizer=opt, epsilon_low=0.2, epsilon_high=0.2, beta=0.0, max_grad_norm=1.0,
                         device=device, autocast_dtype=amp, passes=steps + 1)
    times = [h["step_time_s"] for h in history[1:]]
    tokens = history[0]["step_tokens"]
    return {"step_s": statistics.median(times), "tokens_per_step": tokens, "tokens_per_s": tokens / statistics.median(times)}


def bench_trl(model_dir: Path, rows, *, micro: int, per_group: int, steps: int, device: torch.device,
              gradient_checkpointing: bool) -> dict:
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    by_prompt: dict[str, list[dict]] = {}
    for r in rows:
        by_prompt.setdefault(r["prompt_text"], []).append(r)
    served: dict[str, int] = {}

    def rollout_func(prompts, trainer):
        """Hand back the stored samples of each prompt, in order (no generation)."""
        out = {"prompt_ids": [], "completion_ids": [], "logprobs": [], "stored_reward": []}
        for p in prompts:
            i = served.get(p, 0)
            served[p] = i + 1
            s = by_prompt[p][i % per_group]
            out["prompt_ids"].append(s["prompt_token_ids"])
            out["completion_ids"].append(s["response_token_ids"])
            out["logprobs"].append([0.0] * len(s["response_token_ids"]))
            out["stored_reward"].append(s["reward"])
        return out

    def stored_reward(completions, stored_reward, **kwargs):
        return stored_reward

    class StepTimer(TrainerCallback):
        """Wall time between optimizer-step ends (on_step_begin fires per micro-batch in transformers 5)."""

        def __init__(self):
            self.ends = []

        def on_step_end(self, args, state, control, **kw):
            self.ends.append(time.perf_counter())

        @property
        def times(self):
            return [b - a for a, b in zip(self.ends, self.ends[1:])]

    total = len(rows)
    amp = device.type == "cuda"
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.bfloat16 if amp else torch.float32)
    dataset = Dataset.from_list([{"prompt": p} for p in by_prompt] * (steps + 2))
    with tempfile.TemporaryDirectory() as out:
        args = GRPOConfig(
            output_dir=out, per_device_train_batch_size=micro, gradient_accumulation_steps=total // micro,
            num_generations=per_group, max_completion_length=max(len(r["response_token_ids"]) for r in rows),
            learning_rate=5e-4, max_grad_norm=1.0, beta=0.0, loss_type="grpo", epsilon=0.2, max_steps=steps + 1,
            logging_steps=1, report_to="none", save_strategy="no", use_cpu=device.type == "cpu", bf16=amp,
            disable_tqdm=True, seed=0, shuffle_dataset=False, lr_scheduler_type="constant", warmup_steps=0,
            gradient_checkpointing=gradient_checkpointing,  # trl's default is True; Arclight's is False
        )
        timer = StepTimer()
        trainer = GRPOTrainer(
            model=model, reward_funcs=stored_reward, args=args, train_dataset=dataset,
            processing_class=AutoTokenizer.from_pretrained(str(model_dir)), rollout_func=rollout_func,
            peft_config=LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"], target_modules=LORA["targets"],
                                   lora_dropout=0.0, task_type="CAUSAL_LM"),
            callbacks=[timer],
        )
        trainer.train()
    times = timer.times  # the first step (warm-up) has no start mark: excluded
    tokens = sum(len(r["prompt_token_ids"]) + len(r["response_token_ids"]) for r in rows)
    return {"step_s": statistics.median(times), "tokens_per_step": tokens, "tokens_per_s": tokens / statistics.median(times)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, help="HF model folder (default: random SmolLM2-135M-shaped Llama)")
    ap.add_argument("--tiny", action="store_true", help="a 2-layer toy model (smoke test)")
    ap.add_argument("--groups", type=int, default=4)
    ap.add_argument("--per-group", type=int, default=4)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--response-len", type=int, default=64)
    ap.add_argument("--micro", type=int, default=8)
    ap.add_argument("--steps", type=int, default=3, help="timed optimizer steps (after one warm-up)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch default)")
    ap.add_argument("--only", choices=["arclight", "trl"])
    ap.add_argument("--trl-gradient-checkpointing", action="store_true", help="trl's default (off here, like Arclight)")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = a.model or build_model(Path(tmp) / "model", tiny=a.tiny)
        from transformers import AutoConfig

        vocab = AutoConfig.from_pretrained(str(model_dir)).vocab_size
        rows = make_samples(groups=a.groups, per_group=a.per_group, prompt_len=a.prompt_len,
                            response_len=a.response_len, vocab=vocab)
        result = {"device": str(device), "torch_threads": torch.get_num_threads(), "model": str(a.model or ("tiny" if a.tiny else "SmolLM2-135M-shape random")),
                  "samples": len(rows), "prompt_len": a.prompt_len, "response_len": a.response_len, "micro": a.micro}
        if a.only in (None, "arclight"):
            result["arclight"] = bench_arclight(model_dir, rows, micro=a.micro, steps=a.steps, device=device)
            print("arclight", json.dumps(result["arclight"]), file=sys.stderr, flush=True)
        if a.only in (None, "trl"):
            result["trl"] = bench_trl(model_dir, rows, micro=a.micro, per_group=a.per_group, steps=a.steps, device=device,
                                      gradient_checkpointing=a.trl_gradient_checkpointing)
            result["trl"]["gradient_checkpointing"] = a.trl_gradient_checkpointing
        if "arclight" in result and "trl" in result:
            result["speedup"] = result["arclight"]["tokens_per_s"] / result["trl"]["tokens_per_s"]
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
