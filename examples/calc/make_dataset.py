"""Generate the calc example's arithmetic word problems (seeded): train, test and reworded test sets.

    python examples/calc/make_dataset.py            # writes the files next to this script

Five templates (a*b, a+b, a-b, a*b+c, a*b-c) with small numbers; each row has the question and
the integer answer. The test split uses a different seed and excludes every train question.
``test_reworded.jsonl`` asks the same five operations in new wording, with other names and
objects, that training never sees: it measures whether the policy learned the protocol and the
arithmetic rather than the training sentences.
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
# The same operations, in the same order, worded anew (test_reworded.jsonl only).
REWORDED = [
    ("A bakery fills {a} trays and puts {b} muffins on every tray. What is the total number of muffins?",
     lambda a, b, c: a * b),
    ("There are {a} cars in a parking lot. Then {b} more cars arrive. How many cars are in the lot now?",
     lambda a, b, c: a + b),
    ("A library owned {a} novels and lent out {b} of them. How many novels are still on the shelves?",
     lambda a, b, c: a - b),
    ("{name} plants {a} rows of {b} tulips, then {c} more tulips by the gate. How many tulips did {name} plant?",
     lambda a, b, c: a * b + c),
    ("{name} collects {b} eggs from each of {a} hens and drops {c} of them. How many eggs does {name} still have?",
     lambda a, b, c: a * b - c),
]
REWORDED_NAMES = ["Kofi", "Lena", "Mateo", "Nadia", "Omar", "Priya", "Quinn", "Rosa", "Sven", "Tariq"]


def problem(rng: random.Random, *, templates=TEMPLATES, names=NAMES) -> dict:
    """Draw one problem: question text and integer answer."""
    index = rng.randrange(len(templates))
    text, solve = templates[index]
    a, b = rng.randint(2, 19), rng.randint(2, 19)
    if index == 2 and b > a:
        a, b = b, a
    c = rng.randint(1, a * b - 1) if index == 4 else rng.randint(1, 19)
    return {"question": text.format(name=rng.choice(names), a=a, b=b, c=c), "answer": solve(a, b, c), "template": index}


def split(seed: int, n: int, exclude: set[str], *, templates=TEMPLATES, names=NAMES) -> list[dict]:
    """Return ``n`` distinct problems not in ``exclude``."""
    rng, rows, seen = random.Random(seed), [], set(exclude)
    while len(rows) < n:
        row = problem(rng, templates=templates, names=names)
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
    reworded = split(3, args.test, set(), templates=REWORDED, names=REWORDED_NAMES)
    for name, rows, prefix in (("train.jsonl", train, "train"), ("test.jsonl", test, "test"),
                               ("test_reworded.jsonl", reworded, "reworded")):
        with open(args.out / name, "w") as fh:
            for i, row in enumerate(rows):
                fh.write(json.dumps({"id": f"{prefix}-{i:04d}", **row}) + "\n")
    print(f"wrote {len(train)} train, {len(test)} test and {len(reworded)} reworded test problems to {args.out}")


if __name__ == "__main__":
    main()
