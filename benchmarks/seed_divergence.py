"""Why do two runs of one seed differ? Compare two projects' lakes call by call.

Every sampled call is seeded (the gateway derives a call's seed from the rollout's seed and what the call asks), the
tasks are drawn by a seeded generator, and the trainer seeds its LoRA init and data order. What is left can only
be numerics: the logits vLLM computes for the same prompt depend on what else is in the batch with it (which
requests run together depends on timing), and a sampled token flips where two tokens are close. This script finds
where two runs part, from their lakes:

- the tasks each epoch drew (the same, or where they part);
- for each rollout of the same (run, epoch, task, sample index) in both: its calls in order, compared by prompt and
  response token ids. The first call that differs is a *sampling* divergence when its prompt was the same token for
  token (the same input gave another output: numerics), else it follows from an earlier difference;
- at a sampling divergence, the first response token that differs and the logprob each run recorded for its own
  token there (a near tie shows as two logprobs close to log 0.5);
- the rollouts' rewards, where both have one.

    .venv/bin/python benchmarks/seed_divergence.py <project A> <project B> [--run rag-measure-s0] [--epochs 0 1]

A project is a folder with ``.arclight/lake`` (``examples/measure.py`` makes one per run). Runs of two cells of
``logprob_gap.py`` that differ only in the trainer's loss (ppo, decoupled) are two runs of one seed up to their
first training: their base evaluation and epoch 0 compare like reruns.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from lightning_core import analyst  # noqa: E402

CALLS = """
SELECT r.run_id, r.mode, r.epoch, r.task_id, r.sample_index, r.reward, s.start_ns, s.prompt_token_ids,
       s.response_token_ids, s.response_logprobs
FROM rollouts r JOIN spans s ON s.rollout_id = r.rollout_id AND s.run_id = r.run_id
WHERE r.status = 'succeeded' AND s.response_token_ids IS NOT NULL
ORDER BY r.run_id, r.epoch, r.task_id, r.sample_index, s.start_ns
"""


def load(project: Path) -> tuple[dict, dict]:
    """``project``'s rollouts: (run, mode, epoch, task, sample) -> (reward, [(prompt, response, logprobs)]), and the
    tasks each (run, epoch) drew."""
    lake = project / ".arclight" / "lake"
    if not lake.is_dir():
        sys.exit(f"error: {project} has no lake ({lake}): pass a project folder, e.g. "
                 "examples/rag/.arclight/measure/config-<stamp>")
    con = analyst.connect(lake)
    rollouts: dict[tuple, tuple[float | None, list]] = {}
    for run, mode, epoch, task, sample, reward, _, prompt, response, logprobs in con.execute(CALLS).fetchall():
        key = (run, mode, epoch, task, sample)
        rollouts.setdefault(key, (reward, []))[1].append((list(prompt or []), list(response or []), logprobs))
    drawn: dict[tuple, set] = {}
    for run, epoch, task in con.execute("SELECT DISTINCT run_id, epoch, task_id FROM rollouts").fetchall():
        drawn.setdefault((run, epoch), set()).add(task)
    return rollouts, drawn


def compare(a: list, b: list) -> dict:
    """Where two rollouts' calls part: ``same``, or the first differing call with its kind and, for a sampling
    divergence, the first differing token and each run's logprob of its own token there."""
    for i, ((pa, ra, la), (pb, rb, lb)) in enumerate(zip(a, b)):
        if pa != pb:
            return {"kind": "prompt", "call": i}
        if ra != rb:
            t = next((j for j, (x, y) in enumerate(zip(ra, rb)) if x != y), min(len(ra), len(rb)))
            return {"kind": "sampling", "call": i, "token": t, "of": max(len(ra), len(rb)),
                    "logprobs": [la[t] if la and t < len(la) else None, lb[t] if lb and t < len(lb) else None]}
    return {"kind": "same" if len(a) == len(b) else "length", "call": min(len(a), len(b))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("a", type=Path)
    parser.add_argument("b", type=Path)
    parser.add_argument("--epochs", type=int, nargs="*", default=None, help="training epochs to compare (default all)")
    parser.add_argument("--json", type=Path, default=None, help="also write the comparison here")
    args = parser.parse_args()
    (ra, da), (rb, db) = load(args.a), load(args.b)

    print("| run | epoch | tasks drawn (A / B / both) |\n|---|---|---|")
    for key in sorted(set(da) | set(db)):
        if args.epochs is not None and not key[0].endswith(".eval") and key[1] not in args.epochs:
            continue
        ta, tb = da.get(key, set()), db.get(key, set())
        print(f"| {key[0]} | {key[1]} | {len(ta)} / {len(tb)} / {len(ta & tb)} |")

    rows = {}
    for key in sorted(set(ra) & set(rb)):
        run, mode, epoch = key[:3]
        if mode == "train" and args.epochs is not None and epoch not in args.epochs:
            continue
        rows[key] = {**compare(ra[key][1], rb[key][1]), "rewards": [ra[key][0], rb[key][0]]}
    groups: dict[tuple, Counter] = {}
    for (run, mode, epoch, *_), row in rows.items():
        groups.setdefault((mode, epoch), Counter())[row["kind"]] += 1
    print("\n| mode | epoch | rollouts in both | identical | first difference from sampling (same prompt) | from an "
          "earlier difference | same reward |\n|---|---|---|---|---|---|---|")
    for (mode, epoch), kinds in sorted(groups.items()):
        same_reward = sum(1 for k, r in rows.items() if k[1] == mode and k[2] == epoch and r["rewards"][0] == r["rewards"][1])
        print(f"| {mode} | {epoch} | {sum(kinds.values())} | {kinds['same']} | {kinds['sampling']} "
              f"| {kinds['prompt'] + kinds['length']} | {same_reward} |")
    flips = [r for r in rows.values() if r["kind"] == "sampling"]
    if flips:
        probs = [math.exp(lp) for r in flips for lp in r["logprobs"] if lp is not None]
        print(f"\nAt the {len(flips)} sampling divergences, the first differing token was token "
              f"{Counter(r['token'] for r in flips).most_common(3)} (position: count) of the reply; the probability "
              f"each run gave its own token there: median {sorted(probs)[len(probs) // 2]:.3f}, "
              f"min {min(probs):.3f}, max {max(probs):.3f} ({len(probs)} values)")
    if args.json:
        args.json.write_text(json.dumps([{"key": list(k), **v} for k, v in rows.items()], default=str))


if __name__ == "__main__":
    main()
