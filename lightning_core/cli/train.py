"""Training commands: the main job (`arclight train`) and a held-out evaluation, each a Prefect flow run with progress."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from lightning_core.cli.common import console, prefect_api, project
from lightning_core.cli.output import FormatOpt, VerboseOpt, check_format, print_result
from lightning_core.cli.prompts import check_prompt_versions
from lightning_core.common.redact import held_back
from lightning_core.config import ArclightConfig


@project(positional=True)
def train(
    cfg: ArclightConfig,
    config: Path,
    overrides: list[str],
    epochs: Optional[int] = typer.Option(None, help="Total epochs the run should have (default: the config's epochs)."),
    verbose: bool = VerboseOpt,
) -> None:
    """Train: start what is needed, run epochs through Prefect with progress, then summarise."""
    from lightning_core.cli.progress import print_summary, run_with_progress
    from lightning_core.epoch.bookkeeping import next_epoch
    from lightning_core.store.catalog import Catalog

    target = epochs or cfg.epochs
    extra = list(overrides or [])
    catalog = Catalog.from_config(cfg)
    catalog.ensure()
    have = next_epoch(catalog, run_id=cfg.run_name)
    if have >= target:  # --epochs is the run's total: nothing to start
        console.print(f"run {cfg.run_name} already has {have} completed epochs, and --epochs is the run's total: "
                      f"{target} trains none (--epochs {have + 1} trains one more)", soft_wrap=True, highlight=False)
        print_summary(cfg, console=console)
        return

    def work():
        with prefect_api(cfg), held_back(extra) as shown:  # a flow run's parameters are kept and shown: no secret
            from flows.train import train as train_flow

            return train_flow(config_path=str(config), overrides=shown, epochs=target)

    run_with_progress(cfg, work, console=console, epochs=target, title=f"training {cfg.name} / run {cfg.run_name}",
                      verbose=verbose)


@project(positional=True)
def evaluate(
    cfg: ArclightConfig,
    config: Path,
    overrides: list[str],
    label: Optional[str] = typer.Option(None, help="Name of this evaluation (default: the versions serving)."),
    prompt: Optional[list[str]] = typer.Option(None, "--prompt", help="Score this prompt version (e.g. system-v3) "
                                               "instead of the serving one (repeatable; `arclight prompts` lists them)."),
    verbose: bool = VerboseOpt,
    fmt: str = FormatOpt,
) -> None:
    """Evaluate the serving policy on the held-out tasks and print success rate and reward."""
    from lightning_core.cli.progress import run_with_progress
    from lightning_core.epoch import sentences

    check_format(fmt)
    extra = list(overrides or [])
    check_prompt_versions(cfg, prompt)

    def work():
        with prefect_api(cfg), held_back(extra) as shown:  # a flow run's parameters are kept and shown: no secret
            from flows.train import evaluate as evaluate_flow

            return evaluate_flow(config_path=str(config), overrides=shown, label=label,
                                 prompt_versions=list(prompt or []) or None)

    result = run_with_progress(cfg, work, console=console, epochs=None, title=f"evaluating {cfg.name}", summary=False,
                               verbose=verbose)
    if result is not None:
        print_result(result, fmt=fmt, text=sentences.evaluation(result))
