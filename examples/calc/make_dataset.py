"""Generate the calc example's arithmetic word problems (seeded): train.jsonl and test.jsonl.

    python examples/calc/make_dataset.py            # writes the files next to this script

Five templates (a*b, a+b, a-b, a*b+c, a*b-c) with small numbers; each row has the question and
the integer answer. The test split uses a different seed and excludes every train question.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

TEMPLATES = [
    ("{name} has {a} boxes with {b} apples each. How many apples are there?", lambda a, b, c: a * b),
    ("{name} had {a} coins and found {b} more. How many coins now?", lambda a, b, c: a + b),
    ("{name} had {a} stickers and gave away {b}. How many are left?", lambda a, b, c: a - b),
    ("{name} buys {a} packs of {b} pens and {c} loose pens. How many pens in total?", lambda a, b, c: a * b + c),
    ("{name} bakes {a} trays of {b} cookies and eats {c}. How many cookies remain?", lambda a, b, c: a * b - c),
]
NAMES = ["Ava", "Ben", "Chloe", "Dev", "Elena", "Farid", "Grace", "Hugo", "Ines", "Jon"]


def problem(rng: random.Random) -> dict:
    """Draw one problem: question text and integer answer."""
    index = rng.randrange(len(TEMPLATES))
    text, solve = TEMPLATES[index]
    a, b = rng.randint(2, 19), rng.randint(2, 19)
    if index == 2 and b > a:
        a, b = b, a
    c = rng.randint(1, a * b - 1) if index == 4 else rng.randint(1, 19)
    return {"question": text.format(name=rng.choice(NAMES), a=a, b=b, c=c), "answer": solve(a, b, c), "template": index}


def split(seed: int, n: int, exclude: set[str]) -> list[dict]:
    """Return ``n`` distinct problems not in ``exclude``."""
    rng, rows, seen = random.Random(seed), [], set(exclude)
    while len(rows) < n:
        row = problem(rng)
        if row["question"] not in seen:
            seen.add(row["question"])
            rows.append(row)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--train", type=int, default=400)
    parser.add_argument("--test", type=int, default=100)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent)
    args = parser.parse_args()
    train = split(1, args.train, set())
    test = split(2, args.test, {r["question"] for r in train})
    for name, rows, prefix in (("train.jsonl", train, "train"), ("test.jsonl", test, "test")):
        with open(args.out / name, "w") as fh:
            for i, row in enumerate(rows):
                fh.write(json.dumps({"id": f"{prefix}-{i:04d}", **row}) + "\n")
    print(f"wrote {len(train)} train and {len(test)} test problems to {args.out}")


if __name__ == "__main__":
    main()
