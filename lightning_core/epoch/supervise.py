"""Keep the stack's servers up while a flow runs, and remember when they were not.

A ``Supervisor`` looks at every server of the stack once a second, from its own thread:

- a server this process started that exited (a crash, an OOM kill, a SIGKILL) is restarted on the
  same port at once -- during the rollout stage, not at the next redeploy -- and gets back what it
  served (a vLLM replica the serving policy versions; a gateway its policy table);
- a server that does not answer its health URL three times in a row, or a collector that answers
  that it cannot store spans, is down for as long as that lasts;
- every such time is an ``Outage`` of the stack, so the flow can tell the rollouts our services
  failed from the agent's own failures (``failures.blame_outages``) and run them again.

Servers someone else runs (``collector.endpoint``, ``serving.urls``, ``gateway.endpoint``) are watched but
not restarted. A collector that says it cannot store spans is not restarted either: the flow stops
with its reason (``failures.check_collector``), since a restart does not fix a full disk.
"""

from __future__ import annotations

import logging
import threading
import time
from urllib.parse import urlparse

from lightning_core.common.services import Health, Service, ServiceError, health
from lightning_core.epoch.context import RunContext
from lightning_core.epoch.deploy import deploy_latest, revive_replicas
from lightning_core.epoch.stack import Outage

log = logging.getLogger("arclight.supervise")

MISSES_FOR_OUTAGE = 3  # health checks in a row that fail before a server that runs counts as down


class Supervisor:
    """Watches (and restarts) the servers of the run's stack every ``interval_s`` seconds while the ``with`` block runs."""

    def __init__(self, ctx: RunContext, *, interval_s: float = 1.0):
        self.ctx, self.stack, self.interval_s = ctx, ctx.services, interval_s
        self.failure: BaseException | None = None  # a restart that failed: the flow raises it
        self._open: dict[str, Outage] = {}  # server name -> its outage under way
        self._misses: dict[str, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="arclight-supervisor", daemon=True)

    def __enter__(self) -> "Supervisor":
        now = time.time()
        for service in self.stack.services():
            service.last_seen = now
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=30)

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.check()
            except Exception as exc:  # a restart that failed: kept for the flow, which raises it
                if self.failure is None:
                    log.error("%s", exc)
                    self.failure = exc

    def raise_failure(self) -> None:
        """Raise the error of a restart that failed, if one did."""
        if self.failure is not None:
            raise self.failure

    def check(self) -> None:
        """One look at every server: restart the dead ones this process owns, open and close outages."""
        with self.stack.lock:
            for service in list(self.stack.services()):
                if self._stop.is_set():
                    return
                if service.owned and service.process.poll() is not None:
                    self._restart(service)
                    continue
                if service.owned and service in self.stack.replicas:
                    service.last_seen = time.time()  # a busy vLLM on CPU answers /health late; its process is alive
                    continue
                self._seen(service, health(service.health_url, timeout_s=5.0))

    def _seen(self, service: Service, seen: Health) -> None:
        name = service.name
        if seen.ok:
            service.last_seen = time.time()
            self._misses.pop(name, None)
            outage = self._open.pop(name, None)
            if outage is not None:
                outage.ended = time.time()
                log.warning("%s answers again: %s", name, outage.describe())
            return
        self._misses[name] = self._misses.get(name, 0) + 1
        if name not in self._open and (seen.answered or self._misses[name] >= MISSES_FOR_OUTAGE):
            what = "failing" if seen.answered else "not answering"
            outage = Outage(name, service.last_seen or time.time(), f"{what} ({seen.reason or 'no reason given'})")
            self._open[name] = outage
            self.stack.outages.append(outage)
            log.warning("%s is down or failing: %s", name, seen.reason)

    def _restart(self, service: Service) -> None:
        """Start a server that exited again on its port, give it back what it served, and record the outage."""
        stack, config = self.stack, self.ctx.config
        if service in stack.replicas:
            revived = revive_replicas(self.ctx)  # records the outage itself
            if stack.gateway is not None and revived:
                deploy_latest(self.ctx, revived=revived)
            return
        outage = self._open.pop(service.name, None) or Outage(service.name, service.last_seen or time.time(), "")
        outage.reason = f"exited with status {service.process.returncode}"
        if outage not in stack.outages:
            stack.outages.append(outage)
        log.warning("%s at %s exited with status %s: restarting it on the same port (log: %s)", service.name,
                    service.url, service.process.returncode, service.log_path)
        service.stop()
        port = urlparse(service.url).port
        log_dir = service.log_path.parent if service.log_path else None
        if service is stack.collector:
            from lightning_core.ingest.service import start_collector

            collector = config.collector.model_copy(update={"port": port})
            stack.collector = start_collector(config.model_copy(update={"collector": collector}), log_dir=log_dir)
        elif service is stack.gateway:
            from lightning_core.serving.vllm import start_gateway, upstream_specs

            gateway = config.gateway.model_copy(update={"port": port})
            stack.gateway = start_gateway(config.model_copy(update={"gateway": gateway}),
                                          upstreams=upstream_specs(stack.replicas), collector_url=stack.collector.url,
                                          log_dir=log_dir)
            deploy_latest(self.ctx, revived=[])  # its policy table: the versions the replicas serve
        else:
            raise ServiceError(f"{service.name} exited and is no server of this stack that can be restarted")
        outage.ended, outage.restarted = time.time(), True
        log.warning("restarted: %s", outage.describe())
