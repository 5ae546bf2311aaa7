"""Prompt commands: optimise a prompt resource (APO) and list the versions of a project's prompts."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.markup import escape

from lightning_core.cli.common import console, fail, need_lake, prefect_api, project
from lightning_core.cli.output import FormatOpt, VerboseOpt, check_format, print_result, print_table
from lightning_core.common.redact import held_back
from lightning_core.config import ArclightConfig


@project(positional=True)
def optimize_prompt(cfg: ArclightConfig, config: Path, overrides: list[str], verbose: bool = VerboseOpt,
                    fmt: str = FormatOpt) -> None:
    """Improve prompt resources by GEPA with a critic (APO); promote the best version; report held-out scores."""
    from lightning_core.apo import search as apo
    from lightning_core.cli.progress import run_with_progress

    check_format(fmt)
    try:
        target = "+".join(apo.target_prompts(cfg))
    except apo.ApoError as exc:
        fail(str(exc), code=2)
    extra = list(overrides or [])

    def work():
        with prefect_api(cfg), held_back(extra) as shown:  # a flow run's parameters are kept and shown: no secret
            from flows.optimize_prompt import optimize_prompt as search_flow

            return search_flow(config_path=str(config), overrides=shown)

    result = run_with_progress(cfg, work, console=console, epochs=None, summary=False, run_id=apo.run_id(cfg),
                               title=f"optimising prompt {target!r} of {cfg.name}", verbose=verbose)
    if result is not None and fmt == "json":
        print_result(result, fmt=fmt, text="")
    elif result is not None:
        _print_search(result)


def _print_search(result: dict) -> None:
    from rich.table import Table

    table = Table(title=f"prompt search {result['run_id']}: {result['rollouts']} rollouts, {result['critic_calls']} critic "
                        f"calls, {result['wall_s'] / 60:.1f} min")
    for column in ("candidate kept", "candidates", "new", "best so far", "best score", "rejected proposals"):
        table.add_column(column)
    for r in result["rounds"]:
        table.add_row(str(r["round"]), str(r["candidates"]), str(r["new"]), r["best"], f"{r['best_score'] or 0:.3f}",
                      str(len(r["rejected"])))
    print_table(Console(), table)
    for version, held in result["held_out"].items():
        console.print(escape(f"held-out {version}: reward {held['reward_mean']:.3f}, success {held['success_rate']:.0%} "
                             f"on {held['tasks']} tasks"))
    verb = "now serves" if result["promoted"] else "keeps serving"
    console.print(escape(f"prompt {result['prompt']} {verb} {result['best'] if result['promoted'] else result['start']} "
                         f"(started from {result['start']}); `arclight prompts CONFIG` lists every version"))


@project(positional=True)
def prompts(
    cfg: ArclightConfig,
    show: Optional[str] = typer.Option(None, "--show", help="Print one version's text and critique."),
) -> None:
    """List the versions of the project's prompts: parent, score, how each was made, which serves."""
    from rich.table import Table

    from lightning_core.apo import prompts as prompt_store
    from lightning_core.store.catalog import Catalog

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
        fail(str(exc), code=2)
    table = Table()
    for column in ("version", "serving", "parent", "made by", "round", "score", "rollouts", "text"):
        table.add_column(column, overflow="fold")
    for v in prompt_store.versions(catalog):
        table.add_row(v.version, "*" if v.serving else "", v.parent_version or "", v.made_by, "" if v.round is None else str(v.round),
                      "" if v.score is None else f"{v.score:.3f}", "" if v.score_tasks is None else str(v.score_tasks),
                      escape(v.text[:80].replace("\n", " ")))
    Console().print(table)


def check_prompt_versions(cfg: ArclightConfig, versions: Optional[list[str]]) -> None:
    """Exit 2 with one line unless every named prompt version exists and belongs to a configured prompt."""
    if not versions:
        return
    from lightning_core.apo import prompts
    from lightning_core.store.catalog import Catalog

    need_lake(cfg)
    catalog = Catalog.from_config(cfg)
    catalog.ensure()
    try:
        prompts.resolve(catalog, cfg, list(versions))
    except prompts.PromptError as exc:
        console.print(f"[red]error:[/red] {escape(str(exc))}")
        raise typer.Exit(2) from None
