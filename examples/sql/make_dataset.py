"""Generate the sql example's SQLite database and its questions with gold SQL (seeded).

    python examples/sql/make_dataset.py        # writes company.sqlite, train.jsonl, test.jsonl here

The database (``company.sqlite``) has three small tables: ``departments`` (6 rows),
``employees`` (40) and ``orders`` (120), filled from seed 7. Questions come from templates, from
single-table counts to two-table joins; each row has the question, its gold SQL and the template
index. Every template's questions are enumerated and a seeded quarter of them goes to the test
split, so both splits cover every template and share no question. The agent rebuilds
the database from the same seed when the file is missing (``ensure_database``), so only the JSONL
files are kept in git.
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
SCHEMA = """\
CREATE TABLE departments (id INTEGER PRIMARY KEY, name TEXT, city TEXT);
CREATE TABLE employees (id INTEGER PRIMARY KEY, name TEXT, department_id INTEGER, salary INTEGER, hire_year INTEGER);
CREATE TABLE orders (id INTEGER PRIMARY KEY, employee_id INTEGER, customer TEXT, amount INTEGER, year INTEGER);"""
DEPARTMENTS = [("Sales", "Boston"), ("Engineering", "Austin"), ("Marketing", "Denver"),
               ("Finance", "Chicago"), ("Support", "Austin"), ("Research", "Seattle")]
FIRST = ["Ava", "Ben", "Chloe", "Dev", "Elena", "Farid", "Grace", "Hugo", "Ines", "Jon", "Kira", "Liam",
         "Maya", "Nico", "Omar", "Priya", "Quinn", "Rosa", "Sam", "Tara"]
LAST = ["Adams", "Brown", "Chen", "Diaz", "Evans", "Fischer", "Garcia", "Hall"]
CUSTOMERS = ["Acme", "Globex", "Initech", "Umbrella", "Stark", "Wayne", "Hooli", "Vandelay"]
YEARS = list(range(2018, 2025))


def build_database(path: Path) -> None:
    """Write the seeded database to ``path`` atomically (a temp file renamed into place)."""
    rng = random.Random(DB_SEED)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.unlink(missing_ok=True)
    con = sqlite3.connect(tmp)
    con.executescript(SCHEMA)
    con.executemany("INSERT INTO departments VALUES (?, ?, ?)", [(i + 1, n, c) for i, (n, c) in enumerate(DEPARTMENTS)])
    names = rng.sample([f"{f} {l}" for f in FIRST for l in LAST], 40)
    employees = [(i + 1, name, rng.randint(1, len(DEPARTMENTS)), rng.randrange(40_000, 150_001, 1000), rng.choice(YEARS))
                 for i, name in enumerate(names)]
    con.executemany("INSERT INTO employees VALUES (?, ?, ?, ?, ?)", employees)
    orders = [(i + 1, rng.randint(1, len(employees)), rng.choice(CUSTOMERS), rng.randrange(100, 5001, 50), rng.choice(YEARS))
              for i in range(120)]
    con.executemany("INSERT INTO orders VALUES (?, ?, ?, ?, ?)", orders)
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
        return [r[0] for r in con.execute("SELECT name FROM employees ORDER BY id")]


def templates(employee_names: list[str]) -> list[tuple[str, str, list[dict]]]:
    """The question templates, (question, gold SQL, every slot filling), from one-table counts to joins."""
    depts = [{"d": name} for name, _ in DEPARTMENTS]
    years = [{"y": y} for y in YEARS]
    customers = [{"c": c} for c in CUSTOMERS]
    join = "FROM employees JOIN departments ON employees.department_id = departments.id"
    return [
        ("How many rows are in the {t} table?", "SELECT COUNT(*) FROM {t}",
         [{"t": t} for t in ("employees", "departments", "orders")]),
        ("How many employees earn {word} {s}?", "SELECT COUNT(*) FROM employees WHERE salary {op} {s}",
         [{"word": w, "op": op, "s": s} for w, op in (("more than", ">"), ("less than", "<"))
          for s in range(45_000, 145_001, 10_000)]),
        ("List the names of employees hired {word} {y}.", "SELECT name FROM employees WHERE hire_year {op} {y}",
         [{"word": w, "op": op, "y": y} for w, op in (("in", "="), ("after", ">"), ("before", "<")) for y in YEARS]),
        ("What is the {word} salary of all employees?", "SELECT {f}(salary) FROM employees",
         [{"word": "highest", "f": "MAX"}, {"word": "lowest", "f": "MIN"}, {"word": "average", "f": "AVG"}]),
        ("What is the total amount of orders placed in {y}?", "SELECT SUM(amount) FROM orders WHERE year = {y}", years),
        ("What is the total amount of orders from {c}?", "SELECT SUM(amount) FROM orders WHERE customer = '{c}'", customers),
        ("How many orders did the customer {c} place?", "SELECT COUNT(*) FROM orders WHERE customer = '{c}'", customers),
        ("Which customers placed an order larger than {a}?", "SELECT DISTINCT customer FROM orders WHERE amount > {a}",
         [{"a": a} for a in range(1000, 4501, 500)]),
        ("Which city is the {d} department in?", "SELECT city FROM departments WHERE name = '{d}'", depts),
        ("How many employees work in the {d} department?", "SELECT COUNT(*) " + join + " WHERE departments.name = '{d}'", depts),
        ("List the names of employees in the {d} department.",
         "SELECT employees.name " + join + " WHERE departments.name = '{d}'", depts),
        ("What is the total salary of the {d} department?",
         "SELECT SUM(employees.salary) " + join + " WHERE departments.name = '{d}'", depts),
        ("How many orders did {n} handle?",
         "SELECT COUNT(*) FROM orders JOIN employees ON orders.employee_id = employees.id WHERE employees.name = '{n}'",
         [{"n": n} for n in employee_names[:12]]),
    ]


def splits(db: Path, *, seed: int, test_fraction: float) -> tuple[list[dict], list[dict]]:
    """Split every template's questions (seeded shuffle): ``test_fraction`` of each to test, the rest to train.

    Questions whose gold query returns no rows are left out: any empty answer would match them.
    """
    rng = random.Random(seed)
    train, test = [], []
    con = sqlite3.connect(db)
    for index, (text, sql, fillings) in enumerate(templates(_employee_names(db))):
        rows = [{"question": text.format(**f), "gold_sql": sql.format(**f), "template": index} for f in fillings]
        rows = [r for r in rows if con.execute(r["gold_sql"]).fetchall() not in ([], [(None,)])]
        rng.shuffle(rows)
        cut = round(len(rows) * test_fraction)
        test += rows[:cut]
        train += rows[cut:]
    rng.shuffle(train)
    rng.shuffle(test)
    con.close()
    return train, test


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--test-fraction", type=float, default=0.25)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--out", type=Path, default=HERE)
    args = parser.parse_args()
    db = args.out / "company.sqlite"
    build_database(db)
    train, test = splits(db, seed=args.seed, test_fraction=args.test_fraction)
    for name, rows, prefix in (("train.jsonl", train, "train"), ("test.jsonl", test, "test")):
        with open(args.out / name, "w") as fh:
            for i, row in enumerate(rows):
                fh.write(json.dumps({"id": f"{prefix}-{i:04d}", **row}) + "\n")
    print(f"wrote {db}, {len(train)} train and {len(test)} test questions to {args.out}")


if __name__ == "__main__":
    main()
