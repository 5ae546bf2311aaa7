"""The ``arclight`` command line: one Typer app, its commands registered from one module per command group.

    lake.py      collector, query, shell, views, compact, migrate-lake, triplets, traces
    serve.py     gateway, serve, redeploy, model prepare, up, status, down
    train.py     train, evaluate
    init.py      init
    prompts.py   optimize-prompt, prompts
    demo.py      demo

``common.py`` holds what they share: the project options (``@project``), loading the config, errors as one line.
"""

from __future__ import annotations

import typer

from lightning_core.cli import demo, init, lake, prompts, serve, train

app = typer.Typer(no_args_is_help=True, add_completion=False, help="Train LLM agents from their own traces.")
model_app = typer.Typer(no_args_is_help=True, help="Base model folders (no hub downloads).")

for name, command in (("collector", lake.collector), ("query", lake.query), ("shell", lake.shell),
                      ("compact", lake.compact), ("views", lake.views), ("migrate-lake", lake.migrate_lake),
                      ("demo", demo.demo), ("init", init.init)):
    app.command(name)(command)
app.add_typer(model_app, name="model")
model_app.command("prepare")(serve.model_prepare)
for name, command in (("gateway", serve.gateway), ("serve", serve.serve), ("redeploy", serve.redeploy),
                      ("triplets", lake.triplets), ("traces", lake.traces), ("train", train.train), ("evaluate", train.evaluate),
                      ("optimize-prompt", prompts.optimize_prompt), ("prompts", prompts.prompts), ("up", serve.up),
                      ("status", serve.status), ("down", serve.down)):
    app.command(name)(command)

def main() -> None:
    """Entry point for ``python -m lightning_core``."""
    app()
