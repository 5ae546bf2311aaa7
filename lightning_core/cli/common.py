"""What every command shares: the console, the project options and the loaded config, errors as one line.

A command that works on a project is written as ``def query(cfg: ArclightConfig, sql: str = ..., ...)`` and
decorated with ``@project(...)``: the decorator gives it ``--config`` (or a CONFIG argument), ``--set``
(repeatable) and, for the lake commands, ``--lake``, loads the config once, and calls it with ``cfg``. A config
that does not load exits with status 2 and one line per problem; ``fail`` ends any other error the same way.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import typing
from pathlib import Path
from typing import Any, Callable, Iterator, NoReturn, Optional

import typer
from rich.console import Console
from rich.markup import escape

from lightning_core.config import ArclightConfig, ConfigError, load_config

console = Console(stderr=True, soft_wrap=True)

ConfigOpt = typer.Option(None, "--config", "-c", help="Project config YAML (default: built-in defaults).")
ConfigArg = typer.Argument(..., help="Project config YAML, e.g. examples/calc/config.yaml.")
SetOpt = typer.Option(None, "--set", help="Override a config key, e.g. --set collector.port=4319 (repeatable).")
LakeOpt = typer.Option(None, "--lake", help="Lake folder (overrides lake.path).")
AtEpochOpt = typer.Option(None, "--at-epoch", metavar="RUN:EPOCH",
                          help="Query the snapshot that epoch's pipeline read and wrote (its spans and triplets).")


def fail(message: str, *, code: int = 1, label: str = "error") -> NoReturn:
    """Print ``label: message`` on one line (markup escaped) and exit with ``code``."""
    console.print(f"[red]{label}:[/red] {escape(message)}")
    raise typer.Exit(code)


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
        fail(str(exc), code=2, label="config error")


def project(*, lake: bool = False, positional: bool = False, settings: dict[str, str] | None = None) -> Callable:
    """Give a command the project options and call it with the loaded config as ``cfg``.

    ``lake`` adds ``--lake``; ``positional`` takes the config as the first argument (CONFIG) instead of
    ``--config``; ``settings`` maps the command's own plain options to config keys (``{"host":
    "collector.host"}``): those given are set literally, and the command still receives them. A command
    that declares ``config`` or ``overrides`` gets them as given too (a flow loads its own config from them).
    """
    def wrap(command: Callable) -> Callable:
        hints = typing.get_type_hints(command)
        declared = inspect.signature(command).parameters
        passed = {"config", "overrides"} & set(declared)  # a flow command passes them on: the flow loads its own
        own = [p.replace(annotation=hints.get(p.name, p.annotation))
               for p in declared.values() if p.name not in ("cfg", "config", "overrides")]
        keyword = inspect.Parameter.KEYWORD_ONLY
        config = (inspect.Parameter("config", inspect.Parameter.POSITIONAL_OR_KEYWORD, default=ConfigArg, annotation=Path)
                  if positional else inspect.Parameter("config", keyword, default=ConfigOpt, annotation=Optional[Path]))
        added = [inspect.Parameter("overrides", keyword, default=SetOpt, annotation=Optional[list[str]])]
        if lake:
            added.append(inspect.Parameter("lake", keyword, default=LakeOpt, annotation=Optional[Path]))
        params = [config, *own, *added] if positional else [*own, config, *added]

        @functools.wraps(command)
        def run(*args: Any, config: Optional[Path] = None, overrides: Optional[list[str]] = None,
                lake: Optional[Path] = None, **kwargs: Any) -> Any:
            values = {key: None if kwargs.get(name) == "" else kwargs.get(name) for name, key in (settings or {}).items()}
            cfg = load(config, overrides, lake=lake, values=values)
            source = {"config": config, "overrides": list(overrides or [])}
            return command(*args, cfg=cfg, **{k: source[k] for k in passed}, **kwargs)

        run.__signature__ = inspect.Signature([p.replace(kind=keyword) if p.kind == inspect.Parameter.VAR_KEYWORD else p
                                               for p in params])
        run.__annotations__ = {p.name: p.annotation for p in params}
        return run

    return wrap


def epoch_arg(text: str | None) -> tuple[str, int] | None:
    """``RUN:EPOCH`` -> (run, epoch); a malformed value exits with status 2."""
    if text is None:
        return None
    run_id, _, epoch = text.rpartition(":")
    if not run_id or not epoch.isdigit():
        fail(f"--at-epoch takes RUN:EPOCH (for example calc:3), not {text!r}", code=2)
    return run_id, int(epoch)


def need_lake(cfg: ArclightConfig) -> None:
    """Exit 2 unless the lake folder exists: commands that read a lake never create one."""
    path = Path(cfg.lake.path)
    if not path.is_dir():
        what = "is not a folder" if path.exists() else "does not exist"
        fail(f"no lake at {path}: it {what}; check --lake or lake.path (the collector creates a lake)", code=2)


@contextlib.contextmanager
def lake_io(cfg: ArclightConfig) -> Iterator[None]:
    """Turn an OS error on the lake's files (a parent that is a file, no permission, disk full) into one line."""
    import duckdb

    from lightning_core.store.delta import LakeFormatError
    from lightning_core.store.spans import ConcurrentCompaction

    try:
        yield
    except (LakeFormatError, ConcurrentCompaction) as exc:
        fail(str(exc))
    except (OSError, duckdb.IOException) as exc:
        reason = f"{exc.strerror} ({exc.filename})" if isinstance(exc, OSError) and exc.strerror else str(exc).splitlines()[0]
        fail(f"the lake at {cfg.lake.path} cannot be used: {reason}; pass --lake with a folder you can write")


def prefect_api(cfg: ArclightConfig):
    """The Prefect API the command's flows report to: the user's, or one started (and stopped) for the command."""
    from flows.api import prefect_api as api

    return api(Path(cfg.project_dir) / ".arclight" / "logs")
