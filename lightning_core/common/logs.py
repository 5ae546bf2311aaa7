"""Where a process's log records go: the project's log file, and the libraries' own output turned into log records.

Left alone, each library writes to the terminal itself: Prefect a line per task run and a traceback per failed
one, MLflow its database migrations, transformers a progress bar per model load and save, Python a FutureWarning
per epoch (peft asks transformers for a deprecated property). ``libraries_to_logging`` turns each of those into
log records, or off, with the library's own switch, and ``project_log`` sends every record to
``<project>/.arclight/logs/arclight.log`` (beside the servers' own logs). ``Ours`` picks out the records a user
is meant to read on the screen: what our flows log about their stages, and our warnings.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import logging.handlers
import os
from pathlib import Path
from typing import Callable, Iterator

import lightning_core

LOG_FILE = "arclight.log"
LOG_BYTES = 50 * 1024 * 1024  # then the file rolls over: arclight.log.1, .2
LOG_BACKUPS = 2
FORMAT = "%(asctime)s %(levelname)-7s %(name)s: %(message)s"
# our code's loggers, and the Prefect loggers our flows and tasks log their stages through (get_run_logger)
OUR_LOGGERS = ("arclight", "lightning_core", "flows", "tasks")
RUN_LOGGERS = ("prefect.flow_runs", "prefect.task_runs")
# the loggers whose INFO records go to the file; other libraries' records go there from WARNING up (httpx would
# write a line per request, SQLAlchemy one per statement)
INFO_LOGGERS = (*OUR_LOGGERS, "mlflow")


def log_path(project_dir: Path | str) -> Path:
    """The project's log file: ``<project>/.arclight/logs/arclight.log``."""
    return Path(project_dir) / ".arclight" / "logs" / LOG_FILE


def _our_folders() -> tuple[str, ...]:
    """The folders of our packages (lightning_core, flows, tasks), each ending in a separator."""
    folders = [os.path.dirname(lightning_core.__file__)]
    for name in ("flows", "tasks"):
        spec = importlib.util.find_spec(name)
        folders += list(spec.submodule_search_locations or []) if spec else []
    return tuple(os.path.join(os.path.realpath(f), "") for f in folders)


class Ours(logging.Filter):
    """Pass the records a user is meant to read: what our flows and tasks log through Prefect's run logger (stage
    events, versions trained, their warnings) and our own loggers' warnings. Prefect's records of its task runs,
    its tracebacks and every other library's records stay in the log file. A record logged with
    ``extra={"screen": False}`` is for the file only."""

    folders = _our_folders()

    def filter(self, record: logging.LogRecord) -> bool:
        if not getattr(record, "screen", True):
            return False
        if record.name.startswith(RUN_LOGGERS):
            return record.levelno >= logging.INFO and os.path.realpath(record.pathname).startswith(self.folders)
        return record.name.split(".")[0] in OUR_LOGGERS and record.levelno >= logging.WARNING


def libraries_to_logging(*, progress_bars: bool = False) -> Callable[[], None]:
    """From now on MLflow, transformers and Python's warnings write log records instead of to the terminal, and
    transformers' and the Hugging Face hub's progress bars are off (unless ``progress_bars``); return what undoes it.

    The environment variables reach the processes started meanwhile (training ranks) and a library imported later
    (MLflow reads its switch at import; ``flows/__init__.py`` sets it for a flow process, which imports MLflow first).
    """
    import huggingface_hub.utils as hub
    import transformers.utils.logging as hf

    env = {"MLFLOW_CONFIGURE_LOGGING": "false"}  # MLflow's loggers keep no stderr handler and propagate
    if not progress_bars:
        env["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
    saved_env = {key: os.environ.get(key) for key in env}
    bars = (hf.is_progress_bar_enabled(), not hub.are_progress_bars_disabled())
    os.environ.update(env)
    if not progress_bars:
        hf.disable_progress_bar()  # "Loading weights", "Writing model shards"
        hub.disable_progress_bars()
    hf.disable_default_handler()
    hf.enable_propagation()
    logging.captureWarnings(True)

    def undo() -> None:
        logging.captureWarnings(False)
        hf.disable_propagation()
        hf.enable_default_handler()
        if bars[0]:
            hf.enable_progress_bar()
        if bars[1]:
            hub.enable_progress_bars()
        for key, value in saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value

    return undo


class FileFormat(logging.Formatter):
    """Time, level, logger and message; a Prefect record also names its flow or task run, as Prefect's own
    console does (``Task run 'ingest-barrier-4e5' - ...``)."""

    def __init__(self) -> None:
        super().__init__(FORMAT)

    def formatMessage(self, record: logging.LogRecord) -> str:
        line = super().formatMessage(record)
        for kind, attribute in (("Task run", "task_run_name"), ("Flow run", "flow_run_name")):
            name = getattr(record, attribute, None)
            if name:
                head, _, message = line.partition(f"{record.name}: ")
                return f"{head}{record.name}: {kind} {name!r} - {message}"
        return line


class ProjectFile(logging.handlers.RotatingFileHandler):
    """Appends to the project's log file, rolling over at ``LOG_BYTES``. Its folder is made again when it was removed
    under a process that still logs (a flow called from Python leaves the handler in place after it returns). A record
    it still cannot write is reported once, on the process's own stderr: never through ``print``, which Prefect's
    ``log_prints`` turns into a log record that came back here, until a RecursionError failed the next flow."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        super().__init__(path, maxBytes=LOG_BYTES, backupCount=LOG_BACKUPS, encoding="utf-8")
        self.setFormatter(FileFormat())
        self._reported = False

    def _open(self):
        Path(self.baseFilename).parent.mkdir(parents=True, exist_ok=True)
        return super()._open()

    def handleError(self, record: logging.LogRecord) -> None:
        import sys

        if self._reported or sys.__stderr__ is None:
            return
        self._reported = True
        with contextlib.suppress(Exception):
            sys.__stderr__.write(f"arclight: cannot write the log file {self.baseFilename} "
                                 f"({sys.exc_info()[1]!r}); its records are lost\n")


def file_handler(path: Path) -> logging.Handler:
    """A handler appending to ``path`` (made if missing), rolling over at ``LOG_BYTES``."""
    return ProjectFile(path)


def writes_to_terminal(handler: logging.Handler) -> bool:
    """Whether ``handler`` writes to this process's stdout or stderr (Prefect's console handler does)."""
    import sys

    stream = getattr(handler, "stream", None)
    return stream is not None and stream in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__)


def send_to_file(path: Path, *, screen: logging.Handler | None = None, progress_bars: bool = False
                 ) -> Callable[[], None]:
    """From now on every log record goes to the file at ``path``, and the libraries' output with it
    (``libraries_to_logging``); return what undoes it. A ``screen`` handler replaces the root logger's handlers
    that write to the terminal (Prefect's console handler, when Prefect set up logging first); without one they stay.

    Prefect imported after this leaves the root logger as it is (its setup keeps a root logger that has handlers of
    the user's), so its records reach these handlers and its API handler alike.
    """
    global _active
    root = logging.getLogger()
    saved = (root.level, list(root.handlers), {name: logging.getLogger(name).level for name in INFO_LOGGERS}, _active)
    to_file = file_handler(path)
    if screen is not None:
        for handler in saved[1]:
            if writes_to_terminal(handler):
                root.removeHandler(handler)
        root.addHandler(screen)
    root.addHandler(to_file)
    root.setLevel(logging.WARNING)
    for name in INFO_LOGGERS:
        logging.getLogger(name).setLevel(logging.INFO)
    undo_libraries = libraries_to_logging(progress_bars=progress_bars)
    _active = True

    def undo() -> None:
        global _active
        _active = saved[3]
        undo_libraries()
        for handler in (to_file, screen):
            if handler is not None:
                root.removeHandler(handler)
                handler.close()
        root.handlers[:0] = [h for h in saved[1] if h not in root.handlers]
        root.setLevel(saved[0])
        for name, level in saved[2].items():
            logging.getLogger(name).setLevel(level)

    return undo


@contextlib.contextmanager
def project_log(path: Path, *, screen: logging.Handler | None = None, progress_bars: bool = False) -> Iterator[None]:
    """``send_to_file`` for the block (a command's); an earlier flow run's ``to_project_log`` ends first."""
    global _flow_log
    if _flow_log is not None:
        _flow_log()
        _flow_log = None
    undo = send_to_file(path, screen=screen, progress_bars=progress_bars)
    try:
        yield
    finally:
        undo()


_active = False  # a command's project_log (or a flow run's to_project_log) is in effect in this process
_flow_log: Callable[[], None] | None = None  # what undoes the flow run's


def to_project_log(project_dir: Path | str) -> None:
    """For a flow run that no command set up (a Prefect worker's deployment run, a flow called from Python): send the
    process's log records and the libraries' output to the project's log file, from now on.

    A command that runs flows set up its own (``project_log``) and this does nothing; a later flow of another
    project moves the file to that project's.
    """
    global _flow_log
    if _active and _flow_log is None:
        return
    if _flow_log is not None:
        _flow_log()
    _flow_log = send_to_file(log_path(project_dir))


@contextlib.contextmanager
def as_found() -> Iterator[None]:
    """Run the block, then put the process's logging back as it was found: the level, handlers, filters, propagation
    and disabled flag of the root logger and of every logger that existed (transformers' among them), Python's
    warnings captured or not, ``logging.disable``, transformers' and the Hugging Face hub's progress bars and the
    environment variables ``libraries_to_logging`` sets. For a run called from a user's process (``arclight.train``):
    what the run set up for itself (``project_log``) ends with it, and what the libraries it imported set up for
    loggers of their own stays theirs."""
    import warnings

    import huggingface_hub.utils as hub
    import transformers.utils.logging as hf

    root = logging.getLogger()
    for name in INFO_LOGGERS:  # the loggers whose levels a run sets: saved as they are now (made, if new)
        logging.getLogger(name)
    loggers = [root, *(lg for lg in root.manager.loggerDict.values() if isinstance(lg, logging.Logger))]
    saved = [(lg, lg.level, list(lg.handlers), list(lg.filters), lg.propagate, lg.disabled) for lg in loggers]
    captured, showwarning, disabled = logging._warnings_showwarning is not None, warnings.showwarning, root.manager.disable
    bars = (hf.is_progress_bar_enabled(), not hub.are_progress_bars_disabled())
    env = {key: os.environ.get(key) for key in ("MLFLOW_CONFIGURE_LOGGING", "HF_HUB_DISABLE_PROGRESS_BARS")}
    try:
        yield
    finally:
        for key, value in env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        hf.enable_progress_bar() if bars[0] else hf.disable_progress_bar()
        hub.enable_progress_bars() if bars[1] else hub.disable_progress_bars()
        for logger, level, handlers, filters, propagate, off in saved:
            logger.handlers[:] = handlers
            logger.filters[:] = filters
            logger.propagate, logger.disabled = propagate, off
            logger.setLevel(level)  # and clears every logger's cache of effective levels
        logging.captureWarnings(captured)
        warnings.showwarning = showwarning
        logging.disable(disabled)
