"""Lake commands: run the collector, query the lake (one query, a shell, the views for the DuckDB CLI), make triplets,
compact, and convert a lake of an older Arclight."""

from __future__ import annotations

import contextlib
import json
import logging
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.markup import escape

from lightning_core.cli.common import AtEpochOpt, console, epoch_arg, fail, lake_io, need_lake, project
from lightning_core.config import ArclightConfig


@project(lake=True, settings={"host": "collector.host", "port": "collector.port", "token": "collector.token",
                              "workers": "collector.workers"})
def collector(
    cfg: ArclightConfig,
    host: Optional[str] = typer.Option(None, help="Bind address (default 127.0.0.1)."),
    port: Optional[int] = typer.Option(None, help="Port (default 4318)."),
    token: Optional[str] = typer.Option(None, help="Bearer token required from clients."),
    workers: Optional[int] = typer.Option(None, help="Collector processes on the one port (default collector.workers, 1)."),
    log_level: str = typer.Option("info", help="uvicorn log level."),
) -> None:
    """Run the OTLP/HTTP collector that writes spans into the lake's Delta tables."""
    from lightning_core.store.catalog import Catalog
    from lightning_core.ingest.collector import serve
    from lightning_core.ingest.service import storage_options_from_environment

    try:
        cfg = storage_options_from_environment(cfg)  # how start_collector passes them: never on the command line
    except ValueError as exc:
        fail(str(exc), code=2)
    with lake_io(cfg):
        Catalog.from_config(cfg).ensure()
    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s")
    console.print(escape(f"collector on http://{cfg.collector.host}:{cfg.collector.port}/v1/traces -> {cfg.lake.path}"))
    try:
        serve(cfg.collector, cfg.lake.path, log_level=log_level)
    except ValueError as exc:
        fail(str(exc), code=2)


@project(lake=True)
def query(
    cfg: ArclightConfig,
    sql: str = typer.Argument(..., help="SQL to run against the catalog (read-only)."),
    fmt: str = typer.Option("table", "--format", "-f", help="table | csv | json"),
    at_epoch: Optional[str] = AtEpochOpt,
) -> None:
    """Run one SQL query against the catalog, read-only, and print the result."""
    import duckdb

    from lightning_core.analyst import connect
    from lightning_core.store.catalog import WriteRefused, refuse_writes

    if fmt not in ("table", "csv", "json"):
        console.print(f"[red]error:[/red] --format must be table, csv or json, not {escape(repr(fmt))}")
        raise typer.Exit(2)
    need_lake(cfg)
    pinned = epoch_arg(at_epoch)
    try:
        with lake_io(cfg), contextlib.closing(connect(cfg, at_epoch=pinned)) as con:  # holds no lock: training never waits
            refuse_writes(con, sql)
            result = con.sql(sql)
            if result is None:
                return
            _print_result(result, fmt)
    except (duckdb.Error, WriteRefused, ValueError) as exc:
        console.print(f"[red]query failed:[/red] {escape(str(exc))}")
        raise typer.Exit(1) from None


def _print_result(result, fmt: str) -> None:
    table = result.to_arrow_table()
    if fmt == "csv":
        import pyarrow.csv as pacsv

        pacsv.write_csv(_flat(table), sys.stdout.buffer)
    elif fmt == "json":
        for row in table.to_pylist():
            sys.stdout.write(json.dumps(row, default=str) + "\n")
    else:
        from rich.table import Table

        out = Table(show_lines=False)
        for name in table.column_names:
            out.add_column(name, overflow="fold")
        for row in table.to_pylist():
            out.add_row(*["NULL" if v is None else escape(str(v)) for v in row.values()])
        Console().print(out)
        Console(stderr=True).print(f"{table.num_rows} row(s)")


def _flat(table):
    """The table with its list, struct and map columns as JSON text (CSV has no nested values)."""
    import pyarrow as pa

    for i, field in enumerate(table.schema):
        if pa.types.is_nested(field.type):
            text = [None if v is None else json.dumps(v, default=str) for v in table.column(i).to_pylist()]
            table = table.set_column(i, field.name, pa.array(text, pa.string()))
    return table


@project(lake=True)
def shell(cfg: ArclightConfig, at_epoch: Optional[str] = AtEpochOpt) -> None:
    """An interactive SQL prompt on the catalog (read-only). End statements with ';'."""
    import duckdb

    from lightning_core.analyst import connect, refresh
    from lightning_core.store.catalog import WriteRefused, refuse_writes

    need_lake(cfg)
    pinned = epoch_arg(at_epoch)
    try:
        with lake_io(cfg):
            con = connect(cfg, at_epoch=pinned)  # in memory, over the lake's snapshot: holds no lock the pipeline needs
    except ValueError as exc:
        fail(str(exc), code=1)
    seen = (f"the snapshot epoch {pinned[1]} of run {pinned[0]} read and wrote" if pinned
            else "each statement sees the newest snapshot")
    console.print(escape(f"lake {cfg.lake.path} (read-only; {seen}). Views: spans, "
                         "spans_raw, triplets, ...; tables: runs, epochs, rollouts, ... End with ';', quit with .quit or Ctrl-D."))
    buffer = ""
    while True:
        try:
            line = input("arclight> " if not buffer else "     ...> ")
        except EOFError:
            break
        if line.strip() in (".quit", ".exit"):
            break
        buffer += line + "\n"
        if not buffer.strip().endswith(";"):
            continue
        statement, buffer = buffer, ""
        try:
            refuse_writes(con, statement)
            if pinned is None:
                refresh(con)
            result = con.sql(statement)
            if result is not None:
                _print_result(result, "table")
        except (duckdb.Error, WriteRefused) as exc:
            console.print(f"[red]error:[/red] {escape(str(exc))}")


@project(lake=True)
def compact(
    cfg: ArclightConfig,
    min_files: int = typer.Option(2, help="Compact partitions with at least this many files."),
    idle_s: float = typer.Option(0.0, help="...that have received nothing for this many seconds..."),
    max_files: Optional[int] = typer.Option(None, help="...or that have this many small files, however busy "
                                            "(default: collector.compact_max_files)."),
) -> None:
    """Merge small span files in the lake's partitions."""
    from lightning_core.store.spans import Lake

    need_lake(cfg)
    with lake_io(cfg):
        lake = Lake(cfg.lake.path, retention_hours=cfg.collector.retention_hours,
                    log_retention_s=cfg.collector.log_retention_s, checkpoint_interval=cfg.collector.checkpoint_interval)
        merged = lake.compact(min_files=min_files, idle_s=idle_s,
                              max_files=max_files if max_files is not None else cfg.collector.compact_max_files)
    console.print(escape(f"compacted {merged} partition(s) in {cfg.lake.path}"))


@project(lake=True)
def views(cfg: ArclightConfig) -> None:
    """Print SQL that gives a duckdb CLI session the lake's views: duckdb -init <(arclight views)."""
    from lightning_core.analyst import cli_script

    need_lake(cfg)
    with lake_io(cfg):
        sys.stdout.write(cli_script(cfg))


@project(lake=True)
def migrate_lake(cfg: ArclightConfig) -> None:
    """Convert a Parquet lake of an older Arclight into the Delta tables (the old files move aside)."""
    from lightning_core.store import outputs
    from lightning_core.store.spans import migrate

    need_lake(cfg)
    with lake_io(cfg):
        moved = migrate(cfg.lake.path)
        migrated = outputs.migrate(cfg.lake.path)
    if not moved and not migrated:
        console.print(escape(f"{cfg.lake.path}: nothing to convert (the span and output tables are Delta tables already)"))
    for lane, count in moved.items():
        console.print(escape(f"spans/{lane}: {count} spans now in a Delta table; the old files are in "
                             f"spans/{lane}.parquet-<time> (delete them once you have checked)"))
    for output, count in migrated.items():
        console.print(escape(f"{output}: {count} rows now in a Delta table; the old files are in "
                             f"{output}.parquet-<time> (delete them once you have checked)"))


@project(lake=True, settings={"reward_policy": "pipeline.reward_policy"})
def triplets(
    cfg: ArclightConfig,
    run: Optional[str] = typer.Option(None, "--run", help="Run id (default: production spans, which have none)."),
    epoch: Optional[int] = typer.Option(None, "--epoch", help="Epoch (default: every epoch of the run)."),
    policy: Optional[str] = typer.Option(None, "--policy", help="Only this configured policy (default: all)."),
    agent_match: Optional[str] = typer.Option(None, "--agent-match", help="Regex on agent names (overrides the policy's)."),
    reward_policy: Optional[str] = typer.Option(None, "--reward-policy", help="final | first_occurrence | latest_unrewarded_call | first_sibling | discounted"),
    out: Optional[Path] = typer.Option(None, "--out", help="Also write the triplets to this Parquet file."),
) -> None:
    """Run the SQL pipeline on spans in the lake and write triplets (visible in the `triplets` view)."""
    from lightning_core.names import InvalidName, check_epoch, check_run_id
    from lightning_core.pipeline.steps import PipelineError, validate_pattern
    from lightning_core.pipeline.triplets import materialize_triplets
    from lightning_core.pipeline.silence import print_silences

    try:
        if run is not None:
            check_run_id(run, what="--run")
        if epoch is not None:
            check_epoch(epoch, what="--epoch")
        validate_pattern(agent_match, what="--agent-match")
        need_lake(cfg)
        with lake_io(cfg):
            report = materialize_triplets(cfg, run_id=run, epoch=epoch, policy=policy, agent_match=agent_match, out=out)
    except (PipelineError, InvalidName) as exc:
        fail(str(exc), code=2)
    where = f"run {run} epoch {'all' if epoch is None else epoch}" if run else "production spans"
    console.print(escape(f"{where}: {report.spans} spans ({report.repaired_spans} repaired), {report.rollouts} rollouts, "
                  f"{report.llm_calls} calls (+{report.judge_calls} judge), {report.rewards} rewards "
                  f"({report.missing_rewards} missing), agents {report.agents} in {report.seconds:.2f}s"))
    for p in report.policies:
        console.print(escape(f"policy {p.policy} (agent_match={p.agent_match!r}): {p.triplets} triplets, {p.rollouts} rollouts, "
                      f"{p.groups} groups, {len(p.zero_advantage_groups)} all-equal groups, "
                      f"{p.missing_token_ids} missing token ids, {p.dropped} dropped, {p.retokenized} retokenized"))
    print_silences(report.silences, console=console, missing_reward=cfg.pipeline.missing_reward)
    if out is not None:
        console.print(escape(f"wrote {out}"))


@project(lake=True)
def traces(
    cfg: ArclightConfig,
    run: Optional[str] = typer.Option(None, "--run", help="Run id (default: the config's run; <run>.eval: its "
                                      "evaluations)."),
    epoch: Optional[int] = typer.Option(None, "--epoch", help="Epoch (default: every epoch of the run that ran)."),
    production: bool = typer.Option(False, "--production", help="The production spans (spans/production) instead of "
                                    "a run's."),
    keep: str = typer.Option("all", "--traces", help="all | sample (every failed rollout and each group's best and "
                             "worst, up to tracking.traces_cap)."),
) -> None:
    """Publish rollouts from the lake as MLflow traces: a finished run's or epoch's (runs made before traces existed,
    or an epoch whose time budget ran out), or the production traces. A trace already published is kept, not
    duplicated."""
    from lightning_core.epoch.traces import publish_epoch
    from lightning_core.names import InvalidName, check_epoch, check_run_id
    from lightning_core.pipeline.steps import PipelineError
    from lightning_core.store.catalog import Catalog

    if keep not in ("all", "sample"):
        fail(f"--traces must be all or sample, not {keep!r}", code=2)
    if production and (run is not None or epoch is not None):
        fail("--production publishes the production spans, which have no run or epoch: leave out --run and --epoch",
             code=2)
    try:
        if run is not None:
            check_run_id(run, what="--run")
        if epoch is not None:
            check_epoch(epoch, what="--epoch")
        need_lake(cfg)
        cfg = cfg.model_copy(update={"tracking": cfg.tracking.model_copy(update={"traces": keep})})
        run_id = None if production else (run or cfg.run_name)
        with lake_io(cfg):
            catalog = Catalog.from_config(cfg)
            if production:
                epochs: list[int | None] = [None]
            elif epoch is not None:
                epochs = [epoch]
            else:
                with catalog.read(spans=False) as con:
                    epochs = [e for (e,) in con.execute("SELECT DISTINCT epoch FROM rollouts WHERE run_id = ? AND status "
                                                        "NOT IN ('planned', 'running') ORDER BY 1", [run_id]).fetchall()]
                if not epochs:
                    fail(f"run {run_id!r} has no rollouts that ran in {catalog.state_root}: see `arclight query "
                         "\"SELECT DISTINCT run_id FROM rollouts\"` for the runs there are", code=2)
            mode = "production" if production else "eval" if run_id.endswith(".eval") else "train"
            failed = False
            for e in epochs:
                report = publish_epoch(cfg, run_id=run_id, epoch=e, mode=mode, catalog=catalog)
                console.print(escape(report.summary()))
                failed = failed or report.error is not None
    except (PipelineError, InvalidName) as exc:
        fail(str(exc), code=2)
    from lightning_core.cli.progress import where_traces_are

    console.print(escape(f"see them: {where_traces_are(cfg)}"))
    if failed:
        raise typer.Exit(1)
