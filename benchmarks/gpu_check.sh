#!/usr/bin/env bash
# Issue 42's GPU checks in one pass, for a lent GPU machine (its python3 has torch, transformers and peft):
#   1. the CUDA tests (tests/test_trainer_gpu.py: FlexAttention and SDPA tree logprobs and LoRA gradients
#      against the plain forward, a bf16 GRPO step);
#   2. benchmarks/trainer_bench.py --shape for the 3B and 7B shapes, the 7B shape with gradient checkpointing
#      (Arclight only: its peak memory), then the 1.5B and 135M shapes, as long as time is left.
# Usage, from the repository root, with the trl/datasets/dill/multiprocess wheels for the machine's Python in
# .whl/ (benchmarks/README.md says how to fetch them):
#   OUT=/tmp/gpu-out SECONDS_LEFT=540 bash benchmarks/gpu_check.sh
# Writes $OUT/tests.log, $OUT/bench.log (stderr) and $OUT/results.jsonl (one JSON object per trainer_bench run)
# and prints each run's table. A step is skipped when less time is left than it is expected to need.
set -uo pipefail
OUT=${OUT:-/tmp/gpu-out}
mkdir -p "$OUT"
deadline=$(( $(date +%s) + ${SECONDS_LEFT:-540} ))
left() { echo $(( deadline - $(date +%s) )); }

if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi
export TRL_EXPERIMENTAL_SILENCE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/bench.log"
python3 -c "import sys, torch, transformers, peft, trl; print('python', sys.version.split()[0], 'torch', torch.__version__,
'transformers', transformers.__version__, 'peft', peft.__version__, 'trl', trl.__version__)" | tee -a "$OUT/bench.log"

echo "== CUDA tests ($(left) s left)"
timeout 150 python3 -m pytest -q -rA --noconftest -p no:cacheprovider tests/test_trainer_gpu.py 2>&1 | tee "$OUT/tests.log" | tail -15

# name, expected seconds, trainer_bench arguments
run() {
  local name=$1 need=$2; shift 2
  if (( $(left) < need )); then echo "== $name: skipped ($(left) s left, needs about $need)"; return; fi
  echo "== $name ($(left) s left)"
  local started=$(date +%s)
  timeout $(( $(left) - 5 )) python3 benchmarks/trainer_bench.py "$@" --label "$name" --json "$OUT/results.jsonl" \
    > "$OUT/$name.out" 2>> "$OUT/bench.log"
  local rc=$?
  echo "$name: exit $rc after $(( $(date +%s) - started )) s" | tee -a "$OUT/bench.log"
  if (( rc == 0 )); then grep '^|' "$OUT/$name.out"; else tail -25 "$OUT/bench.log"; fi
  rm -f "$OUT/$name.out"
}

run llama-3.2-3b 150 --shape llama-3.2-3b --steps 2
run qwen2.5-7b 170 --shape qwen2.5-7b --steps 2
run qwen2.5-7b-checkpointed 90 --shape qwen2.5-7b --steps 2 --gradient-checkpointing --only arclight
run qwen2.5-1.5b 70 --shape qwen2.5-1.5b --steps 2
run smollm2-135m 45 --shape smollm2-135m --steps 2
echo "== done ($(left) s left)"
