"""Generate the sql example's SQLite database and its questions with gold SQL (seeded).

    python examples/sql/make_dataset.py        # writes company.sqlite, train.jsonl, test.jsonl here

The database (``company.sqlite``) has one table, ``employees`` (48 rows: name, department, city,
salary, age), filled from seed 7. Questions come from templates whose gold SQL is one short
SELECT (a count, an aggregate or a lookup with one WHERE condition); each row has the question,
its gold SQL and the template index. Every template's questions are enumerated and a seeded
share of them goes to the test split, so both splits cover every template and share no
question. The agent rebuilds the database from the same seed when the file is missing
(``ensure_database``), so only the JSONL files are kept in git.

One table and short queries are what a 135M model can learn here (the first version, three tables
with joins, stayed at 6% for a base model and after training): the prompt names every column and
its values (``SCHEMA_HINT``) and the agent shows worked examples as chat turns.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sqlite3
from pathlib import Path

HERE = Path(__file__).resolve().parent
DB_SEED = 7
SCHEMA = "CREATE TABLE employees (name TEXT, department TEXT, city TEXT, salary INTEGER, age INTEGER);"
DEPARTMENTS = ["Sales", "Engineering", "Marketing", "Finance", "Support"]
CITIES = ["Boston", "Austin", "Denver", "Chicago", "Seattle"]
FIRST = ["Ava", "Ben", "Chloe", "Dev", "Elena", "Farid", "Grace", "Hugo", "Ines", "Jon", "Kira", "Liam",
         "Maya", "Nico", "Omar", "Priya", "Quinn", "Rosa", "Sam", "Tara"]
LAST = ["Adams", "Brown", "Chen", "Diaz", "Evans", "Fischer", "Garcia", "Hall"]
EMPLOYEES = 48
SCHEMA_HINT = (
    f"Table employees(name, department, city, salary, age).\n"
    f"department is one of: {', '.join(DEPARTMENTS)}.\n"
    f"city is one of: {', '.join(CITIES)}.\n"
    "salary is yearly in dollars; age in years."
)


def build_database(path: Path) -> None:
    """Write the seeded database to ``path`` atomically (a temp file renamed into place)."""
    rng = random.Random(DB_SEED)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.unlink(missing_ok=True)
    con = sqlite3.connect(tmp)
    con.executescript(SCHEMA)
    names = rng.sample([f"{f} {l}" for f in FIRST for l in LAST], EMPLOYEES)
    rows = [(name, rng.choice(DEPARTMENTS), rng.choice(CITIES), rng.randrange(40_000, 150_001, 1000), rng.randint(22, 64))
            for name in names]
    con.executemany("INSERT INTO employees VALUES (?, ?, ?, ?, ?)", rows)
    con.commit()
    con.close()
    os.replace(tmp, path)


def ensure_database(path: Path = HERE / "company.sqlite") -> Path:
    """Return ``path``, building the database first if it does not exist (safe under concurrency)."""
    if not path.exists():
        build_database(path)
    return path


def _employee_names(path: Path) -> list[str]:
    with sqlite3.connect(path) as con:
        return [r[0] for r in con.execute("SELECT name FROM employees ORDER BY rowid")]


def templates(employee_names: list[str]) -> list[tuple[str, str, list[dict]]]:
    """The question templates: (question, gold SQL, every slot filling)."""
    depts = [{"d": d} for d in DEPARTMENTS]
    cities = [{"c": c} for c in CITIES]
    people = [{"n": n} for n in employee_names[:24]]
    aggregates = [("highest", "MAX"), ("lowest", "MIN"), ("average", "AVG"), ("total", "SUM")]
    return [
        ("How many employees work in {d}?", "SELECT COUNT(*) FROM employees WHERE department = '{d}'", depts),
        ("How many employees live in {c}?", "SELECT COUNT(*) FROM employees WHERE city = '{c}'", cities),
        ("What is the {word} salary in {d}?", "SELECT {f}(salary) FROM employees WHERE department = '{d}'",
         [{"word": w, "f": f, **d} for w, f in aggregates for d in depts]),
        ("What is the {word} age of employees in {c}?", "SELECT {f}(age) FROM employees WHERE city = '{c}'",
         [{"word": w, "f": f, **c} for w, f in aggregates[:3] for c in cities]),
        ("How many employees earn more than {s}?", "SELECT COUNT(*) FROM employees WHERE salary > {s}",
         [{"s": s} for s in range(50_000, 140_001, 5_000)]),
        ("How many employees are older than {a}?", "SELECT COUNT(*) FROM employees WHERE age > {a}",
         [{"a": a} for a in range(25, 61, 2)]),
        ("How many employees earn less than {s}?", "SELECT COUNT(*) FROM employees WHERE salary < {s}",
         [{"s": s} for s in range(52_500, 142_501, 5_000)]),
        ("How many employees are younger than {a}?", "SELECT COUNT(*) FROM employees WHERE age < {a}",
         [{"a": a} for a in range(26, 62, 2)]),
        ("What is the salary of {n}?", "SELECT salary FROM employees WHERE name = '{n}'", people),
        ("How old is {n}?", "SELECT age FROM employees WHERE name = '{n}'", people),
        ("Which department does {n} work in?", "SELECT department FROM employees WHERE name = '{n}'", people),
        ("Which city does {n} live in?", "SELECT city FROM employees WHERE name = '{n}'", people),
        ("List the names of employees in {c}.", "SELECT name FROM employees WHERE city = '{c}'", cities),
        ("List the names of employees in {d}.", "SELECT name FROM employees WHERE department = '{d}'", depts),
    ]


def splits(db: Path, *, seed: int, test_fraction: float, test_per_template: int) -> tuple[list[dict], list[dict]]:
    """Split every template's questions (seeded shuffle): ``test_fraction`` of each, at most
    ``test_per_template``, to test, the rest to train, so no template dominates the held-out score.

    Questions whose gold query returns no rows (or a zero count) are left out: any empty answer
    would match them.
    """
    rng = random.Random(seed)
    train, test = [], []
    con = sqlite3.connect(db)
    for index, (text, sql, fillings) in enumerate(templates(_employee_names(db))):
        rows = [{"question": text.format(**f), "gold_sql": sql.format(**f), "template": index} for f in fillings]
        rows = [r for r in rows if con.execute(r["gold_sql"]).fetchall() not in ([], [(None,)], [(0,)])]
        rng.shuffle(rows)
        cut = min(round(len(rows) * test_fraction), test_per_template)
        test += rows[:cut]
        train += rows[cut:]
    rng.shuffle(train)
    rng.shuffle(test)
    con.close()
    return train, test


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--test-fraction", type=float, default=0.4)
    parser.add_argument("--test-per-template", type=int, default=8)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--out", type=Path, default=HERE)
    args = parser.parse_args()
    db = args.out / "company.sqlite"
    build_database(db)
    train, test = splits(db, seed=args.seed, test_fraction=args.test_fraction, test_per_template=args.test_per_template)
    for name, rows, prefix in (("train.jsonl", train, "train"), ("test.jsonl", test, "test")):
        with open(args.out / name, "w") as fh:
            for i, row in enumerate(rows):
                fh.write(json.dumps({"id": f"{prefix}-{i:04d}", **row}) + "\n")
    print(f"wrote {db}, {len(train)} train and {len(test)} test questions to {args.out}")


if __name__ == "__main__":
    main()
