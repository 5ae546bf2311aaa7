"""GRPO step time on real triplets: the shared-prefix forward against the plain padded forward, side by side.

Both modes train the same LoRA (the trainer's defaults: r=16, alpha=32 on q,k,v,o_proj; AdamW) on
the same samples with the same step plan; only the micro-batch layout differs. Runs alternate
(plain, shared, plain, shared, ...) in one process so that both see the same machine state.
step time = wall time of one optimizer step over all the file's trainable triplets.

    .venv/bin/python benchmarks/prefix_bench.py                                # the committed calc triplets
    .venv/bin/python benchmarks/prefix_bench.py --triplets <lake>/triplets/run_id=<run>/epoch=3 --dtype bfloat16
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

import pyarrow.dataset as ds  # noqa: E402
import torch  # noqa: E402

DEFAULT_TRIPLETS = REPO / "benchmarks" / "data" / "calc_triplets.parquet"


def load_rows(path: Path) -> list[dict]:
    """Triplet rows from a Parquet file or a folder of them (a lake partition)."""
    columns = ["rollout_id", "group_id", "turn_index", "prompt_token_ids", "response_token_ids", "response_logprobs",
               "reward", "advantage"]
    table_root = next((p for p in [path, *path.parents] if (p / "_delta_log").is_dir()), None)
    if table_root is not None:  # a partition of the lake's triplets table: the files of its current version
        from deltalake import DeltaTable

        prefix = str(path.resolve()).rstrip("/") + "/"
        files = [f for f in DeltaTable(str(table_root)).file_uris() if f.startswith(prefix)]
        return ds.dataset(files, format="parquet").to_table(columns=columns).to_pylist()
    return ds.dataset(str(path), format="parquet").to_table(columns=columns).to_pylist()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--triplets", type=Path, default=DEFAULT_TRIPLETS)
    ap.add_argument("--model", type=Path, default=REPO / "models" / "SmolLM2-135M-Instruct")
    ap.add_argument("--random-model", action="store_true",
                    help="random weights of SmolLM2-135M's shape (where the model folder is not at hand, e.g. a GPU machine)")
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    ap.add_argument("--repeat", type=int, default=3, help="timed steps per mode (after one warm-up step each)")
    ap.add_argument("--micro", type=int, default=8, help="plain forward: triplets per micro-batch")
    ap.add_argument("--micro-tokens", type=int, default=1024, help="shared-prefix forward: distinct tokens per micro-batch")
    a = ap.parse_args()

    from lightning_core.trainer.batches import make_samples, plan_steps
    from lightning_core.trainer.grpo import train_grpo
    from lightning_core.trainer.policy_model import load_policy_model, pick_device, seed_everything

    device = pick_device("auto")
    if a.random_model:
        import tempfile

        from trainer_bench import build_model  # benchmarks/trainer_bench.py

        a.model = build_model(Path(tempfile.mkdtemp()) / "model", tiny=False)
    amp = torch.bfloat16 if a.dtype == "bfloat16" else None
    rows = load_rows(a.triplets)
    samples, _ = make_samples(rows, max_prompt_length=2048, max_response_length=1024, use_recorded_logprobs=True)
    seed_everything(0)
    model = load_policy_model(a.model, finetune="lora", device=device, bf16=amp is not None, lora_r=16, lora_alpha=32,
                              lora_dropout=0.0, lora_target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-6)
    plans = {mode: plan_steps(samples, tokens_per_step=10**9, micro_batch_size=a.micro, normalization="token", seed=0,
                              shared_prefix=mode, micro_batch_tokens=a.micro_tokens) for mode in ("off", "on")}
    times: dict[str, list[float]] = {"off": [], "on": []}
    encoded: dict[str, float] = {}
    for i in range(a.repeat + 1):
        for mode in ("off", "on"):
            t0 = time.perf_counter()
            history = train_grpo(model, plans[mode], optimizer=optimizer, epsilon_low=0.2, epsilon_high=0.2, beta=0.0,
                                 max_grad_norm=1.0, device=device, autocast_dtype=amp)
            elapsed = time.perf_counter() - t0
            encoded[mode] = history[0]["encoded_tokens"]
            if i > 0:
                times[mode].append(elapsed)
            print(f"{'warm-up' if i == 0 else f'run {i}'} {'shared' if mode == 'on' else 'plain'}: {elapsed:.2f} s",
                  file=sys.stderr, flush=True)
    plain, shared = statistics.median(times["off"]), statistics.median(times["on"])
    print(json.dumps({
        "triplets": str(a.triplets), "model": "random SmolLM2-135M shape" if a.random_model else str(a.model),
        "trainable_triplets": len(samples),
        "device": torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu", "dtype": a.dtype,
        "torch_threads": torch.get_num_threads(),
        "tokens": sum(s.tokens for s in samples), "encoded_tokens_plain": encoded["off"],
        "encoded_tokens_shared": encoded["on"],
        "plain_step_s": [round(t, 2) for t in times["off"]], "shared_step_s": [round(t, 2) for t in times["on"]],
        "speedup": round(plain / shared, 2),
    }, indent=2))


if __name__ == "__main__":
    main()
