"""The ``arclight`` command line. Each command loads one config and calls library functions."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

from lightning_core.config import ArclightConfig, ConfigError, load_config

app = typer.Typer(no_args_is_help=True, add_completion=False, help="Train LLM agents from their own traces.")
console = Console(stderr=True, soft_wrap=True)

ConfigOpt = typer.Option(None, "--config", "-c", help="Project config YAML (default: built-in defaults).")
SetOpt = typer.Option(None, "--set", help="Override a config key, e.g. --set collector.port=4319 (repeatable).")
LakeOpt = typer.Option(None, "--lake", help="Lake folder (overrides lake.path).")


def load(config: Optional[Path], overrides: Optional[list[str]], *, lake: Optional[Path] = None) -> ArclightConfig:
    """Load the config or exit with the error message (no traceback)."""
    extra = list(overrides or [])
    if lake is not None:
        extra.append(f"lake.path={Path(lake).resolve()}")
    try:
        return load_config(config, overrides=extra)
    except ConfigError as exc:
        console.print(f"[red]config error:[/red] {exc}")
        raise typer.Exit(2) from None


@app.command()
def collector(
    config: Optional[Path] = ConfigOpt,
    overrides: Optional[list[str]] = SetOpt,
    lake: Optional[Path] = LakeOpt,
    host: Optional[str] = typer.Option(None, help="Bind address (default 127.0.0.1)."),
    port: Optional[int] = typer.Option(None, help="Port (default 4318)."),
    token: Optional[str] = typer.Option(None, help="Bearer token required from clients."),
    log_level: str = typer.Option("info", help="uvicorn log level."),
) -> None:
    """Run the OTLP/HTTP collector that writes spans into the Parquet lake."""
    from lightning_core.catalog import Catalog
    from lightning_core.collector import serve

    extra = list(overrides or [])
    extra += [f"collector.host={host}"] if host else []
    extra += [f"collector.port={port}"] if port is not None else []
    extra += [f"collector.token={token}"] if token else []
    cfg = load(config, extra, lake=lake)
    Catalog.from_config(cfg).ensure()
    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s")
    console.print(f"collector on http://{cfg.collector.host}:{cfg.collector.port}/v1/traces -> {cfg.lake.path}")
    try:
        serve(cfg.collector, cfg.lake.path, log_level=log_level)
    except ValueError as exc:
        console.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(2) from None


@app.command()
def query(
    sql: str = typer.Argument(..., help="SQL to run against the catalog (read-only)."),
    config: Optional[Path] = ConfigOpt,
    overrides: Optional[list[str]] = SetOpt,
    lake: Optional[Path] = LakeOpt,
    fmt: str = typer.Option("table", "--format", "-f", help="table | csv | json"),
) -> None:
    """Run one SQL query against the catalog, read-only, and print the result."""
    import duckdb

    from lightning_core.catalog import Catalog

    cfg = load(config, overrides, lake=lake)
    catalog = Catalog.from_config(cfg)
    if fmt not in ("table", "csv", "json"):
        console.print(f"[red]error:[/red] --format must be table, csv or json, not {fmt!r}")
        raise typer.Exit(2)
    try:
        with catalog.read() as con:
            result = con.sql(sql)
            if result is None:
                return
            _print_result(result, fmt)
    except duckdb.Error as exc:
        console.print(f"[red]query failed:[/red] {exc}")
        raise typer.Exit(1) from None


def _print_result(result, fmt: str) -> None:
    table = result.to_arrow_table()
    if fmt == "csv":
        import pyarrow.csv as pacsv

        pacsv.write_csv(table, sys.stdout.buffer)
    elif fmt == "json":
        for row in table.to_pylist():
            sys.stdout.write(json.dumps(row, default=str) + "\n")
    else:
        from rich.table import Table

        out = Table(show_lines=False)
        for name in table.column_names:
            out.add_column(name, overflow="fold")
        for row in table.to_pylist():
            out.add_row(*["NULL" if v is None else str(v) for v in row.values()])
        Console().print(out)
        Console(stderr=True).print(f"{table.num_rows} row(s)")


@app.command()
def shell(
    config: Optional[Path] = ConfigOpt,
    overrides: Optional[list[str]] = SetOpt,
    lake: Optional[Path] = LakeOpt,
) -> None:
    """An interactive SQL prompt on the catalog (read-only). End statements with ';'."""
    import duckdb

    from lightning_core.catalog import Catalog

    cfg = load(config, overrides, lake=lake)
    catalog = Catalog.from_config(cfg)
    console.print(f"catalog {catalog.path} (read-only). Views: spans, spans_raw, ... End with ';', quit with .quit or Ctrl-D.")
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
            with catalog.read() as con:
                result = con.sql(statement)
                if result is not None:
                    _print_result(result, "table")
        except duckdb.Error as exc:
            console.print(f"[red]error:[/red] {exc}")


@app.command()
def compact(
    config: Optional[Path] = ConfigOpt,
    overrides: Optional[list[str]] = SetOpt,
    lake: Optional[Path] = LakeOpt,
    min_files: int = typer.Option(2, help="Compact partitions with at least this many files."),
    idle_s: float = typer.Option(0.0, help="...that have received nothing for this many seconds."),
) -> None:
    """Merge small span files in the lake's partitions."""
    from lightning_core.lake import Lake

    cfg = load(config, overrides, lake=lake)
    merged = Lake(cfg.lake.path).compact(min_files=min_files, idle_s=idle_s)
    console.print(f"compacted {merged} partition(s) in {cfg.lake.path}")


@app.command()
def demo(
    config: Optional[Path] = ConfigOpt,
    overrides: Optional[list[str]] = SetOpt,
    lake: Optional[Path] = LakeOpt,
    rollouts: int = typer.Option(20, help="How many demo agent rollouts to trace."),
) -> None:
    """Start a collector, trace a small multi-agent demo through it, and query the result."""
    from lightning_core.demo import run_demo

    cfg = load(config, overrides, lake=lake)
    run_demo(cfg, rollouts=rollouts, console=console)


def main() -> None:
    """Entry point for ``python -m lightning_core``."""
    app()
