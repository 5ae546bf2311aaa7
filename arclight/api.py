"""``arclight.train``: the way in from Python and notebooks, the same ``train`` flow `arclight train` runs.

Its keyword arguments are the config's keys (docs/config.md), one set of names: a section as a mapping
(``rollouts={"group_size": 4}``) or a dotted key (``**{"rollouts.group_size": 4}``), on top of an optional config
file. Four are shortcuts for what every call names: ``agent`` (``rollouts.agent``, or ``rollouts.command`` for a
list), ``dataset`` and ``eval_dataset`` (``rollouts.*``: a JSONL path or the tasks themselves) and ``agent_match``
(the one policy's). They become the same ``--set KEY=VALUE`` overrides the command line passes, so the flow, its
resume and its records are the command's. The caller's logging is left as it was found, and Ctrl-C stops the run as
it stops the command, then comes out as ``KeyboardInterrupt``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import yaml
from pydantic import BaseModel

from lightning_core.config import ArclightConfig, ConfigError, load_config

PathLike = str | os.PathLike[str]
Tasks = PathLike | Sequence[Mapping[str, Any]]
TASKS_DIR = Path(".arclight") / "datasets"  # under the project folder: tasks given as a list, one file per content


@dataclass(frozen=True)
class TrainResult:
    """What a run holds after ``train``: its epochs, its held-out evaluations, its versions, and where it all is."""

    config: ArclightConfig
    epochs: list[dict[str, Any]]  # one row per epoch: status, reward_mean, new_version, rollouts ... (arclight runs)
    evaluations: list[dict[str, Any]]  # held-out: after_epochs, label, tasks, reward_mean, success_rate
    versions: list[str]  # the policy versions the run trained, in order (writer-v1, writer-v2, ...)
    agents: list[dict[str, Any]]  # per epoch and agent: agent_name, policy (None: frozen), calls, triplets, reward_mean
    log_file: Path  # the project's log: every record of the run, the libraries' too

    @property
    def lake(self) -> Path:
        """The lake: spans, triplets and the state tables (``arclight query``, ``lightning_core.analyst``)."""
        return Path(self.config.lake.path)

    @property
    def mlflow_uri(self) -> str:
        """The MLflow tracking URI (``mlflow ui --backend-store-uri <this>``)."""
        return self.config.mlflow_uri

    @property
    def experiment(self) -> str:
        """The MLflow experiment that holds the run's metrics, traces and registered versions."""
        return self.config.tracking.experiment or self.config.name


def train(*, agent: Callable[..., Any] | str | Sequence[str] | None = None, dataset: Tasks | None = None,
          eval_dataset: Tasks | None = None, agent_match: str | None = None, config: PathLike | None = None,
          verbose: bool = False, **settings: Any) -> TrainResult:
    """Train until the run has ``epochs`` completed epochs (the run's total, as ``arclight train --epochs``); return
    its result. A second call on the same run resumes it: it trains the epochs still missing, or none."""
    from lightning_core.common import logs
    from lightning_core.common.redact import held_back
    from lightning_core.common.stopping import on_signals
    from lightning_core.epoch.bookkeeping import next_epoch
    from lightning_core.store.catalog import Catalog

    overrides = _overrides(agent=agent, dataset=dataset, eval_dataset=eval_dataset, agent_match=agent_match,
                           config=config, settings=settings)
    cfg = load_config(config, overrides=overrides)
    catalog = Catalog.from_config(cfg)
    catalog.ensure()
    with logs.as_found(), _screen_and_file(cfg, overrides, verbose=verbose):
        if next_epoch(catalog, run_id=cfg.run_name) < cfg.epochs:  # the run's total: a run that has it trains none
            with on_signals(), _prefect_api(cfg), held_back(overrides) as shown:
                from flows.train import train as train_flow

                train_flow(config_path=str(config) if config is not None else None, overrides=shown, epochs=cfg.epochs)
        return _result(cfg)


def config(*, agent: Callable[..., Any] | str | Sequence[str] | None = None, dataset: Tasks | None = None,
           eval_dataset: Tasks | None = None, agent_match: str | None = None, config: PathLike | None = None,
           **settings: Any) -> ArclightConfig:
    """The config ``train`` would run with these arguments, checked, without running anything."""
    return load_config(config, overrides=_overrides(agent=agent, dataset=dataset, eval_dataset=eval_dataset,
                                                    agent_match=agent_match, config=config, settings=settings))


def _overrides(*, agent: Any, dataset: Tasks | None, eval_dataset: Tasks | None, agent_match: str | None,
               config: PathLike | None, settings: Mapping[str, Any]) -> list[str]:
    """The ``KEY=VALUE`` overrides the arguments make, as the command line would pass them with ``--set``."""
    nested: dict[str, Any] = {}
    for key, value in settings.items():
        _put(nested, key.split("."), value)
    if config is None and "project_dir" not in nested:
        nested["project_dir"] = os.getcwd()  # as a config file's folder is its project's: relative paths start here
    if agent is not None:
        key = "command" if isinstance(agent, (list, tuple)) else "agent"
        _put(nested, ["rollouts", key], list(agent) if key == "command" else agent_reference(agent))
        if key == "agent" and callable(agent):
            folder = _import_root(agent)
            paths = list(nested.get("rollouts", {}).get("agent_path") or [])
            if folder is not None and str(folder) not in map(str, paths):
                _put(nested, ["rollouts", "agent_path"], [*paths, str(folder)])
    if agent_match is not None:
        if "policies" in nested:
            raise ConfigError(f"agent_match={agent_match!r} and policies= were both given: agent_match is the one "
                              "policy's; with several policies give each its own agent_match inside policies=[...]")
        nested["policies"] = [{"name": "default", "agent_match": agent_match}]
    overrides = [f"{key}={_yaml(value)}" for key, value in _flat(nested, ArclightConfig)]
    if dataset is not None or eval_dataset is not None:
        project = Path(load_config(config, overrides=overrides).project_dir)
        for key, tasks in (("dataset", dataset), ("eval_dataset", eval_dataset)):
            if tasks is not None:
                overrides.append(f"rollouts.{key}={_yaml(str(task_file(tasks, project_dir=project, what=key)))}")
    return overrides


def _put(nested: dict[str, Any], parts: list[str], value: Any) -> None:
    """Set ``parts`` (a dotted key's) in ``nested``; a mapping merges with what an earlier key set there."""
    node = nested
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"setting {'.'.join(parts)}: {part!r} was given a value, not a section")
    last = parts[-1]
    if isinstance(value, Mapping) and value:  # copied key by key: the caller's mappings are never changed
        if not isinstance(node.get(last), dict):
            node[last] = {}
        for key, inner in value.items():
            _put(node[last], [str(key)], inner)
    else:
        node[last] = {} if isinstance(value, Mapping) else value


def _flat(nested: Mapping[str, Any], model: type[BaseModel] | None, prefix: str = "") -> list[tuple[str, Any]]:
    """Dotted keys and their values: a mapping given for a section (or a mapping of the user's, such as
    ``rollouts.resources``) is spread over its keys, as a config file's ``extends`` merges it; any other value
    (a list, a scalar, an empty mapping) is set whole."""
    out = []
    for key, value in nested.items():
        field = model.model_fields.get(key) if model is not None else None
        section = _section_model(field)
        if isinstance(value, Mapping) and value and (section is not None or _is_mapping(field) or model is None):
            out += _flat(value, section, f"{prefix}{key}.")
        else:
            out.append((f"{prefix}{key}", value))
    return out


def _section_model(field: Any) -> type[BaseModel] | None:
    annotation = getattr(field, "annotation", None)
    return annotation if isinstance(annotation, type) and issubclass(annotation, BaseModel) else None


def _is_mapping(field: Any) -> bool:
    annotation = getattr(field, "annotation", None)
    return getattr(annotation, "__origin__", annotation) is dict


def _yaml(value: Any) -> str:
    """``value`` as the YAML text an override carries, read back by the config loader as the same value (a float
    such as 1e-05 stays a float; a string that reads as a number stays a string)."""
    text = yaml.safe_dump(_plain(value), default_flow_style=True, width=1 << 30, allow_unicode=True)
    return text.removesuffix("\n...\n").rstrip("\n")


def _plain(value: Any) -> Any:
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def agent_reference(agent: Callable[..., Any] | str) -> str:
    """The agent as ``rollouts.agent`` names it, ``module:function``. Rollouts run in fresh processes that import it
    by that name, so it must be a function at the top level of a module they can import."""
    if isinstance(agent, str):
        return agent
    module, qualname = getattr(agent, "__module__", None), getattr(agent, "__qualname__", None)
    name = qualname or repr(agent)
    if not callable(agent) or not module or not qualname:
        raise ConfigError(f"agent={agent!r}: expected a function defined at the top level of a module, or "
                          "'module:function'; found a callable without a module-level name (a functools.partial or "
                          "an object): wrap it in a function in a module file")
    if module == "__main__":
        raise ConfigError(f"agent={name}: it is defined in __main__ (a notebook, or the script being run), which the "
                          "rollouts cannot import: each runs in a fresh process that imports the agent by "
                          "'module:function'. Put the function in a module file (in a notebook: %%writefile "
                          "my_agent.py), import it from there and pass it, or pass agent='my_agent:run'")
    if "<lambda>" in qualname or "<locals>" in qualname or "." in qualname:
        raise ConfigError(f"agent={module}.{name}: a lambda, a nested function or a method cannot be imported by "
                          "name in the rollouts' processes; expected a function defined at the top level of its "
                          "module")
    if getattr(sys.modules.get(module), qualname, None) is not agent:
        raise ConfigError(f"agent={module}.{name}: module {module!r} has no top-level name {qualname!r} that is this "
                          "function (was it redefined or decorated?); pass agent='module:function'")
    return f"{module}:{qualname}"


def _import_root(agent: Callable[..., Any]) -> Path | None:
    """The folder the agent's module is imported from (its top-level package's parent), for ``rollouts.agent_path``."""
    module = sys.modules.get(getattr(agent, "__module__", ""))
    file = getattr(module, "__file__", None)
    if not file:
        return None
    folder = Path(file).resolve().parent
    depth = agent.__module__.count(".") + (Path(file).name == "__init__.py")
    for _ in range(depth):
        folder = folder.parent
    return folder


def task_file(tasks: Tasks, *, project_dir: Path, what: str = "dataset") -> Path:
    """A JSONL file of ``tasks``: the path given, or the tasks written to ``<project>/.arclight/datasets/<sha>.jsonl``
    (named by content: the same tasks are the same file, and so the same held-out evaluation)."""
    if isinstance(tasks, (str, os.PathLike)):
        return Path(tasks)
    rows = list(tasks)
    if not rows or not all(isinstance(row, Mapping) for row in rows):
        kinds = sorted({type(row).__name__ for row in rows}) or ["nothing"]
        raise ConfigError(f"{what}: expected a JSONL path or a non-empty list of tasks (dicts), found a list of "
                          f"{', '.join(kinds)}")
    text = "".join(json.dumps(dict(row), ensure_ascii=False) + "\n" for row in rows)
    path = project_dir / TASKS_DIR / f"{hashlib.sha256(text.encode()).hexdigest()[:16]}.jsonl"
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(text)
        tmp.replace(path)
    return path


@contextlib.contextmanager
def _screen_and_file(cfg: ArclightConfig, overrides: list[str], *, verbose: bool) -> Iterator[Path]:
    """For the block, our stage messages on stderr (every record with ``verbose``) and every record in the project's
    log file, as the command shows them (without its live display); yield the file's path."""
    from rich.console import Console

    from lightning_core.cli.output import ScreenHandler
    from lightning_core.common import logs
    from lightning_core.common.redact import redacted_overrides

    path = logs.log_path(cfg.project_dir)
    screen = ScreenHandler(Console(stderr=True, soft_wrap=True), verbose=verbose)
    if not verbose:
        screen.addFilter(logs.Ours())
    with logs.project_log(path, screen=screen, progress_bars=verbose):
        logging.getLogger("arclight.api").info("arclight.train with %s", " ".join(redacted_overrides(overrides)),
                                               extra={"screen": False})
        yield path


@contextlib.contextmanager
def _prefect_api(cfg: ArclightConfig) -> Iterator[str]:
    """The Prefect API the flow reports to: one already set (``PREFECT_API_URL``, or Prefect's settings in this
    process: a profile, a test harness), else one started for the call, as the command does."""
    from flows.api import prefect_api

    url = None
    if "PREFECT_API_URL" not in os.environ:
        from prefect.settings import PREFECT_API_URL

        url = PREFECT_API_URL.value() or None
    if url:
        os.environ["PREFECT_API_URL"] = url  # flows.api.prefect_api then uses it, and starts none
    try:
        with prefect_api(Path(cfg.project_dir) / ".arclight" / "logs") as api:
            yield api
    finally:
        if url:
            os.environ.pop("PREFECT_API_URL", None)


def _result(cfg: ArclightConfig) -> TrainResult:
    from lightning_core.common import logs
    from lightning_core.epoch import reports
    from lightning_core.epoch.bookkeeping import agent_epochs
    from lightning_core.epoch.context import RunContext

    ctx = RunContext.of(cfg)
    rows = reports.summary_rows(ctx)
    versions = [v for row in rows if row["new_version"] for v in str(row["new_version"]).split(",")]
    return TrainResult(config=cfg, epochs=rows, evaluations=reports.eval_curve(ctx), versions=versions,
                       agents=agent_epochs(ctx.catalog, run_id=cfg.run_name), log_file=logs.log_path(cfg.project_dir))
