"""Where does the gap between vLLM's recorded logprobs and the trainer's come from when both compute in fp32? (issue 56)

The retrieval example's fp32-fp32 runs showed a gap of ~0.008 (mean |trainer - vLLM| logprob at the first step),
where the tiny-model test measures 7e-7. This script takes one run's calls and separates the two causes a gap can
have:

1. numerics: vLLM asked for the logprobs of the very same token ids as prompt logprobs (``prompt_logprobs``: the
   same forward pass, no sampling) against the trainer's recomputation (``--vllm``);
2. what the sampler saw: the recorded logprobs of the sampled tokens against the trainer's, signed. A grammar
   (``tool_choice="required"``, a JSON schema) masks the logits before vLLM's sampler computes even its "raw"
   logprobs, so the recorded logprob is the token's share of the allowed tokens only: never below the trainer's
   (which spreads the probability over the whole vocabulary), and above it by -log P(allowed tokens).

    .venv/bin/python benchmarks/logprob_mask.py                      # the first fp32 run in logprob_gap.jsonl
    .venv/bin/python benchmarks/logprob_mask.py --project DIR --config examples/rag/config.yaml --vllm
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

INDEX = REPO / "benchmarks" / "results" / "logprob_gap.jsonl"


def first_fp32_run() -> tuple[str, str]:
    """The project folder and config of the first float32 run on record."""
    from benchmarks.logprob_gap import EXAMPLES

    for line in INDEX.read_text().splitlines():
        record = json.loads(line)
        if record["cell"].startswith("float32:"):
            return record["project"], EXAMPLES[record["example"]][0]
    raise SystemExit(f"no float32 run in {INDEX}: run benchmarks/logprob_gap.py --cells float32:ppo first")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--project", help="a run's project folder (default: the first fp32 run in logprob_gap.jsonl)")
    parser.add_argument("--config", help="its config (with --project)")
    parser.add_argument("--calls", type=int, default=60, help="calls of epoch 0 to recompute")
    parser.add_argument("--vllm", action="store_true", help="also ask a fresh fp32 vLLM for the same ids' prompt logprobs")
    args = parser.parse_args()
    project, config_path = (args.project, args.config) if args.project else first_fp32_run()

    import torch
    from transformers import AutoModelForCausalLM

    from lightning_core.config import load_config
    from lightning_core.serving.vllm import model_dir
    from lightning_core.store.catalog import Catalog

    cfg = load_config(REPO / config_path, overrides=[f"project_dir={project}"])
    with Catalog.from_config(cfg).read() as con:
        calls = con.execute("SELECT prompt_token_ids, response_token_ids, response_logprobs FROM triplets "
                            "WHERE epoch = 0 ORDER BY start_ns LIMIT ?", [args.calls]).fetchall()
    base = model_dir(cfg)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()

    def trainer_logprobs(prompt: list[int], response: list[int]) -> torch.Tensor:
        with torch.no_grad():
            logits = model(torch.tensor([prompt + response])).logits[0, len(prompt) - 1:-1].float()
        return torch.log_softmax(logits, -1).gather(-1, torch.tensor(response)[:, None])[:, 0]

    print(f"run {project} (config {config_path}), {len(calls)} calls of epoch 0, base model {base}; "
          f"uptime: {subprocess.run(['uptime'], capture_output=True, text=True).stdout.strip()}")
    signed = torch.cat([torch.tensor(lps) - trainer_logprobs(list(p), list(r)) for p, r, lps in calls])
    print(f"recorded - trainer over {len(signed)} sampled tokens: min {signed.min():+.6f}, mean {signed.mean():+.6f}, "
          f"max {signed.max():+.6f}; share below -1e-4: {(signed < -1e-4).float().mean():.2%}, "
          f"above +1e-3: {(signed > 1e-3).float().mean():.1%}")
    if args.vllm:
        import httpx

        from lightning_core.serving.vllm import start_vllm

        scfg = load_config(None, overrides=[f"project_dir={tempfile.mkdtemp()}", f"model.path={base}",
                                            "serving.dtype=float32", "serving.redeploy=merged", "serving.port=0",
                                            f"serving.max_model_len={cfg.serving.max_model_len}"])
        server = start_vllm(scfg)
        try:
            gaps = []
            for prompt, response, _ in calls[:8]:
                ids = list(prompt) + list(response)
                answer = httpx.post(f"{server.url}/v1/completions", timeout=300, json={
                    "model": scfg.model.served_name, "prompt": ids, "max_tokens": 1, "prompt_logprobs": 0}).json()
                entries = answer["choices"][0]["prompt_logprobs"][-len(response):]
                vllm = torch.tensor([e[str(t)]["logprob"] for e, t in zip(entries, response)])
                gaps.append((vllm - trainer_logprobs(list(prompt), list(response))).abs().mean().item())
            print(f"vLLM fp32 prompt logprobs of the same ids - trainer, mean |gap| per call over {len(gaps)} calls: "
                  f"mean {statistics.mean(gaps):.2e}, max {max(gaps):.2e}")
        finally:
            server.stop()


if __name__ == "__main__":
    main()
