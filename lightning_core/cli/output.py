"""What a long command shows (train, evaluate, optimize-prompt, up): our messages on the screen, the rest in a file.

On a terminal, one live display (``progress.py``) owns the screen and updates in place; above it go only our own
messages: what the flows say about their stages and the versions they trained, and our warnings. Prefect's records
(a line per task run, the tracebacks), MLflow's, transformers' (its progress bars are off), Python's warnings and
the tracebacks of a run that stopped go to the project's log file, ``<project>/.arclight/logs/arclight.log``,
beside the servers' own logs; the command prints its path first. Not on a terminal (CI, a pipe) there is no
display: the same messages come as one plain line each, and tables are as wide as their content rather than 80
columns. ``--verbose`` shows every record on the screen as well.
"""

from __future__ import annotations

import contextlib
import json
import logging
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Iterator

import typer
from rich.console import Console
from rich.measure import Measurement
from rich.table import Table
from rich.text import Text

from lightning_core.cli.common import fail
from lightning_core.common import logs
from lightning_core.common.redact import redacted_argv
from lightning_core.config import ArclightConfig

VerboseOpt = typer.Option(False, "--verbose", "-v", help="Show Prefect's, MLflow's and transformers' log records, "
                          "warnings and progress bars on the screen too (they always go to the log file).")
FormatOpt = typer.Option("text", "--format", "-f", help="text: the result as lines a person reads; json: the result "
                         "as one JSON object on standard output (messages and progress stay on standard error).")
FORMATS = ("text", "json")
LEVELS = {logging.WARNING: ("warning: ", "yellow"), logging.ERROR: ("error: ", "red"), logging.CRITICAL: ("error: ", "red")}


class ScreenHandler(logging.Handler):
    """Print each record as one line on the command's console: above the live display while one runs.

    The line is the time and the message's first line (a failed rollout's warning carries the agent's traceback:
    the whole record is in the log file); ``verbose`` shows the whole message, the logger's name and any traceback."""

    def __init__(self, console: Console, *, verbose: bool = False) -> None:
        super().__init__(level=logging.INFO)
        self.console, self.verbose = console, verbose
        self.setFormatter(logging.Formatter("%(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        try:
            label, style = LEVELS.get(record.levelno, ("", ""))
            line = Text(time.strftime("%H:%M:%S ", time.localtime(record.created)), style="dim")
            if self.verbose:
                run = getattr(record, "task_run_name", None) or getattr(record, "flow_run_name", None)
                kind = "Task run" if getattr(record, "task_run_name", None) else "Flow run"
                line.append(f"{record.name}: " + (f"{kind} {run!r} - " if run else ""), style="dim")
            line.append(label, style=style)
            message = record.getMessage()
            first, more = message.partition("\n")[::2]
            line.append(message if self.verbose else first + (" [more in the log]" if more.strip() else ""))
            if self.verbose and record.exc_info:
                line.append("\n" + "".join(traceback.format_exception(*record.exc_info)).rstrip())
            self.console.print(line, soft_wrap=True, highlight=False)
        except Exception:  # noqa: BLE001 - logging's own contract: a handler reports, never raises
            self.handleError(record)


@contextlib.contextmanager
def command_output(config: ArclightConfig, *, console: Console, verbose: bool = False) -> Iterator[Path]:
    """Within the block, log records go to the project's log file and, ours only (all with ``verbose``), to
    ``console``; the libraries' own output goes with them (``logs.project_log``). Print the file's path; yield it."""
    path = logs.log_path(config.project_dir)
    screen = ScreenHandler(console, verbose=verbose)
    if not verbose:
        screen.addFilter(logs.Ours())
    with logs.project_log(path, screen=screen, progress_bars=verbose):
        # the file is the one an error asks the user to share: tokens and keys given as --set stay out of it
        logging.getLogger("arclight.cli").info("arclight %s", " ".join(redacted_argv(sys.argv[1:])),
                                               extra={"screen": False})
        console.print(Text(f"log: {path}", style="dim"), soft_wrap=True)
        yield path


def print_table(console: Console, table: Table) -> None:
    """Print ``table`` whole: a cell that does not fit folds onto another line instead of ending in "…"; not on a
    terminal, the table is as wide as its content (a pipe's console would otherwise be 80 columns)."""
    for column in table.columns:
        column.overflow = "fold"
    if console.is_terminal:
        console.print(table)
        return
    width, previous = Measurement.get(console, console.options.update_width(10_000), table).maximum, console.width
    console.width = max(width, previous)  # the same console, so that a recording console records the table too
    try:
        console.print(table)
    finally:
        console.width = previous


def check_format(fmt: str) -> None:
    """Exit with status 2 unless ``--format`` is one this command prints (before anything starts)."""
    if fmt not in FORMATS:
        fail(f"--format must be {' or '.join(FORMATS)}, not {fmt!r}", code=2)


def print_result(result: Any, *, fmt: str, text: str) -> None:
    """The command's result on standard output: ``text`` (a line a person reads), or with ``--format json`` the
    result itself as one line of JSON, the same values the log file keeps."""
    sys.stdout.write((json.dumps(result, default=str) if fmt == "json" else text) + "\n")
    sys.stdout.flush()
