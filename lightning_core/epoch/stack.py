"""The services an epoch needs (collector, vLLM replicas, gateway), started or attached as one.

``open_stack(config)`` attaches to the services ``arclight up`` left running for this project
(recorded in ``<project>/.arclight/services.json``) or named in the config, and starts the rest
for the duration of the ``with`` block. ``up``/``down``/``status`` manage long-lived ones.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import httpx

from lightning_core.config import ArclightConfig
from lightning_core.serving.client import GatewayClient
from lightning_core.common.http_guard import bearer
from lightning_core.common.services import Service, ServiceError, health, is_healthy, wait_all_healthy
from lightning_core.ingest.service import start_collector

log = logging.getLogger("arclight.stack")


@dataclass
class Outage:
    """A time a service of the stack was down or failing (wall clock, comparable with rollout outcome times)."""

    service: str  # collector | gateway | vllm0 | vllm0@<group> ...
    started: float
    reason: str
    ended: float | None = None  # None while it lasts
    restarted: bool = False

    def overlaps(self, start: float, end: float) -> bool:
        """True when the outage and the time from ``start`` to ``end`` share a moment."""
        return self.started <= end and (self.ended is None or self.ended >= start)

    def describe(self) -> str:
        """One line: what, when, for how long, and whether it was restarted."""
        when = time.strftime("%H:%M:%S", time.localtime(self.started))
        lasted = "still down" if self.ended is None else f"for {self.ended - self.started:.0f} s"
        return f"{self.service} {self.reason} at {when}, {lasted}" + ("; restarted" if self.restarted else "")


@dataclass
class Stack:
    """Running collector, vLLM replicas and gateway, which of them this process owns, and when they were down.

    ``lock`` is held by whoever restarts a service (the flow's supervisor, a redeploy reviving replicas), so two never
    restart the same one; ``outages`` lists every time a service was seen down or failing, so that rollouts it failed
    are told from the agent's own failures.
    """

    collector: Service
    replicas: list[Service] = field(default_factory=list)
    gateway: Service | None = None
    outages: list[Outage] = field(default_factory=list)
    lock: threading.RLock = field(default_factory=threading.RLock, repr=False)
    supervisor: Any = field(default=None, repr=False)  # the flow's ``supervise.Supervisor`` while one watches
    serving: dict[str, Any] = field(default_factory=dict)  # the gateway's policy table as the last redeploy left it
    sleeping: bool = False  # serving.sleep_mode: the vLLM replicas sleep on purpose while the trainer runs
    reloading: dict[str, float] = field(default_factory=dict)  # replica URL -> until when (monotonic) it reloads weights
    failure: BaseException | None = None  # a server that died and could not be restarted: the flow raises it

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """Hold ``lock`` for the block. The wait for it (a restart may hold it for minutes) takes it in half-second
        tries, so that a Ctrl-C reaches the main thread meanwhile: a thread blocked on a lock with no timeout is not
        woken by a signal the system delivers to another thread."""
        while not self.lock.acquire(timeout=0.5):
            pass
        try:
            yield
        finally:
            self.lock.release()

    @contextlib.contextmanager
    def reloads(self, urls: list[str], *, timeout_s: float) -> Iterator[None]:
        """Mark the replicas at ``urls`` as reloading weights for the block, for at most ``timeout_s``: their engine
        answers nothing meanwhile, and the supervisor does not take that for a stuck one."""
        until = time.monotonic() + timeout_s
        for url in urls:
            self.reloading[url] = until
        try:
            yield
        finally:
            for url in urls:
                self.reloading.pop(url, None)

    def is_reloading(self, url: str) -> bool:
        """True while the replica at ``url`` reloads weights on purpose, within the reload's own timeout."""
        return self.reloading.get(url, 0.0) > time.monotonic()

    def open_outage(self, service: str) -> Outage | None:
        """The outage of ``service`` under way, if one is."""
        return next((o for o in reversed(self.outages) if o.service == service and o.ended is None), None)

    def raise_failure(self) -> None:
        """Raise the error of a server that could not be restarted, if one could not (the run cannot go on)."""
        if self.failure is not None:
            raise self.failure

    def outages_during(self, start: float, end: float) -> list[Outage]:
        """The outages that overlap the time from ``start`` to ``end``."""
        return [o for o in list(self.outages) if o.overlaps(start, end)]

    def services(self) -> list[Service]:
        """Return every service, in start order."""
        return [self.collector, *self.replicas, *([self.gateway] if self.gateway else [])]

    def gateway_client(self, config: ArclightConfig) -> GatewayClient:
        """Return an admin client for the gateway."""
        if self.gateway is None:
            raise ServiceError("this stack has no gateway")
        return GatewayClient(self.gateway.url, token=self.gateway.token or admin_token(config))

    def stop(self) -> None:
        """Stop the services this process started, in reverse order; a restart under way (it holds ``lock``) ends
        first, so the server it started is stopped too."""
        with self.locked():
            for service in reversed(self.services()):
                if service.owned:
                    service.stop()


def state_path(config: ArclightConfig) -> Path:
    """Return the file where ``arclight up`` records the services it started."""
    return config.project_dir / ".arclight" / "services.json"


def _recorded(config: ArclightConfig) -> dict[str, dict]:
    path = state_path(config)
    if not path.exists():
        return {}
    try:
        return json.loads(path.read_text())
    except ValueError:
        return {}


def _attach_recorded(config: ArclightConfig, name: str) -> Service | None:
    entry = _recorded(config).get(name)
    if entry and is_healthy(entry["health_url"]):
        return Service(name=name, url=entry["url"], health_url=entry["health_url"], token=entry.get("token"))
    return None


def admin_token(config: ArclightConfig) -> str | None:
    """The admin token of the project's gateway: gateway.token ($ARCLIGHT_GATEWAY_TOKEN), else the one ``arclight up``
    recorded for the gateway it started (a gateway started without gateway.token takes no other)."""
    return (config.gateway.token or os.environ.get("ARCLIGHT_GATEWAY_TOKEN")
            or _recorded(config).get("gateway", {}).get("token"))


def start_stack(config: ArclightConfig, *, with_model: bool = True, log_dir: Path | None = None) -> Stack:
    """Attach to running services or start them; on failure stop whatever this call started.

    What it starts starts side by side, and the call waits for all of it at once: the collector and the gateway take a
    few seconds each (mostly imports, on one core), vLLM about half a minute, and the gateway asks neither the
    collector nor vLLM anything until a call comes. The calc example's stack: 42.8 s one after the other, 38.7 s side
    by side (``benchmarks/stack_bench.py``)."""
    from lightning_core.serving.vllm import start_gateway, start_vllm_replicas, upstream_specs

    stack = Stack(collector=_attach_recorded(config, "collector") or start_collector(config, log_dir=log_dir, wait=False))
    try:
        if not stack.collector.owned:  # one already running on another lake is refused before vLLM starts
            check_collector_lake(config, stack.collector)
        if with_model:
            names = [name for name in _recorded(config) if name.startswith("vllm")]  # vllm0, vllm0@<group>, ...
            recorded = [s for s in (_attach_recorded(config, name) for name in names) if s is not None]
            stack.replicas = recorded or start_vllm_replicas(config, log_dir=log_dir, wait=False)
            stack.gateway = _attach_recorded(config, "gateway") or start_gateway(
                config, upstreams=upstream_specs(stack.replicas), collector_url=stack.collector.url, log_dir=log_dir,
                wait=False,
            )
        wait_all_healthy([s for s in stack.services() if s.owned], timeout_s=max(config.serving.startup_timeout_s, 60.0))
        if stack.collector.owned:
            check_collector_lake(config, stack.collector)
    except BaseException:
        stack.stop()
        raise
    return stack


@contextlib.contextmanager
def open_stack(config: ArclightConfig, *, with_model: bool = True) -> Iterator[Stack]:
    """Run the ``with`` block with a collector (and vLLM + gateway), stopping what was started here."""
    from lightning_core.rollouts.runner import close_outcome_spans

    stack = start_stack(config, with_model=with_model)
    try:
        yield stack
    finally:
        try:
            close_outcome_spans()  # while the collector they go to still runs
        finally:
            stack.stop()


def _collector_auth(config: ArclightConfig) -> dict[str, str]:
    token = config.collector.token or os.environ.get("ARCLIGHT_COLLECTOR_TOKEN")
    return bearer(token)


def check_collector_lake(config: ArclightConfig, collector: Service) -> None:
    """Refuse a collector that writes to another lake than the project reads (spans would vanish). With the span
    tables on object storage (``lake.spans_uri``) the collector may run on another host with a folder of its own:
    what must agree is where the span tables are."""
    health = httpx.get(collector.health_url, timeout=10, headers=_collector_auth(config)).json()
    lake, spans = health.get("lake"), health.get("spans")
    if config.lake.spans_uri:
        if spans is not None and spans.rstrip("/") != config.lake.spans_uri.rstrip("/"):
            raise ServiceError(
                f"the collector at {collector.url} writes its spans to {spans}, but this project reads them from "
                f"{config.lake.spans_uri}: give both the same lake.spans_uri"
            )
        return
    if lake is not None and Path(lake).resolve() != Path(config.lake.path).resolve():
        raise ServiceError(
            f"the collector at {collector.url} writes to the lake {lake}, but this project reads {config.lake.path}: "
            f"set lake.path to {lake}, or let Arclight start a collector for this project (remove collector.endpoint)"
        )


def up(config: ArclightConfig) -> dict[str, dict]:
    """Start the services in the background for later runs and record them; return the record."""
    running = status(config)
    if running and all(entry["healthy"] for entry in running.values()):
        return running
    down(config)
    stack = start_stack(config)
    record = {
        service.name: {"url": service.url, "health_url": service.health_url,
                       "pid": service.process.pid if service.process else None,
                       "log": str(service.log_path) if service.log_path else None,
                       "scratch": str(service.scratch) if service.scratch else None}
        for service in stack.services()
    }
    if stack.gateway is not None and stack.gateway.token:  # later runs attach with it; the file is the user's alone
        record["gateway"]["token"] = stack.gateway.token
    path = state_path(config)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.touch(mode=0o600)
    path.chmod(0o600)
    path.write_text(json.dumps(record, indent=2))
    return record


def status(config: ArclightConfig) -> dict[str, dict]:
    """Return the recorded services, each with a ``healthy`` flag and, from a server that says what is wrong (a
    collector whose lake refuses commits), its ``reason``."""
    result = {}
    for name, entry in _recorded(config).items():
        seen = health(entry["health_url"])
        result[name] = {**entry, "healthy": seen.ok, **({"reason": seen.reason} if seen.answered else {})}
    return result


def down(config: ArclightConfig, *, timeout_s: float = 30.0) -> list[str]:
    """Stop the services ``up`` recorded (SIGTERM to each process group, SIGKILL after ``timeout_s``) and remove
    their scratch folders."""
    stopped = []
    for name, entry in _recorded(config).items():
        pid = entry.get("pid")
        if not pid:
            continue
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, signal.SIGTERM)
            stopped.append(name)
    deadline = time.monotonic() + timeout_s
    for name, entry in _recorded(config).items():
        pid = entry.get("pid")
        while pid and _running(pid) and time.monotonic() < deadline:
            time.sleep(0.2)
        if pid and _running(pid):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pid, signal.SIGKILL)
        if entry.get("scratch"):
            shutil.rmtree(entry["scratch"], ignore_errors=True)
    state_path(config).unlink(missing_ok=True)
    return stopped


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie (exited, not yet reaped by its parent) counts as stopped
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False
