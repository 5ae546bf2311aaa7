"""Terminal progress for long runs: a rich display fed by the catalog, then a summary.

The display polls the catalog (epochs and rollouts tables) once a second, so it shows the same
truth a re-run would resume from, whatever runs the work (an in-process flow, a worker). It is
the only thing that redraws the screen: everything else the run prints goes above it, or to the
log file (``output.py``). Not on a terminal there is no display, only those lines.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from pathlib import Path
from typing import Any, Callable, Iterator

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.text import Text

from lightning_core.cli.output import command_output, print_table
from lightning_core.epoch.context import RunContext
from lightning_core.store.catalog import Catalog
from lightning_core.config import ArclightConfig
from lightning_core.common.stopping import on_signals

log = logging.getLogger("arclight.cli")


def _expected_errors() -> tuple[type[BaseException], ...]:
    """Errors whose message already says what is wrong and how to fix it (no traceback needed)."""
    from lightning_core.config import ConfigError
    from lightning_core.rollouts.dataset import DatasetError
    from lightning_core.pipeline.steps import PipelineError
    from lightning_core.serving.redeploy import RedeployError
    from lightning_core.common.services import ServiceError
    from lightning_core.epoch.failures import RunStopped, TrainHostError

    return (ConfigError, DatasetError, PipelineError, RedeployError, ServiceError, RunStopped, TrainHostError)


EXPECTED_ERRORS = _expected_errors()


def _snapshot(catalog: Catalog, run_id: str) -> dict[str, Any]:
    with catalog.read(spans=False) as con:
        epochs = con.execute("SELECT epoch, status, train_started_at IS NOT NULL AND train_finished_at IS NULL "
                             "FROM epochs WHERE run_id = ? ORDER BY epoch", [run_id]).fetchall()
        current = epochs[-1][0] if epochs else None
        counts = dict(con.execute(
            "SELECT status, count(*) FROM rollouts WHERE run_id = ? AND epoch = ? GROUP BY status", [run_id, current]
        ).fetchall()) if current is not None else {}
    # asynchronous epochs: one epoch trains while the next one's rollouts run, and both show
    busy = [f"epoch {e}: {'training' if training else status}" for e, status, training in epochs if status != "completed"]
    return {
        "completed": sum(1 for _, s, _ in epochs if s == "completed"),
        "epoch": current,
        "stage": " · ".join(busy) if busy else (f"epoch {current}: completed" if epochs else "starting services"),
        "planned": sum(counts.values()),
        "done": sum(n for s, n in counts.items() if s != "planned"),
        "failed": counts.get("failed", 0) + counts.get("timed_out", 0),
    }


def run_with_progress(
    config: ArclightConfig,
    work: Callable[[], Any],
    *,
    console: Console,
    epochs: int | None,
    title: str,
    summary: bool = True,
    run_id: str | None = None,
    verbose: bool = False,
) -> Any:
    """Run ``work()`` while showing epoch and rollout progress; print a summary; Ctrl-C (or SIGTERM) stops cleanly.

    A run that stops on an expected error ends with one paragraph saying why (the last thing on the screen); its
    traceback goes to the log file."""
    catalog = Catalog.from_config(config)
    catalog.ensure()
    run_id = run_id or config.run_name
    with command_output(config, console=console, verbose=verbose) as log_file:
        try:
            with _display(console, catalog, run_id=run_id, epochs=epochs), on_signals():
                result = work()
        except KeyboardInterrupt:
            console.print("[yellow]interrupted:[/yellow] the rollouts in flight and the services started for this run "
                          "were stopped; run the same command again to resume where it stopped")
            raise SystemExit(130) from None
        except EXPECTED_ERRORS as exc:
            log.error("the run stopped: %s", exc, exc_info=exc, extra={"screen": False})
            console.print(Text.assemble(("error: ", "red"), str(exc)), soft_wrap=True)
            console.print(f"completed stages are kept; fix the problem and run the same command again to resume "
                          f"(the full log: {log_file})", soft_wrap=True, highlight=False)
            raise SystemExit(1) from None
        if summary:
            print_summary(config, console=console, log_file=log_file)
    return result


@contextlib.contextmanager
def _display(console: Console, catalog: Catalog, *, run_id: str, epochs: int | None) -> Iterator[None]:
    """On a terminal, the live display (epochs, rollouts of the current epoch, failures) for the block; elsewhere
    nothing. It stops before the block's error leaves, so what the command prints next comes after it."""
    if not console.is_terminal:
        yield
        return
    stop = threading.Event()
    columns = (TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[note]}"),
               TimeElapsedColumn())
    with Progress(*columns, console=console, transient=False) as progress:
        epoch_bar = progress.add_task("epochs", total=epochs, note="") if epochs else None
        rollout_bar = progress.add_task("rollouts", total=None, note="starting services")

        def poll() -> None:
            while not stop.wait(1.0):
                try:
                    snap = _snapshot(catalog, run_id)
                except Exception:  # a locked or half-created catalog: try again next second
                    continue
                if epoch_bar is not None:  # a run may already have more epochs than were asked for
                    progress.update(epoch_bar, total=max(epochs, snap["completed"]), completed=snap["completed"],
                                    note=snap["stage"])
                note = f"{snap['failed']} failed/timed out" if snap["failed"] else ""
                progress.update(rollout_bar, total=snap["planned"] or None, completed=snap["done"], note=note)

        poller = threading.Thread(target=poll, name="arclight-progress", daemon=True)
        poller.start()
        try:
            yield
        finally:
            stop.set()
            poller.join(timeout=5)


def print_summary(config: ArclightConfig, *, console: Console, log_file: Path | None = None) -> None:
    """Print reward per epoch and where the results are (the log file among them)."""
    from lightning_core.epoch.reports import eval_curve, summary_rows

    ctx = RunContext.of(config)
    curve = eval_curve(ctx)
    held_out = {c["after_epochs"]: c for c in curve}
    table = Table(title=f"run {config.run_name}")
    rows = summary_rows(ctx)
    ours = any(r["infra_retried"] or r["infra_left_out"] for r in rows)  # the column only when our services failed
    stale = any(r["staleness_max"] for r in rows)  # asynchronous epochs: how many versions behind each trained
    gap = any(r["logprob_gap_mean"] is not None for r in rows)  # GRPO with recorded logprobs: vLLM against the trainer
    for column in ("epoch", "served", "reward (mean)", "succeeded", "failed", "timed out",
                   *(["ours: retried/left out"] if ours else []), "groups (informative/drawn)", "trained",
                   *(["staleness"] if stale else []),
                   "held-out after", "status"):
        table.add_column(column)
    for r in rows:
        reward = "" if r["reward_mean"] is None else f"{r['reward_mean']:.3f}"
        groups = "" if r.get("tasks_sampled") is None else f"{r['informative_groups']}/{r['tasks_sampled']}"
        after = held_out.get(r["epoch"] + 1)
        retried = [f"{r['infra_retried']}/{r['infra_left_out']}" if r["infra_retried"] or r["infra_left_out"] else ""]
        table.add_row(str(r["epoch"]), r["policy_version"] or "", reward, str(r["succeeded"]), str(r["failed"]),
                      str(r["timed_out"]), *(retried if ours else []), groups, r["new_version"] or "-",
                      *([str(r["staleness_max"]) if r["staleness_max"] is not None else ""] if stale else []),
                      "" if after is None else f"{after['success_rate']:.0%}", r["status"])
    print_table(console, table)
    if gap:
        _print_correction(rows, console=console)
    _print_signals(rows, console=console)
    from lightning_core.epoch.failures import describe_incidents

    for r in rows:
        if r["incidents"]:
            console.print(f"[yellow]epoch {r['epoch']}, our services:[/yellow] {escape(describe_incidents(r['incidents']))}")
    if curve:
        points = " -> ".join(f"{c['success_rate']:.0%} ({c['label']}, {c['after_epochs']} epochs)" for c in curve)
        console.print(f"held-out success ({curve[-1]['tasks']} tasks, greedy): {points}")
    _print_validation(ctx, rows, console=console)
    _print_agents(ctx, console=console)
    lake = config.lake.path
    _print_silences(ctx, console=console)
    _print_traces(config, rows, console=console)
    console.print(f"lake:    {lake}\nstate:   {ctx.catalog.state_root} (Delta tables)")
    if log_file is not None:
        console.print(f"log:     {log_file}")
    console.print(f'query:   arclight query --lake {lake} "SELECT * FROM rollout_summary WHERE run_id = \'{config.run_name}\' LIMIT 10"')
    console.print(f'         arclight query --lake {lake} "SELECT epoch, count(*), avg(reward) FROM triplets GROUP BY epoch"')


def where_traces_are(config: ArclightConfig) -> str:
    """How a user sees the project's traces: a tracking server's own page, or on a tracking store (SQLite) the one
    ``mlflow ui`` command and then its page (``mlflow ui --backend-store-uri http://...`` would not start)."""
    from lightning_core import tracking

    server = config.mlflow_uri.startswith(("http://", "https://"))  # a tracking server has its own UI
    ui = "" if server else f"mlflow ui --backend-store-uri {config.mlflow_uri}, then "
    return f"{ui}{tracking.traces_url(config)}"


def _print_traces(config: ArclightConfig, rows: list[dict[str, Any]], *, console: Console) -> None:
    """Where the run is in MLflow: the one ``mlflow ui`` command and the traces page, with how many rollouts it shows
    and the epochs whose traces are not all there (a failure or the time budget: ``arclight traces`` publishes them)."""
    reports = [(r["epoch"], r["traces"]) for r in rows if r["traces"]]
    console.print(f"MLflow:  {config.mlflow_uri}   ({where_traces_are(config)})")
    if reports:
        shown = sum(t["published"] + t["already"] for _, t in reports)
        console.print(f"traces:  {shown} rollouts of {len(reports)} epochs (tracking.traces={reports[-1][1]['mode']})")
    for epoch, t in reports:
        if t["error"] or t["left"]:
            why = t["error"] or f"{t['left']} left when tracking.traces_timeout_s ran out"
            console.print(f"[yellow]epoch {epoch}, traces:[/yellow] {escape(why)} (arclight traces --epoch {epoch} "
                          "publishes the rest)")


def _print_correction(rows: list[dict[str, Any]], *, console: Console) -> None:
    """One line under the table: how far vLLM's recorded logprobs were from the trainer's at each epoch's first step
    (the numerics' gap alone, on-policy), the behaviour correction the versions trained with and what it did there
    (the epochs table has each epoch's): under ppo the share of tokens the first micro-batch clipped; under decoupled,
    whose ratio is 1 there by construction, the share whose behaviour weight hit importance_cap and what ppo would
    have clipped."""
    def span(key: str, fmt: str, among: list[dict[str, Any]] = rows) -> str | None:
        values = [r[key] for r in among if r.get(key) is not None]
        if not values:
            return None
        low, high = format(min(values), fmt), format(max(values), fmt)
        return low if low == high else f"{low}-{high}"

    def trained_with(correction: str) -> list[dict[str, Any]]:
        return [r for r in rows if correction in (r["behaviour_correction"] or "").split(",")]

    used = sorted({c for r in rows if r["behaviour_correction"] for c in r["behaviour_correction"].split(",")})
    what = ""
    if clipped := span("clipped_first", ".1%", trained_with("ppo")):
        what += f"; ppo clipped at the first micro-batch: {clipped}"
    if capped := span("behaviour_capped_first", ".1%", trained_with("decoupled")):
        what += (f"; behaviour weight at importance_cap: {capped} of tokens (mean "
                 f"{span('behaviour_weight_first', '.3f', trained_with('decoupled'))}); ppo would have clipped "
                 f"{span('ppo_clipped_first', '.1%', trained_with('decoupled'))}")
    console.print(f"vLLM against the trainer, at each epoch's first step: logprob gap mean {span('logprob_gap_mean', '.4f')}, "
                  f"max {span('logprob_gap_max', '.2f')}; behaviour correction {', '.join(used) or '-'}{what} "
                  "(docs/config.md#vllm-and-the-trainer)")


def _print_validation(ctx: RunContext, rows: list[dict[str, Any]], *, console: Console) -> None:
    """With ``rollouts.validate_every``: the scores on the validation split and the best version, the run's result."""
    from lightning_core.epoch import validation

    if not ctx.config.rollouts.validate_every:
        return
    try:
        scores = validation.curve(ctx)
    except Exception as exc:  # the summary must not fail on a moved dataset; say why it is silent
        console.print(f"(could not read the run's validation scores: {escape(str(exc))})")
        return
    newest = next((r["new_version"] for r in reversed(rows) if r["new_version"]), None)
    if scores:
        console.print(escape(validation.describe(scores, config=ctx.config, newest=newest)), soft_wrap=True,
                      highlight=False)


def _print_signals(rows: list[dict[str, Any]], *, console: Console) -> None:
    """A table of what shows a collapse before the score falls, per epoch (and policy, when there are several): the
    share of zero-variance groups, the spread of returns within groups, the policy's entropy on its sampled tokens
    (the lowest of the epoch's policies) and tool calls per rollout, with reward and tool calls by the values of
    ``rollouts.metrics_by`` (sql/epoch_signals.sql; docs/config.md#collapse-signals)."""
    shown = [r for r in rows if r["signals"] or r["entropy"] is not None]
    if not shown:
        return
    policies = sorted({s["policy"] for r in shown for s in r["signals"]})
    fields = sorted({s["slice"].split("=", 1)[0] for r in shown for s in r["signals"] if s["slice"] != "all"})
    table = Table(title="collapse signals")
    for column in ("epoch", *(["policy"] if len(policies) > 1 else []), "zero-variance groups", "reward spread",
                   "entropy", "tool calls / rollout", *(f"by {f}: reward, tool calls" for f in fields)):
        table.add_column(column)

    def number(value: float | None, fmt: str) -> str:
        return "" if value is None else format(value, fmt)

    for r in shown:
        for policy in policies or [None]:
            mine = [s for s in r["signals"] if s["policy"] == policy]
            whole = next((s for s in mine if s["slice"] == "all"), {})
            by = [" · ".join(f"{s['slice'].split('=', 1)[1]}: {number(s['reward_mean'], '.3f')}, "
                             f"{number(s['tool_calls_per_rollout'], '.2f')}"
                             for s in mine if s["slice"].startswith(f"{f}=")) for f in fields]
            table.add_row(str(r["epoch"]), *([policy] if len(policies) > 1 else []),
                          number(whole.get("zero_variance_groups"), ".0%"), number(whole.get("reward_spread"), ".3f"),
                          number(r["entropy"], ".3f"), number(whole.get("tool_calls_per_rollout"), ".2f"), *by)
    print_table(console, table)


def _print_agents(ctx: RunContext, *, console: Console) -> None:
    """Print which agents were trained (by which policy) and which stayed frozen, with their first/last epoch."""
    from lightning_core.epoch.bookkeeping import agent_epochs

    rows = agent_epochs(ctx.catalog, run_id=ctx.run_id)
    if not rows:
        return
    table = Table(title="agents (training rollouts; reward and success of the rollouts each took part in)")
    for column in ("agent", "trained by", "epochs", "calls", "triplets", "reward first -> last", "success first -> last"):
        table.add_column(column)

    def span(first: float | None, last: float | None, fmt: str) -> str:
        return "" if first is None or last is None else f"{format(first, fmt)} -> {format(last, fmt)}"

    for agent in dict.fromkeys(r["agent_name"] for r in rows):
        mine = [r for r in rows if r["agent_name"] == agent]
        first, last = mine[0], mine[-1]
        policy = last["policy"]
        table.add_row(agent or "(no agent)", policy or "frozen (its calls train nothing)", str(len(mine)),
                      str(sum(r["calls"] for r in mine)), str(sum(r["triplets"] for r in mine)),
                      span(first["reward_mean"], last["reward_mean"], ".3f"),
                      span(first["success_rate"], last["success_rate"], ".0%"))
    print_table(console, table)
    trained = sorted({r["agent_name"] or "(no agent)" for r in rows if r["policy"]})
    frozen = sorted({r["agent_name"] or "(no agent)" for r in rows if not r["policy"]})
    console.print(f"trained: {', '.join(trained) or '-'}   frozen: {', '.join(frozen) or '-'}")


def _print_silences(ctx: RunContext, *, console: Console) -> None:
    """Warn about rollouts of the run whose spans gave no LLM call, or no reward (every epoch)."""
    from rich.text import Text

    from lightning_core.pipeline.silence import catalog_silences, print_silences

    try:
        silences = catalog_silences(ctx.catalog, run_id=ctx.run_id)
    except Exception as exc:  # the summary must not fail on a half-written catalog; say why it is silent
        console.print(Text(f"(could not check the run for rollouts without calls or rewards: {exc})"))
        return
    print_silences(silences, console=console, missing_reward=ctx.config.pipeline.missing_reward)
