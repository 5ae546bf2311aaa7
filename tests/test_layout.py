"""The package keeps its plan (../shared/LAYOUT.md): one folder per part of the loop, the rules of what may import
what as import-linter contracts in pyproject.toml, and no import circle anywhere (lazy imports count)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from tests.conftest import REPO

PARTS = ("apo", "cli", "common", "epoch", "ingest", "pipeline", "rollouts", "serving", "store", "trainer")


def test_the_import_contracts_in_pyproject_hold():
    lint = Path(sys.executable).with_name("lint-imports")
    result = subprocess.run([str(lint), "--no-cache"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-2000:]
    kept = re.search(r"Contracts: (\d+) kept, (\d+) broken", result.stdout)
    assert kept and int(kept.group(1)) >= 6 and kept.group(2) == "0", result.stdout[-3000:]


def test_every_module_lives_in_its_part_or_is_one_the_root_shares():
    root = REPO / "lightning_core"
    top = sorted(p.stem for p in root.glob("*.py"))
    assert top == ["__init__", "__main__", "analyst", "config", "names", "semconv", "tracing", "tracking"]
    assert sorted(p.name for p in root.iterdir() if p.is_dir() and (p / "__init__.py").exists()) == list(PARTS)


def test_the_sql_lives_in_the_top_level_sql_folder_and_is_read_through_importlib_resources():
    from lightning_core.pipeline.steps import sql_files, sql_text
    from lightning_core.store.outputs import VIEWS_SQL

    names = {f.name for f in sql_files()}
    assert {"span_nodes.sql", "credit.sql", "triplets.sql", "advantages.sql", "arrivals.sql"} <= names
    assert "views.sql" not in names and VIEWS_SQL.read_text() == (REPO / "sql" / "views.sql").read_text()
    assert sql_text("credit").startswith("-- credit:")
    assert {p.name for p in (REPO / "sql").glob("*.sql")} == names | {"views.sql"}
    assert sorted(str(p.relative_to(REPO)) for p in (REPO / "lightning_core").rglob("*.sql")) == []
