"""Start and stop the external servers Arclight runs as their own processes.

One function starts each server and ``Service.stop`` stops any of them. A server is healthy
when its health URL answers 200; a server that dies or stays unhealthy past its timeout raises
``ServiceError`` with the last lines of its log.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Mapping, NamedTuple, Sequence

import httpx

from lightning_core.common import stopping


class ServiceError(RuntimeError):
    """A server that failed to start or stopped answering; the message holds its log tail."""


@dataclass
class Service:
    """A running server process (or an attached one, ``process`` None) and where to reach it."""

    name: str
    url: str
    health_url: str
    process: subprocess.Popen | None = None
    log_path: Path | None = None
    env: dict[str, str] = field(default_factory=dict)
    scratch: Path | None = None  # the process's own temporary folder, removed when it is stopped
    last_seen: float | None = None  # when it was last seen up (wall clock; the flow's supervisor looks every second)
    token: str | None = field(default=None, repr=False)  # a gateway's admin token (its admin routes take no other)
    startup_setting: str | None = None  # the config key of its start-up time limit, named when a start runs past it

    @property
    def owned(self) -> bool:
        """True when this process was started here (and so is stopped here)."""
        return self.process is not None

    def alive(self) -> bool:
        """True when the process runs (or, attached, when the health URL answers)."""
        if self.process is not None:
            return self.process.poll() is None
        return is_healthy(self.health_url)

    def stop(self, *, timeout_s: float = 15.0) -> None:
        """Stop the process: SIGTERM to its process group, SIGKILL after ``timeout_s``; then remove its scratch folder."""
        if self.process is None:
            return
        try:
            self._end_group(timeout_s)
        finally:
            stopping.drop_group(self.process.pid)
            if self.scratch is not None:
                shutil.rmtree(self.scratch, ignore_errors=True)

    def _end_group(self, timeout_s: float) -> None:
        if self.process.poll() is not None:
            # the leader is gone but what it started may not be: a killed vLLM API server leaves its engine
            # core (~3 GB) running in the same process group
            _signal_group(self.process, signal.SIGKILL)
            return
        _signal_group(self.process, signal.SIGTERM)
        _signal_group(self.process, signal.SIGCONT)  # a stopped (stuck, SIGSTOPped) process acts on SIGTERM only once continued
        try:
            self.process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            _signal_group(self.process, signal.SIGKILL)
            self.process.wait(timeout=10)

    def log_tail(self, lines: int = 40) -> str:
        """Return the last lines of the server's log."""
        return log_tail(self.log_path, lines)


def _signal_group(process: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(process.pid, sig)
    except (ProcessLookupError, PermissionError):
        try:
            process.send_signal(sig)
        except ProcessLookupError:
            pass


def log_tail(path: Path | None, lines: int = 40) -> str:
    """Return the last ``lines`` lines of a log file ('' when there is none)."""
    if path is None or not Path(path).exists():
        return ""
    with open(path, "rb") as fh:
        fh.seek(0, os.SEEK_END)
        fh.seek(max(0, fh.tell() - 64 * 1024))
        return "\n".join(fh.read().decode(errors="replace").splitlines()[-lines:])


def is_healthy(url: str, *, timeout_s: float = 2.0) -> bool:
    """True when ``url`` answers 200."""
    return health(url, timeout_s=timeout_s).ok


class Health(NamedTuple):
    """What a health URL said: ``ok``; else why not, and whether the server itself said so (``answered``: it runs,
    and knows what is wrong -- the collector says what keeps it from storing spans)."""

    ok: bool
    reason: str | None = None
    answered: bool = False


def health(url: str, *, timeout_s: float = 2.0) -> Health:
    """Ask ``url``: 200 is ok; any other answer is not, with the server's own ``reason`` when it gives one."""
    try:
        response = httpx.get(url, timeout=timeout_s)
    except httpx.HTTPError as exc:
        return Health(False, f"{url} could not be reached ({type(exc).__name__})")
    if response.status_code == 200:
        return Health(True)
    try:
        reason = response.json().get("reason")
    except (ValueError, AttributeError):
        reason = None
    return Health(False, reason or f"{url} answered {response.status_code}", answered=reason is not None)


def free_port(host: str = "127.0.0.1") -> int:
    """Return a TCP port that is free on ``host`` right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def start_process(
    name: str,
    argv: Sequence[str],
    *,
    url: str,
    health_url: str,
    log_path: Path,
    env: Mapping[str, str] | None = None,
    timeout_s: float = 60.0,
    cwd: Path | None = None,
    scratch: Path | None = None,
    wait: bool = True,
    startup_setting: str | None = None,
) -> Service:
    """Start ``argv`` in its own process group, logging to ``log_path``, and wait until healthy.

    ``scratch``: a folder the process keeps its temporary files in, removed when it stops (or fails to start).
    ``wait=False`` returns once the process runs: the caller waits (``wait_healthy``) and stops it if that fails, so
    that several slow servers start side by side. ``startup_setting``: the config key of ``timeout_s``, which the error
    of a start that runs past it names.
    """
    log_path.parent.mkdir(parents=True, exist_ok=True)
    full_env = {**os.environ, **(env or {})}
    try:
        with open(log_path, "ab") as log:
            process = subprocess.Popen(
                list(argv), stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                env=full_env, cwd=cwd, start_new_session=True,
            )
    except BaseException:
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)
        raise
    stopping.add_group(process.pid, name)  # its own session: a second Ctrl-C kills it with the rest
    service = Service(name=name, url=url, health_url=health_url, process=process, log_path=log_path,
                      env=dict(env or {}), scratch=scratch, startup_setting=startup_setting)
    if not wait:
        return service
    try:
        wait_healthy(service, timeout_s=timeout_s)
    except BaseException:  # it died, stayed unhealthy, or we were interrupted: leave nothing of it behind
        service.stop()
        raise
    return service


_starts = threading.local()


@contextlib.contextmanager
def cancelled_by(event: threading.Event) -> Iterator[None]:
    """Starts made in this thread within the block give up (and stop what they started) once ``event`` is set: a
    supervisor that restarts a server stops waiting for it when its flow ends."""
    previous = getattr(_starts, "cancel", None)
    _starts.cancel = event
    try:
        yield
    finally:
        _starts.cancel = previous


def wait_healthy(service: Service, *, timeout_s: float) -> None:
    """Block until the service answers its health URL; raise ``ServiceError`` on death or timeout, or once a stop is
    asked for (Ctrl-C, or the event of ``cancelled_by``); the caller stops it (``start_process`` does)."""
    wait_all_healthy([service], timeout_s=timeout_s)


def wait_all_healthy(services: Sequence[Service], *, timeout_s: float) -> None:
    """``wait_healthy`` for servers starting side by side: the first of them to die ends the wait at once."""
    deadline = time.monotonic() + timeout_s
    cancel = getattr(_starts, "cancel", None)
    pending = list(services)
    while pending and time.monotonic() < deadline:
        if stopping.stopping() or (cancel is not None and cancel.is_set()):
            raise ServiceError(f"the start of {', '.join(s.name for s in pending)} was given up: the run is stopping")
        for service in list(pending):
            if service.process is not None and service.process.poll() is not None:
                raise ServiceError(
                    f"{service.name} exited with code {service.process.returncode} during start-up "
                    f"(log {service.log_path}):\n{service.log_tail()}"
                )
            if is_healthy(service.health_url, timeout_s=1.0):
                pending.remove(service)
        if pending:
            time.sleep(0.2)
    if pending:
        service = pending[0]
        load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
        busy = f"; the machine's load average is {load:.1f} on {os.cpu_count()} cores" if load is not None else ""
        limit = (f": a slow or busy machine needs more time, set {service.startup_setting} (now {timeout_s:g}){busy}"
                 if service.startup_setting else busy)
        raise ServiceError(
            f"{service.name} did not answer {service.health_url} within {timeout_s:.0f} s{limit} "
            f"(log {service.log_path}):\n{service.log_tail()}"
        )


def attach(name: str, endpoint: str, *, setting: str, health_path: str = "/healthz") -> Service:
    """Return a handle on a server someone else runs; ``ServiceError`` names ``setting`` if it is down."""
    url = endpoint.rstrip("/")
    service = Service(name=name, url=url, health_url=f"{url}{health_path}")
    if not service.alive():
        raise ServiceError(f"{setting} {endpoint} does not answer {health_path}: start it or remove the setting")
    return service


def start_prefect_api(*, log_dir: Path, timeout_s: float = 90.0) -> Service:
    """Start a Prefect API server (Prefect's own app, without its UI) for one command's flows, in its own session.

    Prefect would otherwise start a temporary server of its own in this process's group, where a terminal's
    Ctrl-C killed it before the interrupted flow could record its state, and the command then hung on
    Prefect's retries. Its database is Prefect's default (``$PREFECT_HOME``), so runs stay listed between
    commands. Starting it took 6-15 s on the 2-core machine (``../shared/FACTS.md``).
    """
    port = free_port()
    argv = [sys.executable, "-m", "uvicorn", "--factory", "prefect.server.api.server:create_app",
            "--host", "127.0.0.1", "--port", str(port), "--log-level", "error", "--lifespan", "on"]
    env = {"PREFECT_UI_ENABLED": "0", "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           "PREFECT__SERVER_EPHEMERAL": "1", "PREFECT__SERVER_FINAL": "1"}
    url = f"http://127.0.0.1:{port}"
    return start_process("prefect", argv, url=url, health_url=f"{url}/api/health", log_path=log_dir / "prefect.log",
                         env=env, timeout_s=timeout_s)
