"""Analysts' access to a lake: a DuckDB connection that never holds a lock the pipeline needs.

    import lightning_core.analyst as arclight
    con = arclight.connect(".arclight/lake")        # or a config file, or an ArclightConfig
    con.sql("SELECT name, count(*) FROM spans GROUP BY name").show()
    arclight.refresh(con)                            # move to the lake's newest snapshot

The connection is in memory. Its span views list the files of one snapshot of the lake's Delta
tables, and the state tables (runs, epochs, rollouts, policy_versions, prompt_versions,
agent_epochs) are copied in from the newest version of their Delta tables (milliseconds). So
it can stay open for days while the collector writes and compacts and the pipeline trains; it
sees the lake as of its last ``connect``/``refresh``. ``at_version`` pins a snapshot (time
travel: per table, span tables and output tables; for example ``dict(con.sql("FROM
lake_snapshot").fetchall())`` of another connection; a span table keeps the log of older versions
``collector.log_retention_s`` seconds). ``at_epoch`` pins what an epoch's pipeline run read and
wrote: its run and epoch's span files (``epochs.stats.span_files``, kept until vacuumed) and the
output tables' versions (``output_versions``). Polars reads the tables natively:
``pl.scan_delta("<lake>/spans/training")``. The duckdb CLI: ``duckdb -init <(arclight views)``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import duckdb

from lightning_core.store.catalog import STATE_TABLE_NAMES, Catalog, span_views, view_sql
from lightning_core.store.span_schema import LANES
from lightning_core.store.location import location
from lightning_core.store.spans import Snapshot, files_snapshot, snapshot_at
from lightning_core.store.outputs import TABLES
from lightning_core.store.outputs import snapshot as output_snapshot
from lightning_core.store.outputs import views_sql as output_views_sql


def _catalog(lake: Any) -> Catalog:
    if isinstance(lake, Catalog):
        return lake
    if hasattr(lake, "lake"):  # an ArclightConfig
        return Catalog.from_config(lake)
    path = Path(lake)
    if path.suffix in (".yaml", ".yml"):
        from lightning_core.config import load_config

        return Catalog.from_config(load_config(path))
    return Catalog(path)


def connect(lake: str | os.PathLike[str] | Any = ".arclight/lake", *, at_version: dict[str, int] | None = None,
            at_epoch: tuple[str, int] | None = None, threads: int | None = None) -> duckdb.DuckDBPyConnection:
    """An in-memory DuckDB connection over the lake's current snapshot (or ``at_version``, per table).

    ``lake`` is a lake folder, a config file, an ``ArclightConfig`` or a ``Catalog``. Nothing on
    disk stays open: hold the connection as long as you like. ``at_epoch=(run_id, epoch)`` pins
    what that epoch's pipeline run read and wrote: the spans it saw (the span files of its run and
    epoch, as it recorded them; the span views hold nothing else) and the triplets it trained on.
    """
    catalog = _catalog(lake)
    span_files = None
    if at_epoch is not None:
        stats = _epoch_stats(catalog, *at_epoch)
        at_version = {**_versions(stats, *at_epoch), **(at_version or {})}
        span_files = stats.get("span_files")
    con = duckdb.connect(config={"threads": str(threads)} if threads else {})
    con.execute("SET VARIABLE arclight_lake = $lake", {"lake": str(catalog.lake_root)})
    con.execute("SET VARIABLE arclight_catalog = $catalog", {"catalog": str(catalog.path)})
    _load(con, catalog, at_version=at_version, span_files=span_files)
    return con


def epoch_versions(lake: str | os.PathLike[str] | Any, run_id: str, epoch: int) -> dict[str, int]:
    """The table versions an epoch's pipeline run read (span tables) and wrote (output tables), from its stats."""
    catalog = _catalog(lake)
    return _versions(_epoch_stats(catalog, run_id, epoch), run_id, epoch)


def _epoch_stats(catalog: Catalog, run_id: str, epoch: int) -> dict:
    with catalog.read(spans=False) as con:
        rows = con.execute("SELECT status, stats FROM epochs WHERE run_id = ? AND epoch = ?", [run_id, epoch]).fetchall()
    if not rows:
        raise ValueError(f"no epoch {epoch} of run {run_id!r} in {catalog.state_root}: see `SELECT run_id, epoch, status "
                         "FROM epochs` for the epochs there are")
    status, stats = rows[0]
    return {"status": status, **(json.loads(stats) if stats else {})}


def _versions(stats: dict, run_id: str, epoch: int) -> dict[str, int]:
    versions = {**stats.get("span_versions", {}), **stats.get("output_versions", {})}
    if not versions:
        raise ValueError(f"epoch {epoch} of run {run_id!r} has not made its triplets (status {stats['status']!r}): the "
                         "versions it read and wrote are recorded when it does")
    return versions


def refresh(con: duckdb.DuckDBPyConnection, *, at_version: dict[str, int] | None = None) -> Snapshot:
    """Point ``con`` (made by ``connect``) at the lake's newest snapshot (or ``at_version``); return it."""
    root, path = con.execute("SELECT getvariable('arclight_lake'), getvariable('arclight_catalog')").fetchall()[0]
    return _load(con, Catalog(root, path), at_version=at_version)


def _load(con: duckdb.DuckDBPyConnection, catalog: Catalog, *, at_version: dict[str, int] | None,
          span_files: dict[str, list[str]] | None = None) -> Snapshot:
    at_version = at_version or {}
    unknown = set(at_version) - set(LANES) - set(TABLES)
    if unknown:
        raise ValueError(f"unknown tables {sorted(unknown)} in at_version: the lake has the span tables {list(LANES)} "
                         f"and the output tables {list(TABLES)}")
    span_versions = {k: v for k, v in at_version.items() if k in LANES}
    if span_files is not None:  # an epoch's own span files: no need of the log of the versions it read
        snap = files_snapshot(catalog.lake_root, span_versions, span_files)
    else:
        snap = snapshot_at(catalog.lake_root, span_versions)
    outputs = {k: v for k, v in at_version.items() if k in TABLES}
    output_versions = {output: version for output, (version, _) in output_snapshot(catalog.lake_root, outputs).items()}
    for name in STATE_TABLE_NAMES:
        con.execute(f"DROP TABLE IF EXISTS {name}")
    con.execute(catalog.load_sql())  # the newest committed state, in memory
    span_views(con, catalog.lake_root, snap)
    con.execute(output_views_sql(catalog.lake_root, output_versions) or "SELECT 1")  # none before the first pipeline run
    versions = {**snap.versions, **output_versions}
    con.execute("CREATE OR REPLACE TABLE lake_snapshot AS SELECT * FROM (VALUES "
                + ", ".join(f"('{name}', {version})" for name, version in versions.items()) + ") t(table_name, version)")
    return snap


def cli_script(lake: str | os.PathLike[str] | Any) -> str:
    """SQL that gives a duckdb CLI session the same views and a copy of the state tables."""
    catalog = _catalog(lake)
    parts = [*_cli_store(catalog.lake_root), view_sql(catalog.lake_root, snapshot_at(catalog.lake_root, None)),
             output_views_sql(catalog.lake_root), catalog.load_sql()]
    return "\n".join(parts) + "\n"


def _cli_store(lake_root: Path) -> list[str]:
    """For a lake whose spans are on S3: the statements that let a duckdb CLI read them itself (httpfs, and a secret
    from the AWS credential chain -- the ``AWS_*`` environment, then ~/.aws -- scoped to the span tables, with the
    lake's endpoint). The CLI installs the httpfs and aws extensions the first time, from DuckDB's repository."""
    where = location(lake_root)
    if not where.uri:
        return []
    options = {k.lower(): v for k, v in (where.options or {}).items()}
    endpoint = options.get("aws_endpoint_url") or options.get("endpoint_url") or options.get("aws_endpoint")
    settings = ["TYPE s3", "PROVIDER credential_chain", "CHAIN 'env;config'", f"SCOPE {_sql_text(where.uri)}"]
    region = options.get("aws_region") or options.get("region")
    if region:
        settings.append(f"REGION {_sql_text(region)}")
    if endpoint:
        scheme, _, host = endpoint.partition("://")
        settings += [f"ENDPOINT {_sql_text(host or scheme)}", "URL_STYLE 'path'",
                     f"USE_SSL {'false' if scheme == 'http' else 'true'}"]
    return ["INSTALL httpfs; LOAD httpfs; INSTALL aws; LOAD aws;",
            f"CREATE OR REPLACE SECRET arclight_spans ({', '.join(settings)});"]


def _sql_text(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"
