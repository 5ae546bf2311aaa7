"""The collector demo: a traced multi-agent workload flows through a real collector into the lake."""

from __future__ import annotations

import random
import time

import typer
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from lightning_core import tracing
from lightning_core.store.catalog import Catalog
from lightning_core.cli.common import console, project
from lightning_core.config import ArclightConfig
from lightning_core.ingest.service import start_collector


def _rollout(rng: random.Random, task: int) -> None:
    a, b = rng.randint(2, 99), rng.randint(2, 99)
    with tracing.agent("planner", task=f"{a}*{b}"):
        tracing.emit_message(f"What is {a} * {b}?", role="user")
        with tracing.agent("executor"):
            with tracing.tool("calculator", expression=f"{a}*{b}"):
                answer = a * b if rng.random() > 0.3 else a * b + 1
            tracing.emit_message(f"ANSWER: {answer}")
    tracing.emit_reward(1.0 if answer == a * b else 0.0)


def run_demo(config: ArclightConfig, *, rollouts: int, console: Console) -> None:
    """Start a collector, trace ``rollouts`` demo rollouts through it, and summarise the lake."""
    catalog = Catalog.from_config(config)
    catalog.ensure()
    console.print(f"starting the collector for lake {config.lake.path}")
    service = start_collector(config)
    try:
        rng = random.Random(0)
        started = time.monotonic()
        with Progress(console=console) as progress:
            bar = progress.add_task("tracing demo rollouts", total=rollouts)
            for i in range(rollouts):
                context = tracing.RolloutContext(run_id=config.run_name, epoch=0, rollout_id=f"demo-{i}", task_id=f"task-{i % 5}")
                handle = tracing.init_tracing(endpoint=service.url, context=context, set_global=False, service_name="demo-agent")
                _rollout(rng, i)
                handle.flush()
                handle.shutdown()
                progress.advance(bar)
        elapsed = time.monotonic() - started
    finally:
        service.stop()
    with catalog.read() as con:
        rows = con.execute(
            """
            SELECT rollout_id, count(*) AS spans, max(reward_value) AS reward,
                   string_agg(DISTINCT agent_name, ',' ORDER BY agent_name) AS agents
            FROM spans WHERE run_id = ? AND epoch = 0
            GROUP BY rollout_id ORDER BY rollout_id LIMIT 10
            """,
            [config.run_name],
        ).fetchall()
        total = con.execute("SELECT count(*) FROM spans WHERE run_id = ?", [config.run_name]).fetchall()[0][0]
    table = Table(title=f"run {config.run_name}: {total} spans from {rollouts} rollouts in {elapsed:.1f} s (first 10)")
    for column in ("rollout", "spans", "reward", "agents"):
        table.add_column(column)
    for rollout_id, spans, reward, agents in rows:
        table.add_row(rollout_id, str(spans), f"{reward}", agents or "")
    console.print(table)
    console.print(f"lake: {config.lake.path}\nstate tables: {catalog.state_root}")
    console.print(f'query it: arclight query --lake {config.lake.path} "SELECT name, count(*) FROM spans GROUP BY name"')


@project(lake=True)
def demo(
    cfg: ArclightConfig,
    rollouts: int = typer.Option(20, help="How many demo agent rollouts to trace."),
) -> None:
    """Start a collector, trace a small multi-agent demo through it, and query the result."""
    run_demo(cfg, rollouts=rollouts, console=console)
