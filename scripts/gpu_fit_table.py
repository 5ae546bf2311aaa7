"""Print the two tables of docs/gpu.md's "What fits (an estimate, not a measurement)" from ``trainer_memory``.

    .venv/bin/python scripts/gpu_fit_table.py

Computed, not measured. The assumptions:

- shapes: SmolLM2-135M, Qwen2.5-1.5B, Llama-3.2-3B, Qwen2.5-7B, Llama-3.1-8B, from the values of their published
  config.json (benchmarks/trainer_bench.py's SHAPES for the first four; Llama-3.1-8B written down here);
- LoRA r 16 on q_proj, k_proj, v_proj, o_proj, bf16 base weights, sequences of 2048 tokens (plain forward);
- logits: 512 of each sequence's 2048 tokens are response tokens, and trainer.logits_chunk_tokens is 1024 (its
  default), so the logits term holds min(micro-batch x 512, 1024) tokens' full-vocabulary fp32 logits and gradient;
- memory in GiB; devices of 24, 40 and 80 GiB; *alone* = the trainer's estimate plus the 2 GiB margin fits;
  *shared* = it also leaves vLLM 1.2 x its bf16 weights plus 1 GiB of KV cache; micro-batches are tried up to 64
  (shown as 64+ when 64 fits); 0 = does not fit.
"""

from __future__ import annotations

import argparse

from lightning_core.common.gpu import GIB, MARGIN_BYTES, ModelShape, trainer_memory

# name: (hidden, layers, heads, kv heads, intermediate, vocab, tied embeddings), from each published config.json
SHAPES = {
    "SmolLM2-135M": (576, 30, 9, 3, 1536, 49152, True),        # HuggingFaceTB/SmolLM2-135M
    "Qwen2.5-1.5B": (1536, 28, 12, 2, 8960, 151936, True),     # Qwen/Qwen2.5-1.5B
    "Llama-3.2-3B": (3072, 28, 24, 8, 8192, 128256, True),     # meta-llama/Llama-3.2-3B
    "Qwen2.5-7B": (3584, 28, 28, 4, 18944, 152064, False),     # Qwen/Qwen2.5-7B
    "Llama-3.1-8B": (4096, 32, 32, 8, 14336, 128256, False),   # meta-llama/Llama-3.1-8B
}
SEQUENCE, RESPONSE, CHUNK = 2048, 512, 1024
DEVICES_GIB = (24, 40, 80)
VLLM_WEIGHT_FACTOR, VLLM_KV_BYTES = 1.2, 1 * GIB
MAX_MICRO_BATCH = 64


def shape_of(name: str) -> ModelShape:
    h, layers, heads, kv, i, vocab, tied = SHAPES[name]
    return ModelShape(hidden_size=h, layers=layers, heads=heads, kv_heads=kv, intermediate_size=i, vocab_size=vocab,
                      tie_embeddings=tied)


def need(shape: ModelShape, micro_batch: int, *, checkpointed: bool = False, response: int = RESPONSE,
         chunk: int = CHUNK):
    """The trainer's estimate for ``micro_batch`` sequences of SEQUENCE tokens, ``response`` of them with logits."""
    return trainer_memory(shape, micro_batch_size=micro_batch, sequence_length=SEQUENCE,
                          gradient_checkpointing=checkpointed, logits_tokens=min(micro_batch * response, chunk))


def largest_micro_batch(shape: ModelShape, device_bytes: float, *, checkpointed: bool, shared: bool, **kw) -> str:
    """The largest micro-batch (up to MAX_MICRO_BATCH, then "64+") whose estimate fits on the device."""
    room = device_bytes - MARGIN_BYTES
    if shared:
        room -= VLLM_WEIGHT_FACTOR * 2 * shape.params + VLLM_KV_BYTES
    best = 0
    for m in range(1, MAX_MICRO_BATCH + 1):
        if need(shape, m, checkpointed=checkpointed, **kw).total > room:
            break
        best = m
    return f"{best}+" if best == MAX_MICRO_BATCH else str(best)


def memory_table(**kw) -> str:
    rows = ["| shape | params | bf16 weights | trainer, micro-batch 1 | 4 | 8 | 8, checkpointed |",
            "|---|---|---|---|---|---|---|"]
    for name in SHAPES:
        shape = shape_of(name)
        totals = [need(shape, m, **kw).total for m in (1, 4, 8)] + [need(shape, 8, checkpointed=True, **kw).total]
        rows.append(f"| {name} | {shape.params / 1e9:.2f}B | {2 * shape.params / GIB:.1f} | "
                    + " | ".join(f"{t / GIB:.1f}" for t in totals) + " |")
    return "\n".join(rows)


def fit_table(**kw) -> str:
    header = " | ".join(f"{d} GB | {d} GB, checkpointed" for d in DEVICES_GIB)
    rows = [f"| shape | {header} |", "|---" * (1 + 2 * len(DEVICES_GIB)) + "|"]
    for name in SHAPES:
        shape = shape_of(name)
        cells = [" / ".join(largest_micro_batch(shape, d * GIB, checkpointed=c, shared=s, **kw) for s in (False, True))
                 for d in DEVICES_GIB for c in (False, True)]
        rows.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--response-tokens", type=int, default=RESPONSE, help="response tokens per 2048-token sequence")
    ap.add_argument("--chunk", type=int, default=CHUNK, help="trainer.logits_chunk_tokens")
    a = ap.parse_args()
    kw = {"response": a.response_tokens, "chunk": a.chunk}
    print(memory_table(**kw))
    print()
    print(fit_table(**kw))


if __name__ == "__main__":
    main()
