"""One step of the SQL pipeline: its file (``sql/<step>.sql``), its ``$parameters``, bound and run.

Each file is a chain of named CTEs that ends in one SELECT; ``run_stage`` binds the parameters the
text uses (never pasted into it) and keeps the result as a temporary table (a view for the steps
that only join columns) named for what it holds, which the next step reads. The files live in the
top-level ``sql/`` folder, beside the analyst views (``views.sql``, not a step), and ship inside the
package as ``lightning_core.sql`` (a package-dir mapping in pyproject.toml); they are read through
``importlib.resources``, so a wheel installed the usual way finds them, and so does the editable install.
"""

from __future__ import annotations

import re
from importlib.resources import files
from importlib.resources.abc import Traversable
from typing import Any

import duckdb

SQL = files("lightning_core.sql")
NOT_STEPS = {"views.sql"}  # the analyst views (lightning_core.store.outputs reads them)


def sql_files() -> list[Traversable]:
    """Every step's file, by name."""
    return sorted((f for f in SQL.iterdir() if f.name.endswith(".sql") and f.name not in NOT_STEPS), key=lambda f: f.name)


VIEW_STAGES = {"repaired_spans", "span_agents", "span_owners", "llm_calls"}  # views: they only join columns to narrow tables


_PARAM = re.compile(r"\$([A-Za-z_][A-Za-z0-9_]*)")


class PipelineError(ValueError):
    """A pipeline input that cannot work (bad regex, unknown policy); says what was expected."""


def sql_text(stage: str) -> str:
    """Return the SQL of one stage file."""
    path = SQL / f"{stage}.sql"
    if not path.is_file():
        raise PipelineError(f"no SQL file for stage {stage!r}: expected {path}")
    return path.read_text()


def sql_parameters(sql: str) -> set[str]:
    """Return the ``$name`` parameters a SQL text uses (comments and JSON paths ignored)."""
    code = "\n".join(line.split("--", 1)[0] for line in sql.splitlines())
    return set(_PARAM.findall(code))


def run_stage(con: duckdb.DuckDBPyConnection, stage: str, *, params: dict[str, Any], table: str | None = None):
    """Run one stage with its parameters bound; keep it as temp ``table`` or return the relation."""
    sql = sql_text(stage)
    needed = sql_parameters(sql)
    missing = needed - params.keys()
    if missing:
        raise PipelineError(f"stage {stage!r} needs parameters {sorted(missing)}; given {sorted(params)}")
    bound = {k: params[k] for k in needed}
    if table is None:
        return con.sql(sql, params=bound)
    kind = "VIEW" if stage in VIEW_STAGES else "TABLE"
    con.execute(f"CREATE OR REPLACE TEMP {kind} {table} AS {sql}", bound)
    return None


def validate_pattern(pattern: str | None, *, what: str = "agent_match") -> None:
    """Fail unless ``pattern`` compiles both in Python ``re`` and in DuckDB (RE2 syntax)."""
    if pattern is None:
        return
    if not isinstance(pattern, str):
        raise PipelineError(f"{what} must be a regular expression string or None, found {type(pattern).__name__}")
    try:
        re.compile(pattern)
    except re.error as exc:
        raise PipelineError(f"{what} {pattern!r} is not a valid regular expression: {exc}") from None
    with duckdb.connect() as probe:
        try:
            probe.execute("SELECT regexp_matches('', $p)", {"p": pattern}).fetchall()
        except duckdb.Error as exc:
            raise PipelineError(
                f"{what} {pattern!r} is not valid in DuckDB's RE2 syntax (no look-around or backreferences): {exc}"
            ) from None
