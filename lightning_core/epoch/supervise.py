"""Keep the stack's servers up while a flow runs, and remember when they were not.

A ``Supervisor`` looks at every server of the stack once a second, from its own thread:

- a server this process started that exited (a crash, an OOM kill, a SIGKILL) is restarted on the
  same port at once -- during the rollout stage, not at the next redeploy -- and gets back what it
  served (a vLLM replica the versions the gateway serves, which rollouts in flight are pinned to; a
  gateway its policy table). Its outage ends only then: until it serves what was pinned, the calls it
  answers are our failure. A replica that started but could not be given that back (its weights could
  not be read, vLLM refused them) is stopped again: alive, it would answer with the base model. A
  restart that fails, start or restore, is tried again once; then the run stops with its error
  (``Stack.failure``, raised by the flow) instead of counting every later rollout as ours;
- a vLLM this process started is alive but stuck when its engine processes no token and answers no
  one-token request for ``serving.stuck_after_s`` (its ``/health`` reports only a dead engine): it is
  stopped and restarted as above. One that reloads weights on purpose (a redeploy, ``Stack.reloads``) or
  sleeps on purpose (``Stack.sleeping``) is not probed meanwhile;
- a server that does not answer its health URL three times in a row, or a collector that answers
  that it cannot store spans, is down for as long as that lasts;
- every such time is an ``Outage`` of the stack, so the flow can tell the rollouts our services
  failed from the agent's own failures (``failures.blame_outages``) and run them again. Before a
  round's triplets are built the flow asks it to ``settle``: look again until no server is in doubt,
  so an outage seen late still blames the rollouts it failed.

Servers someone else runs (``collector.endpoint``, ``serving.urls``, ``gateway.endpoint``) are watched but
not restarted. A collector that says it cannot store spans is not restarted either: the flow stops
with its reason (``failures.check_collector``), since a restart does not fix a full disk. When the flow
ends, a restart under way gives up and stops what it started.
"""

from __future__ import annotations

import logging
import threading
import time
from urllib.parse import urlparse

from lightning_core.common import stopping
from lightning_core.common.services import Health, Service, ServiceError, cancelled_by, health
from lightning_core.epoch.context import RunContext
from lightning_core.epoch.deploy import (end_outages, restore_policy_table, restore_serving, revive_replicas,
                                         stop_unrestored)
from lightning_core.epoch.stack import Outage

log = logging.getLogger("arclight.supervise")

MISSES_FOR_OUTAGE = 3  # health checks (or one-token probes of a vLLM) in a row that fail before a server is down
RESTART_TRIES = 2  # starts of a server that exited before the run stops with the last one's error


class Supervisor:
    """Watches (and restarts) the servers of the run's stack every ``interval_s`` seconds while the ``with`` block runs."""

    def __init__(self, ctx: RunContext, *, interval_s: float = 1.0):
        self.ctx, self.stack, self.interval_s = ctx, ctx.services, interval_s
        self._open: dict[str, Outage] = {}  # server name -> its outage under way
        self._misses: dict[str, int] = {}
        self._failed_starts: dict[str, int] = {}
        self._tokens: dict[str, float] = {}  # vLLM replica -> tokens its engine had processed at the last look
        self._probed: dict[str, float] = {}  # vLLM replica -> when it was last probed (monotonic)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="arclight-supervisor", daemon=True)

    def __enter__(self) -> "Supervisor":
        now = time.time()
        for service in self.stack.services():
            service.last_seen = now
        self.stack.supervisor = self
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()  # a restart under way gives up its start (services.cancelled_by) and stops what it started
        self._thread.join(timeout=120)
        if self._thread.is_alive():
            log.error("the supervisor did not stop within 120 s: the stack's stop waits for its restart")
        self.stack.supervisor = None

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.check()
            except Exception:  # one bad look must not end the watch
                log.exception("the supervisor's look at the servers failed")

    def settle(self, *, timeout_s: float | None = None) -> None:
        """Look at every server now, and again until none is in doubt (a check failed but not yet
        ``MISSES_FOR_OUTAGE`` in a row), so that an outage that began during the round is on record before its
        rollouts are judged; at most ``timeout_s`` (default: as long as a stuck vLLM takes to be declared)."""
        timeout_s = timeout_s if timeout_s is not None else self.ctx.config.serving.stuck_after_s + 30.0
        deadline = time.monotonic() + timeout_s
        while not self._stop.is_set():
            self.check(now=True)
            if not any(0 < n < MISSES_FOR_OUTAGE for n in self._misses.values()) or time.monotonic() > deadline:
                return
            time.sleep(self.interval_s)

    def check(self, *, now: bool = False) -> None:
        """One look at every server: restart the dead and stuck ones this process owns, open and close outages.
        ``now``: probe an idle vLLM at once rather than on its schedule."""
        with self.stack.locked():
            for service in list(self.stack.services()):
                if self._stop.is_set():
                    return
                if service not in self.stack.services():
                    continue  # a restart earlier in this look replaced it (replicas are revived together)
                if service.owned and service.process.poll() is not None:
                    self._restart(service)
                    continue
                if service.owned and service in self.stack.replicas:
                    seen = self._engine_works(service, now=now)
                    if seen is not None:
                        self._seen(service, seen)
                    if service.name in self._open and self.stack.failure is None:  # stuck: it gets a new process
                        log.warning("%s at %s is stuck (%s): stopping it to start it again", service.name, service.url,
                                    self._open[service.name].reason)
                        service.stop()
                        self._restart(service)
                    continue
                self._seen(service, health(service.health_url, timeout_s=5.0))

    def _engine_works(self, service: Service, *, now: bool) -> Health | None:
        """Whether a vLLM this process started still works: yes while its engine processes tokens; with none
        processed since the last look, one token asked of it answers (at most every third of
        ``serving.stuck_after_s``, each waiting as long). None: no news (not due for a probe, or asleep)."""
        from lightning_core.serving.vllm import answers_one_token, tokens_processed

        serving = self.ctx.config.serving
        if self.stack.sleeping or self.stack.is_reloading(service.url):
            return None  # asleep on purpose while the trainer runs (serving.sleep_mode), or reloading weights
        third = serving.stuck_after_s / 3
        tokens = tokens_processed(service.url, timeout_s=min(5.0, third))
        if tokens is not None and tokens != self._tokens.get(service.name):
            self._tokens[service.name] = tokens
            self._probed[service.name] = time.monotonic()
            return Health(True)
        if not now and time.monotonic() - self._probed.get(service.name, 0.0) < third:
            return None
        self._probed[service.name] = time.monotonic()
        seen = answers_one_token(service.url, model=self.ctx.config.model.served_name, timeout_s=third)
        self._tokens[service.name] = tokens_processed(service.url, timeout_s=min(5.0, third)) or tokens or 0.0
        return seen

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
        """Start a server that exited (or was stopped, stuck) again on its port and give it back what it served; its
        outage ends once it does. After ``RESTART_TRIES`` failed starts the run stops with the last one's error."""
        if self.stack.failure is not None:
            return  # the run is stopping with it
        try:
            with cancelled_by(self._stop):
                self._start_again(service)
        except Exception as exc:
            if self._stop.is_set() or stopping.stopping():
                return  # given up: the run is stopping
            tries = self._failed_starts[service.name] = self._failed_starts.get(service.name, 0) + 1
            if tries < RESTART_TRIES:
                log.warning("%s could not be restarted (%s): trying again", service.name, str(exc).splitlines()[0])
                return
            tail = "\n".join(str(exc).splitlines()[-5:])
            self.stack.failure = ServiceError(
                f"{service.name} at {service.url} stopped working and could not be started again ({tries} tries): "
                f"{str(exc).splitlines()[0]} (log {service.log_path or 'its own'}; its last lines: {tail}). The run "
                "stopped instead of failing every rollout that follows: fix the cause and run the same command again "
                "to resume")
            log.error("%s", self.stack.failure)
        else:
            self._failed_starts.pop(service.name, None)
            self._misses.pop(service.name, None)
            self._tokens.pop(service.name, None)

    def _start_again(self, service: Service) -> None:
        """Start ``service`` again and give it back what it served; its outage (opened here if it just exited) stays
        open through failed tries (``Stack.open_outage`` finds it again) and ends when it serves again."""
        stack, config = self.stack, self.ctx.config
        outage = self._open.pop(service.name, None) or stack.open_outage(service.name)
        if outage is None:
            outage = Outage(service.name, service.last_seen or time.time(),
                            f"exited with status {service.process.returncode}")
            stack.outages.append(outage)
        if service in stack.replicas:
            revived = revive_replicas(self.ctx)  # each keeps its open outage, this one's included
            if stack.gateway is not None and revived:
                try:
                    restore_serving(self.ctx, revived=[r.url for r in revived])  # exactly what rollouts are pinned to
                except Exception as exc:
                    stop_unrestored(stack, revived)  # down, their outages open, until a try restores them
                    raise ServiceError(f"it started again but could not be given back the version its rollouts are "
                                       f"pinned to: {exc}") from exc
            end_outages(revived)
            for r in revived:
                if r.outage is not outage:
                    log.warning("restarted: %s", r.outage.describe())
        else:
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
                restore_policy_table(self.ctx)  # the versions it served, which rollouts in flight are pinned to
            else:
                raise ServiceError(f"{service.name} exited and is no server of this stack that can be restarted")
            outage.ended, outage.restarted = time.time(), True
        log.warning("restarted: %s", outage.describe())
