"""Training throughput: Arclight's GRPO step vs trl's GRPOTrainer fed the same stored samples.

Both train the same LoRA (r=16, alpha=32 on q,k,v,o_proj; AdamW lr 5e-4; grad clip 1.0; beta 0;
fp32 on CPU, bf16 autocast on GPU) on the same samples: G groups x N samples, prompt P tokens,
response C tokens, one optimizer step per generation batch, micro-batch M. trl gets the samples
through ``rollout_func`` (its documented hook for external rollouts) and a reward function
returning the stored rewards; it recomputes group advantages itself (same values here).
tokens/s = (prompt + response tokens of one optimizer step) / wall time of the step, median over
the timed steps after one warm-up step. Arclight runs twice: plain padded micro-batches and the
shared-prefix forward (one group's prefix tree per packed micro-batch, attention per
``--attention``: auto is FlexAttention on CUDA, SDPA on CPU). Peak memory is
``torch.cuda.max_memory_allocated`` over each trainer's run, above what was allocated when it began (n/a on CPU); MFU is
4 x parameters x tokens/s over the device's dense bf16 peak (n/a on CPU) -- for the shared-prefix
forward an *effective* MFU, since it encodes fewer tokens than it is credited with.

``--shape`` builds random weights of a real model's shape (config only, no download) and takes
the issue-42 sample sizes of that shape (groups x size, prompt + response); the size flags
override them.

    python benchmarks/trainer_bench.py                    # SmolLM2-135M shape, the small default batch
    python benchmarks/trainer_bench.py --shape qwen2.5-1.5b   # on a GPU: 8 x 8, 512 + 256
    python benchmarks/trainer_bench.py --model models/SmolLM2-135M-Instruct
    python benchmarks/trainer_bench.py --tiny --steps 2   # smoke test
"""

from __future__ import annotations

import argparse
import gc
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

# Shapes of the published config.json of each model (architecture, hidden, layers, heads, kv heads,
# intermediate, vocab, tied embeddings, rope theta), and issue 42's samples: groups x size, prompt + response.
SHAPES = {
    "smollm2-135m": dict(arch="llama", hidden=576, layers=30, heads=9, kv_heads=3, intermediate=1536, vocab=49152,
                         tied=True, rope_theta=100000.0, samples=(8, 8, 512, 256)),      # HuggingFaceTB/SmolLM2-135M
    "qwen2.5-1.5b": dict(arch="qwen2", hidden=1536, layers=28, heads=12, kv_heads=2, intermediate=8960, vocab=151936,
                         tied=True, rope_theta=1000000.0, samples=(8, 8, 512, 256)),     # Qwen/Qwen2.5-1.5B
    "llama-3.2-3b": dict(arch="llama", hidden=3072, layers=28, heads=24, kv_heads=8, intermediate=8192, vocab=128256,
                         tied=True, rope_theta=500000.0, samples=(8, 8, 2048, 512)),     # meta-llama/Llama-3.2-3B
    "qwen2.5-7b": dict(arch="qwen2", hidden=3584, layers=28, heads=28, kv_heads=4, intermediate=18944, vocab=152064,
                       tied=False, rope_theta=1000000.0, samples=(4, 8, 1024, 256)),     # Qwen/Qwen2.5-7B
}
# Dense bf16 peak FLOP/s by device name (SXM parts); --peak-tflops overrides.
BF16_PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10G": 70.0, "L4": 121.0}


def model_config(shape: str | None, *, tiny: bool):
    """The transformers config of ``shape`` (or a 2-layer toy Llama)."""
    from transformers import LlamaConfig, Qwen2Config

    if tiny:
        return LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048)
    s = SHAPES[shape or "smollm2-135m"]
    cls = Qwen2Config if s["arch"] == "qwen2" else LlamaConfig
    return cls(vocab_size=s["vocab"], hidden_size=s["hidden"], intermediate_size=s["intermediate"],
               num_hidden_layers=s["layers"], num_attention_heads=s["heads"], num_key_value_heads=s["kv_heads"],
               max_position_embeddings=32768, rope_theta=s["rope_theta"], rms_norm_eps=1e-5 if s["arch"] == "llama" else 1e-6,
               tie_word_embeddings=s["tied"])


def build_model(out: Path, *, tiny: bool, shape: str | None = None, device: torch.device = torch.device("cpu")) -> Path:
    """A random model of ``shape`` (SmolLM2-135M's by default, or a tiny one), plus a word-level tokenizer.

    On a GPU the weights are drawn there and saved in bf16 (a 7B shape is 15 GB, not 30)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

    torch.manual_seed(0)
    cfg = model_config(shape, tiny=tiny)
    cfg.pad_token_id, cfg.eos_token_id, cfg.bos_token_id = 0, 1, 2
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(cfg)
    if device.type == "cuda":
        model = model.to(torch.bfloat16)
    model.save_pretrained(out)
    del model
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


def reset_peak(device: torch.device) -> int:
    """Start a run's peak-memory count; return the bytes still allocated before it (0 on CPU).

    trl's trainer and model hold each other in reference cycles, so its model's weights stay on the GPU after
    ``del`` until a garbage collection: without the collection here, the runs after trl's counted its weights in
    their peaks (on an H200, the 7B plain step showed 80.0 GB; after a collection it starts from 0.1 GB and peaks
    at 65.7 GB, trl's 65.6)."""
    if device.type != "cuda":
        return 0
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    return torch.cuda.memory_allocated(device)


def peak_gb(device: torch.device, baseline: int) -> float | None:
    """GPU memory allocated at most since ``reset_peak``, above its ``baseline``; None on CPU."""
    return (torch.cuda.max_memory_allocated(device) - baseline) / 2**30 if device.type == "cuda" else None


def bench_arclight(model_dir: Path, rows, *, micro: int, steps: int, device: torch.device, shared_prefix: str,
                   micro_tokens: int, attention: str, gradient_checkpointing: bool) -> dict:
    from lightning_core.trainer.batches import make_samples as to_samples, plan_steps
    from lightning_core.trainer.grpo import train_grpo
    from lightning_core.trainer.policy_model import autocast_dtype, load_policy_model, seed_everything
    from lightning_core.trainer.tree_attention import prepare_attention

    baseline = reset_peak(device)
    seed_everything(0)
    amp = autocast_dtype("auto", device)
    model = load_policy_model(model_dir, finetune="lora", device=device, bf16=amp is not None, lora_r=LORA["r"],
                              lora_alpha=LORA["alpha"], lora_dropout=0.0, lora_target_modules=LORA["targets"],
                              gradient_checkpointing=gradient_checkpointing)
    backend = prepare_attention(model, attention, device=device) if shared_prefix == "on" else "sdpa"
    samples, _ = to_samples(rows, max_prompt_length=1 << 16, max_response_length=1 << 16, use_recorded_logprobs=False)
    plan = plan_steps(samples, tokens_per_step=10**9, micro_batch_size=micro, normalization="sequence", seed=0,
                      shared_prefix=shared_prefix, micro_batch_tokens=micro_tokens)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-4)
    history = train_grpo(model, plan, optimizer=opt, epsilon_low=0.2, epsilon_high=0.2, beta=0.0, max_grad_norm=1.0,
                         device=device, autocast_dtype=amp, passes=steps + 1, attention=backend)
    times = [h["step_time_s"] for h in history[1:]]
    tokens = history[0]["step_tokens"]
    result = {"step_s": statistics.median(times), "tokens_per_step": tokens,
              "tokens_per_s": tokens / statistics.median(times), "encoded_tokens": history[0]["encoded_tokens"],
              "attention": backend, "peak_memory_gb": peak_gb(device, baseline),
              "resident_before_gb": baseline / 2**30}
    del model, opt
    return result


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

    baseline = reset_peak(device)
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
    result = {"step_s": statistics.median(times), "tokens_per_step": tokens,
              "tokens_per_s": tokens / statistics.median(times), "peak_memory_gb": peak_gb(device, baseline),
              "resident_before_gb": baseline / 2**30}
    del trainer, model
    return result


def bf16_peak_flops(device: torch.device, override_tflops: float | None) -> float | None:
    """The device's dense bf16 peak in FLOP/s, or None (CPU, or a GPU not in the table and no override)."""
    if override_tflops:
        return override_tflops * 1e12
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((t * 1e12 for key, t in BF16_PEAK_TFLOPS.items() if key in name), None)


def base_params(model_dir: Path) -> int:
    """Parameters of the base model (tied embeddings once), built on the meta device."""
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(str(model_dir)))
    return sum(p.numel() for p in model.parameters())


def table(result: dict) -> str:
    """The side-by-side rows: tokens/s, step time, peak memory, MFU, speed against trl."""
    trl_tps = result.get("trl", {}).get("tokens_per_s")
    lines = ["| trainer | tokens/s | step s | peak memory GB | MFU | vs trl | tokens encoded |", "|---|---|---|---|---|---|---|"]
    for name in ("trl", "arclight_plain", "arclight_shared"):
        r = result.get(name)
        if r is None:
            continue
        mem = f"{r['peak_memory_gb']:.1f}" if r.get("peak_memory_gb") is not None else "n/a"
        mfu = f"{100 * r['mfu']:.1f}%" if r.get("mfu") is not None else "n/a"
        ratio = f"{r['tokens_per_s'] / trl_tps:.2f}x" if trl_tps else "n/a"
        enc = f"{r['encoded_tokens'] / r['tokens_per_step']:.0%}" if "encoded_tokens" in r else "100%"
        label = name if name == "trl" else f"{name} ({r['attention']})"
        lines.append(f"| {label} | {r['tokens_per_s']:,.0f} | {r['step_s']:.3f} | {mem} | {mfu} | {ratio} | {enc} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, help="HF model folder (default: random weights of --shape)")
    ap.add_argument("--shape", choices=sorted(SHAPES), help="random weights of this model's shape, with its issue-42 "
                    "samples (default shape smollm2-135m with the small default batch below)")
    ap.add_argument("--tiny", action="store_true", help="a 2-layer toy model (smoke test)")
    ap.add_argument("--groups", type=int, help="default 4, or the shape's")
    ap.add_argument("--per-group", type=int, help="default 4, or the shape's")
    ap.add_argument("--prompt-len", type=int, help="default 128, or the shape's")
    ap.add_argument("--response-len", type=int, help="default 64, or the shape's")
    ap.add_argument("--micro", type=int, default=8, help="samples per plain micro-batch (and trl's per-device batch)")
    ap.add_argument("--micro-tokens", type=int, help="shared-prefix distinct tokens per packed micro-batch "
                    "(default: one group's tree, prompt + per-group x response)")
    ap.add_argument("--steps", type=int, default=3, help="timed optimizer steps (after one warm-up)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch default)")
    ap.add_argument("--only", choices=["arclight", "trl"])
    ap.add_argument("--shared-prefix", choices=["off", "on", "both"], default="both", help="Arclight's forwards to run")
    ap.add_argument("--attention", choices=["auto", "sdpa", "flex"], default="auto",
                    help="shared-prefix attention (trainer.attention); flex needs CUDA")
    ap.add_argument("--gradient-checkpointing", action="store_true", help="on in both trainers")
    ap.add_argument("--trl-gradient-checkpointing", action="store_true", help="trl's default (off here, like Arclight)")
    ap.add_argument("--peak-tflops", type=float, help="the device's dense bf16 peak for MFU (default: by GPU name)")
    ap.add_argument("--json", type=Path, help="also append the result to this file, one JSON object per line")
    ap.add_argument("--label", help="a name for the run, stored in the result")
    a = ap.parse_args()
    groups, per_group, prompt_len, response_len = SHAPES[a.shape]["samples"] if a.shape else (4, 4, 128, 64)
    groups, per_group = a.groups or groups, a.per_group or per_group
    prompt_len, response_len = a.prompt_len or prompt_len, a.response_len or response_len
    micro_tokens = a.micro_tokens or prompt_len + per_group * response_len
    if a.threads:
        torch.set_num_threads(a.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = a.model or build_model(Path(tmp) / "model", tiny=a.tiny, shape=a.shape, device=device)
        from transformers import AutoConfig

        vocab = AutoConfig.from_pretrained(str(model_dir)).vocab_size
        rows = make_samples(groups=groups, per_group=per_group, prompt_len=prompt_len, response_len=response_len,
                            vocab=vocab)
        params = base_params(model_dir)
        peak = bf16_peak_flops(device, a.peak_tflops)
        result = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                  "torch_threads": torch.get_num_threads(),
                  "model": str(a.model or ("tiny" if a.tiny else f"{a.shape or 'smollm2-135m'} shape, random weights")),
                  "params": params, "bf16_peak_tflops": peak / 1e12 if peak else None,
                  "samples": len(rows), "groups": groups, "per_group": per_group, "prompt_len": prompt_len,
                  "response_len": response_len, "micro": a.micro, "micro_tokens": micro_tokens,
                  "gradient_checkpointing": a.gradient_checkpointing}
        modes = {"off": ["off"], "on": ["on"], "both": ["off", "on"]}[a.shared_prefix]
        if a.only in (None, "trl"):
            result["trl"] = bench_trl(model_dir, rows, micro=a.micro, per_group=per_group, steps=a.steps, device=device,
                                      gradient_checkpointing=a.trl_gradient_checkpointing or a.gradient_checkpointing)
            print("trl", json.dumps(result["trl"]), file=sys.stderr, flush=True)
        if a.only in (None, "arclight"):
            for mode in modes:
                name = "arclight_plain" if mode == "off" else "arclight_shared"
                result[name] = bench_arclight(model_dir, rows, micro=a.micro, steps=a.steps, device=device,
                                              shared_prefix=mode, micro_tokens=micro_tokens, attention=a.attention,
                                              gradient_checkpointing=a.gradient_checkpointing)
                print(name, json.dumps(result[name]), file=sys.stderr, flush=True)
        for name in ("trl", "arclight_plain", "arclight_shared"):
            if name in result:
                result[name]["mfu"] = 4 * params * result[name]["tokens_per_s"] / peak if peak else None
        if "trl" in result:
            for name in ("arclight_plain", "arclight_shared"):
                if name in result:
                    result[f"speedup_{name.removeprefix('arclight_')}"] = (result[name]["tokens_per_s"]
                                                                           / result["trl"]["tokens_per_s"])
    if a.label:
        result["label"] = a.label
    if a.json:
        with a.json.open("a") as f:
            f.write(json.dumps(result) + "\n")
    print(json.dumps(result, indent=2))
    print(table(result))


if __name__ == "__main__":
    main()
