"""The rollout runner: runs a user agent on one task in a worker process, bounded by a timeout.

The agent is any function ``agent(task: dict, ctx: AgentContext) -> float | None`` (sync or
async), named as ``"module:function"``. It talks to the model through ``ctx.base_url`` (the
gateway's per-rollout OpenAI-compatible URL) and returns its final reward, or emits rewards
itself with ``lightning_core.tracing.emit_reward``. Or the agent is any program
(``rollouts.command``: another virtualenv's Python, Node, a binary), started once per attempt in
the same worker and told the same through its environment (``command.py``).

Each attempt runs in its own process (forked from a clean fork server) and process group, so an
agent that hangs is really stopped at the timeout: the group is killed, the epoch goes on; a
terminal's Ctrl-C reaches only the command, which stops the rollouts (``stopping``). The worker sets up
tracing with the rollout context, wraps the agent in a ``rollout`` span, and flushes every span
to the collector before it reports back. The parent records every outcome (succeeded, failed
with the exception, timed out) as a ``rollout outcome`` span and returns it to the caller, which
stores it in the catalog. A failure says whose it was (``error_kind``): the agent's own (an
exception in its code), a timeout, or the infrastructure's (the gateway or the model server
unreachable or answering 5xx, spans the collector never got): those are never training data.
A runner needs only ``RunnerSettings`` (service URLs and tokens), so it
runs as well on a Dask or Ray worker as in the flow's process; such a worker must not be daemonic,
since a daemonic process may not start the fork server or rollout processes.
"""

from __future__ import annotations

import asyncio
import hashlib
import importlib
import inspect
import multiprocessing
import os
import sys
import threading
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

from lightning_core import semconv, tracing
from lightning_core.common import stopping
from lightning_core.common.http_guard import agent_token, bearer
from lightning_core.rollouts.command import CommandFailed, command_environment, resolve_command, run_command

SUCCEEDED, FAILED, TIMED_OUT = "succeeded", "failed", "timed_out"
INTERRUPTED = "interrupted"  # stopped by Ctrl-C: not recorded, so the rollout stays planned and runs again
# whose failure it was (RolloutOutcome.error_kind, the rollouts table's error_kind)
AGENT, INFRASTRUCTURE, TIMEOUT = "agent", "infrastructure", "timeout"
POLL_S = 0.25  # how often a waiting rollout looks at the stop event


@dataclass(frozen=True)
class RolloutSpec:
    """One planned rollout: which task, which sample of its group, in which run and epoch."""

    run_id: str
    epoch: int
    rollout_id: str
    task_id: str
    group_id: str
    sample_index: int
    task: dict[str, Any]


@dataclass
class AgentContext:
    """What an agent gets besides its task: where the model is and what it may use."""

    run_id: str
    epoch: int
    rollout_id: str
    task_id: str
    attempt: int
    base_url: str
    model: str
    api_key: str
    temperature: float = 1.0
    resources: dict[str, Any] = field(default_factory=dict)
    mode: str = "train"  # train | eval | apo
    prompt_versions: dict[str, str] = field(default_factory=dict)  # prompt name -> version this rollout runs with
    group_id: str = ""  # the group of rollouts of one task this rollout belongs to (its advantage is within it)
    sample_index: int = 0  # which of the group's rollouts this is, 0 .. group_size - 1 (an agent may vary by it)

    def prompt(self, name: str, default: str | None = None, **values: Any) -> str:
        """Return the serving text of prompt ``name`` (``rollouts.resources.prompts.<name>``), formatted with ``values``.

        ``default`` is used when the project names no such prompt (so the agent also runs outside
        Arclight); with neither, the error names the config key to set.
        """
        text = (self.resources.get("prompts") or {}).get(name, default)
        if text is None:
            raise KeyError(f"prompt {name!r} is not configured: set rollouts.resources.prompts.{name} in the project config")
        return text.format_map(values) if values else text

    def openai_client(self, **kwargs: Any):
        """Return an ``openai.OpenAI`` client pointed at this rollout's gateway URL."""
        import openai

        return openai.OpenAI(base_url=self.base_url, api_key=self.api_key, **kwargs)

    def async_openai_client(self, **kwargs: Any):
        """Return an ``openai.AsyncOpenAI`` client pointed at this rollout's gateway URL."""
        import openai

        return openai.AsyncOpenAI(base_url=self.base_url, api_key=self.api_key, **kwargs)


@dataclass(frozen=True)
class RolloutOutcome:
    """How one rollout ended, after its last attempt."""

    rollout_id: str
    status: str
    attempt: int
    reward: float | None
    error: str | None
    started_at: float
    finished_at: float
    error_kind: str | None = None  # agent | timeout | infrastructure (None when it succeeded)
    gateway_spans: int | None = None  # model-call spans the gateway recorded for the last attempt (None: not asked)


@dataclass(frozen=True)
class RunnerSettings:
    """Everything a worker needs to run agents, independent of any one rollout (picklable: it travels to
    Dask/Ray workers, which reach the services by these URLs and tokens and nothing else)."""

    agent: str | None  # "module:function"; None when ``command`` runs the agent
    collector_url: str
    gateway_url: str
    model: str
    api_key: str = "arclight"
    collector_token: str | None = None
    gateway_token: str | None = None  # the gateway's admin token (register each attempt); never given to an agent
    agent_path: tuple[str, ...] = ()
    timeout_s: float = 120.0
    retries: int = 0
    temperature: float = 1.0
    resources: dict[str, Any] = field(default_factory=dict)
    mode: str = "train"
    prompt_versions: dict[str, str] = field(default_factory=dict)
    command: tuple[str, ...] = ()  # the agent as a program (rollouts.command), its program path resolved
    command_env: dict[str, str] = field(default_factory=dict)
    command_cwd: str | None = None  # where the program runs (the project folder)
    sampling_seed: int | None = None  # rollouts.seed: each rollout's model sampling is seeded from it (rollout_seed)


def load_agent(ref: str, *, paths: tuple[str, ...] = ()) -> Callable[..., Any]:
    """Import ``module:function``; the error names what was missing and the path searched."""
    module_name, sep, attr = ref.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"agent {ref!r} must be written as 'module:function', e.g. 'calc_agent:run'")
    for path in reversed(paths):
        if path not in sys.path:
            sys.path.insert(0, path)
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ValueError(f"agent module {module_name!r} could not be imported ({exc}); searched {list(paths)} and sys.path") from exc
    _check_origin(module, module_name, paths)
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise ValueError(f"agent {ref!r}: module {module_name!r} has no function {attr!r}")
    return fn


def _check_origin(module: Any, module_name: str, paths: tuple[str, ...]) -> None:
    """Raise when ``module`` was loaded from elsewhere although one of the agent's ``paths`` holds a module of that
    name: an earlier run in this process (or the rollout fork server, which preloads the first agent it serves)
    loaded another agent's module of the same name, and Python's import cache would run that one instead."""
    loaded = getattr(module, "__file__", None)
    if not loaded:
        return
    relative = Path(*module_name.split("."))
    candidates = [Path(p) / relative.with_suffix(".py") for p in paths] + [Path(p) / relative / "__init__.py" for p in paths]
    own = [c.resolve() for c in candidates if c.is_file()]
    if own and Path(loaded).resolve() not in own:
        raise ValueError(
            f"agent module {module_name!r} is already loaded in this process from {loaded}, not from {own[0]}: two "
            f"agents whose modules share a name cannot run in one process; rename one of them (or run each "
            f"project in its own process)")


def failure_kind(exc: BaseException, gateway_url: str) -> str:
    """INFRASTRUCTURE when ``exc``, or an exception it came from, is a model call through the gateway at
    ``gateway_url`` that our side failed (no connection, a timeout, a 5xx, or a rollout the gateway no longer
    knows after a restart); AGENT otherwise (the agent's code, its tools, a 4xx it caused)."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if type(exc).__module__.split(".")[0] == "openai" and _through(exc, gateway_url):
            status = getattr(exc, "status_code", None)
            if type(exc).__name__ in ("APIConnectionError", "APITimeoutError"):
                return INFRASTRUCTURE
            if status is not None and (status >= 500 or (status == 404 and "is not registered" in str(exc))):
                return INFRASTRUCTURE
        exc = exc.__cause__ or exc.__context__
    return AGENT


def _through(exc: BaseException, gateway_url: str) -> bool:
    """True when the OpenAI error's request went to the gateway (an agent may call other OpenAI-compatible APIs)."""
    request = getattr(exc, "request", None)
    url = str(getattr(request, "url", "") or "")
    return not url or url.startswith(gateway_url.rstrip("/"))


def _worker(conn, settings: RunnerSettings, spec: RolloutSpec, attempt: int) -> None:
    """Run one attempt inside the worker process and send back (status, reward, error, error kind)."""
    os.setpgrp()  # its own process group: the parent stops it (and what the agent started) as one
    context = tracing.RolloutContext(spec.run_id, spec.epoch, spec.rollout_id, spec.task_id, attempt)
    handle = tracing.init_tracing(
        endpoint=settings.collector_url, token=settings.collector_token, context=context, service_name="arclight-agent",
        resource_attributes=_prompt_version_attributes(settings),
    )
    ctx = AgentContext(
        run_id=spec.run_id, epoch=spec.epoch, rollout_id=spec.rollout_id, task_id=spec.task_id, attempt=attempt,
        base_url=f"{settings.gateway_url.rstrip('/')}/rollout/{spec.rollout_id}/v1", model=settings.model,
        api_key=settings.api_key, temperature=settings.temperature, resources=dict(settings.resources), mode=settings.mode,
        prompt_versions=dict(settings.prompt_versions), group_id=spec.group_id, sample_index=spec.sample_index,
    )
    status, reward, error, kind = SUCCEEDED, None, None, None
    attributes = {semconv.SPAN_KIND: semconv.KIND_ROLLOUT, "arclight.rollout.sample_index": spec.sample_index}
    with handle.tracer.start_as_current_span(semconv.SPAN_NAME_ROLLOUT, attributes=attributes, record_exception=True, set_status_on_exception=True):
        try:
            result = _run_program(settings, spec, ctx) if settings.command else _run_function(settings, spec, ctx)
            if result is not None:
                tracing.emit_reward(result)
                reward = tracing._as_reward(result)
        except CommandFailed as exc:  # the program's own failure; ours show in the lake (arrivals) and the supervisor
            status, kind, error = FAILED, AGENT, str(exc)
        except BaseException as exc:  # the agent's failure is data, not the runner's -- unless our services caused it
            status, kind = FAILED, failure_kind(exc, settings.gateway_url)
            error = f"{type(exc).__name__}: {exc}\n{''.join(traceback.format_exc(limit=8))[-2000:]}"
    flushed = handle.flush(30)
    handle.shutdown()
    if not flushed:
        status, kind = FAILED, INFRASTRUCTURE
        error = f"spans could not be delivered to the collector at {settings.collector_url}" + (f"; {error}" if error else "")
    conn.send((status, reward, error, kind))
    conn.close()


def _prompt_version_attributes(settings: RunnerSettings) -> dict[str, str]:
    """The resource attributes naming the prompt version each prompt of this rollout runs with."""
    return {semconv.prompt_version_key(name): v for name, v in settings.prompt_versions.items()}


def _run_function(settings: RunnerSettings, spec: RolloutSpec, ctx: AgentContext) -> Any:
    """Call the ``module:function`` agent in this process; return what it returned."""
    fn = load_agent(settings.agent or "", paths=settings.agent_path)
    result = fn(dict(spec.task), ctx)
    if inspect.isawaitable(result):
        result = asyncio.run(_awaited(result))
    return result


def _run_program(settings: RunnerSettings, spec: RolloutSpec, ctx: AgentContext) -> float | None:
    """Run the agent's program (``rollouts.command``) to its end inside the rollout span; return the reward it printed."""
    from opentelemetry import trace

    span = trace.get_current_span().get_span_context()
    traceparent = f"00-{span.trace_id:032x}-{span.span_id:016x}-{int(span.trace_flags):02x}" if span.is_valid else None
    context = tracing.RolloutContext(spec.run_id, spec.epoch, spec.rollout_id, spec.task_id, ctx.attempt)
    env = command_environment(
        base_url=ctx.base_url, api_key=ctx.api_key, model=ctx.model, temperature=ctx.temperature, mode=ctx.mode,
        task=spec.task, resources=ctx.resources, collector_url=settings.collector_url,
        context={**context.to_env(), "ARCLIGHT_GROUP_ID": spec.group_id, "ARCLIGHT_SAMPLE_INDEX": str(spec.sample_index)},
        collector_token=settings.collector_token, traceparent=traceparent, extra=settings.command_env,
        resource={**context.resource_attributes(), **_prompt_version_attributes(settings)},
    )
    return run_command(settings.command, task=spec.task, env=env, cwd=Path(settings.command_cwd or os.getcwd())).reward


async def _awaited(awaitable: Any) -> Any:
    return await awaitable


_context: multiprocessing.context.BaseContext | None = None
WORKER_NAME_PREFIX = "arclight-rollout-"


def _mp_context(preload: tuple[str, ...] = ()) -> multiprocessing.context.BaseContext:
    """A fork server started once, so workers fork from a clean, single-threaded, warm process.

    The server imports ``worker_warmup`` (the tracing and OpenAI client stack) and ``preload`` (the
    agent's module) once; every rollout process then starts with them loaded.
    """
    global _context
    if _context is None:
        method = "forkserver" if "forkserver" in multiprocessing.get_all_start_methods() else "spawn"
        _context = multiprocessing.get_context(method)
        if method == "forkserver":
            _context.set_forkserver_preload(["lightning_core.rollouts.runner", "lightning_core.rollouts.worker_warmup", *preload])
            _skip_main_reimport()
    return _context


def _skip_main_reimport() -> None:
    """Rollout processes do not re-run the parent's ``__main__`` (multiprocessing does by default).

    multiprocessing's forkserver and spawn start methods re-import the parent's main module in
    every child, for targets defined there. A rollout's target lives in this module, so that is
    pure cost, and it depends on who started Arclight: under a script that imports Prefect at the
    top it was about 2.5 CPU-s per rollout, which made the agents use 3x the CPU that vLLM did.
    Only processes named ``arclight-rollout-*`` are affected.
    """
    from multiprocessing import spawn

    original = spawn.get_preparation_data
    if getattr(original, "_arclight", False):
        return

    def preparation_data(name):
        data = original(name)
        if str(name).startswith(WORKER_NAME_PREFIX):
            data.pop("init_main_from_path", None)
            data.pop("init_main_from_name", None)
        return data

    preparation_data._arclight = True
    spawn.get_preparation_data = preparation_data


def run_attempt(settings: RunnerSettings, spec: RolloutSpec, attempt: int) -> RolloutOutcome:
    """Run one attempt in a worker process; kill its process group when it outlives ``settings.timeout_s`` or a stop
    is asked for or its run stopped (``stopping.rollouts_end``: the attempt is then ``INTERRUPTED``)."""
    if multiprocessing.current_process().daemon:
        raise RuntimeError(
            "rollouts run in child processes (so a hung agent can be killed), but this process is daemonic and may not "
            "start any: on Dask start workers with distributed.worker.daemon: False (DASK_DISTRIBUTED__WORKER__DAEMON=False)")
    ctx = _mp_context(preload=(settings.agent.partition(":")[0],) if settings.agent else ())
    parent, child = ctx.Pipe(duplex=False)
    started = time.time()
    if stopping.rollouts_end():
        return RolloutOutcome(spec.rollout_id, INTERRUPTED, attempt, None, "stopped before it started", started, started)
    process = ctx.Process(target=_worker, args=(child, settings, spec, attempt), daemon=True,
                          name=f"{WORKER_NAME_PREFIX}{spec.rollout_id}")
    process.start()
    stopping.add_group(process.pid, f"rollout {spec.rollout_id}", rollout=True)  # the worker's group (os.setpgrp)
    child.close()
    status, reward, error, kind = TIMED_OUT, None, f"rollout did not finish within {settings.timeout_s:g} s and was stopped", TIMEOUT
    deadline = time.monotonic() + settings.timeout_s
    try:
        while True:
            if parent.poll(max(0.0, min(POLL_S, deadline - time.monotonic()))):
                status, reward, error, kind = parent.recv()
                break
            if stopping.rollouts_end():
                status, error, kind = INTERRUPTED, "stopped by Ctrl-C or SIGTERM, or the run stopped", None
                break
            if time.monotonic() >= deadline:
                break
    except EOFError:
        status, error, kind = FAILED, None, AGENT
    finally:
        if status in (TIMED_OUT, INTERRUPTED):
            stopping.kill_group(process.pid)  # the agent and anything it started
        process.join(timeout=10)
        if process.is_alive():
            process.kill()
            process.join(timeout=10)
        stopping.kill_group(process.pid)  # what the agent left running after it returned
        stopping.drop_group(process.pid)
        parent.close()
    if status == FAILED and error is None:
        error = f"the worker process died with exit code {process.exitcode} before reporting"
    return RolloutOutcome(spec.rollout_id, status, attempt, reward, error, started, time.time(), kind)


def run_rollout(
    settings: RunnerSettings, spec: RolloutSpec, *, first_attempt: int = 0, before_attempt: Callable[[int], None] | None = None
) -> RolloutOutcome:
    """Run a rollout with up to ``settings.retries`` extra attempts; record each outcome as a span.

    ``before_attempt(attempt)`` runs before each attempt (the flow registers the attempt with the
    gateway there, so the gateway's spans carry the same attempt number as the agent's).
    """
    outcome = None
    for attempt in range(first_attempt, first_attempt + settings.retries + 1):
        if before_attempt is not None:
            before_attempt(attempt)
        outcome = run_attempt(settings, spec, attempt)
        if outcome.status == INTERRUPTED:
            return outcome  # nothing to record: the rollout runs again next time
        record_outcome_span(settings, spec, outcome)
        if outcome.status == SUCCEEDED:
            break
    assert outcome is not None
    return outcome


def record_outcome_span(settings: RunnerSettings, spec: RolloutSpec, outcome: RolloutOutcome) -> None:
    """Hand one ``rollout outcome`` span with the attempt's status, reward and error to the epoch's exporter (sent in
    the background; ``flush_outcome_spans`` sends what is left)."""
    from opentelemetry.trace import Status, StatusCode

    attributes = tracing.sanitize_attributes(
        {
            semconv.SPAN_KIND: semconv.KIND_ROLLOUT_OUTCOME,
            semconv.ROLLOUT_STATUS: outcome.status,
            semconv.ROLLOUT_ERROR: outcome.error,
            semconv.ROLLOUT_ERROR_KIND: outcome.error_kind,
            semconv.ROLLOUT_ID: spec.rollout_id,
            semconv.TASK_ID: spec.task_id,
            semconv.ATTEMPT: outcome.attempt,
            "arclight.rollout.reward": outcome.reward,
            "arclight.rollout.group_id": spec.group_id,
            "arclight.rollout.sample_index": spec.sample_index,
        }
    )
    provider = _outcome_provider(settings.collector_url, settings.collector_token, spec.run_id, spec.epoch)
    span = provider.get_tracer("arclight.runner").start_span(
        semconv.SPAN_NAME_ROLLOUT_OUTCOME, attributes=attributes, start_time=int(outcome.started_at * 1e9)
    )
    if outcome.status != SUCCEEDED:
        span.set_status(Status(StatusCode.ERROR, (outcome.error or outcome.status)[:500]))
    span.end(end_time=int(outcome.finished_at * 1e9))


OUTCOME_EXPORT_TIMEOUT_S = 30.0
_outcome_providers: dict[tuple, Any] = {}
_outcome_guard = threading.Lock()


def _outcome_provider(collector_url: str, token: str | None, run_id: str, epoch: int):
    """One tracer provider per (collector, run, epoch), reused by every outcome span of the epoch.

    Building a provider and an OTLP exporter per rollout cost ~14 ms CPU in the flow process. The
    resource names the lake partition (run, epoch); the rollout, task and attempt are span attributes.
    Spans are exported in the background: with the collector down, an export retried for its whole
    timeout, and one at a time they held every rollout thread of the round for minutes. Each export may take
    ``OUTCOME_EXPORT_TIMEOUT_S`` with its retries: at the exporter's own 10 s, a collector slowed by a machine at load
    46 lost a batch, and the round stopped on it. (Outcome spans seen twice in the lake, once blamed on a 5 s timeout, were
    ids repeated after the trainer seeded ``random``: ``common/ids.py``.)
    """
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    from lightning_core.common.ids import SystemRandomIds

    key = (collector_url, token, run_id, epoch)
    with _outcome_guard:
        if key not in _outcome_providers:
            if len(_outcome_providers) >= 8:  # earlier epochs' providers: shut them down
                for provider in _outcome_providers.values():
                    provider.shutdown()
                _outcome_providers.clear()
            resource = Resource.create({semconv.SERVICE_NAME: "arclight-runner", semconv.RUN_ID: run_id, semconv.EPOCH: epoch})
            provider = TracerProvider(resource=resource, id_generator=SystemRandomIds())
            exporter = _Delivery(OTLPSpanExporter(endpoint=f"{collector_url.rstrip('/')}/v1/traces", headers=bearer(token) or None,
                                                  timeout=OUTCOME_EXPORT_TIMEOUT_S))
            provider.add_span_processor(BatchSpanProcessor(exporter, schedule_delay_millis=200))
            provider.arclight_delivery = exporter
            _outcome_providers[key] = provider
        return _outcome_providers[key]


def flush_outcome_spans(*, run_id: str, epoch: int, timeout_s: float = 2 * OUTCOME_EXPORT_TIMEOUT_S) -> bool:
    """Export the outcome spans of (run, epoch) recorded in this process so far; False when some could not be sent
    (in time, or at all: the collector refused them or could not be reached)."""
    with _outcome_guard:
        providers = [p for (_, _, r, e), p in _outcome_providers.items() if (r, e) == (run_id, epoch)]
    sent = all(p.force_flush(int(timeout_s * 1000)) for p in providers)
    return sent and not any(p.arclight_delivery.lost() for p in providers)


def close_outcome_spans(*, timeout_s: float = 5.0) -> None:
    """Send the outcome spans this process still holds and stop their exporters: before the collector they go to
    stops, so that no exporter retries against a collector that is gone (warnings after the command ended)."""
    with _outcome_guard:
        providers = list(_outcome_providers.values())
        _outcome_providers.clear()
    for provider in providers:
        provider.force_flush(int(timeout_s * 1000))
        provider.shutdown()


class _Delivery:
    """A span exporter that counts the spans its exports lost: the OTLP exporter logs a failed export (after its
    retries) and drops the spans, and a processor's flush reports only that the spans were handed over."""

    def __init__(self, exporter: Any):
        self.exporter, self._lost, self._guard = exporter, 0, threading.Lock()

    def export(self, spans: Any) -> Any:
        from opentelemetry.sdk.trace.export import SpanExportResult

        result = self.exporter.export(spans)
        if result is not SpanExportResult.SUCCESS:
            with self._guard:
                self._lost += len(spans)
        return result

    def lost(self) -> int:
        """The spans lost since the last call."""
        with self._guard:
            lost, self._lost = self._lost, 0
        return lost

    def shutdown(self) -> None:
        self.exporter.shutdown()

    def force_flush(self, timeout_millis: int = 30_000) -> bool:
        return self.exporter.force_flush(timeout_millis)


def outcome_row(spec: RolloutSpec, outcome: RolloutOutcome) -> dict[str, Any]:
    """Return the catalog ``rollouts`` row of a finished rollout."""
    return {
        **{k: v for k, v in asdict(spec).items() if k != "task"},
        "attempt": outcome.attempt,
        "status": outcome.status,
        "error": outcome.error,
        "error_kind": outcome.error_kind,
        "reward": outcome.reward,
        "started_at": outcome.started_at,
        "finished_at": outcome.finished_at,
    }


def settings_from_config(config, *, collector_url: str, gateway_url: str, model: str, mode: str = "train",
                         resources: dict[str, Any] | None = None, prompt_versions: dict[str, str] | None = None,
                         temperature: float | None = None, gateway_token: str | None = None) -> RunnerSettings:
    """Build runner settings from an ``ArclightConfig`` and the addresses of running services.

    ``resources`` replaces ``rollouts.resources`` (with the prompt versions chosen for these
    rollouts), ``temperature`` the mode's default (training: rollouts.temperature; else greedy).
    ``gateway_token`` is the gateway's admin token (the stack's; default gateway.token): the runner registers each
    attempt with it, and the agents never get it: their ``api_key`` is the agent token made from gateway.token, which
    opens the model routes only (none on a loopback gateway without gateway.token, whose model routes take anyone).
    """
    r = config.rollouts
    if not r.agent and not r.command:
        raise ValueError("the config names no agent: set rollouts.agent ('module:function') or rollouts.command "
                         "(a program and its arguments)")
    paths = tuple(str(p) for p in [*r.agent_path, config.project_dir])
    configured = config.gateway.token or os.environ.get("ARCLIGHT_GATEWAY_TOKEN") or None
    command: tuple[str, ...] = ()
    cwd = Path(config.project_dir) / (r.command_cwd or ".")
    if r.command:  # fail before any rollout starts
        command = resolve_command(r.command, base=cwd)
    else:
        load_agent(r.agent, paths=paths)
    return RunnerSettings(
        agent=r.agent, collector_url=collector_url, gateway_url=gateway_url, model=model,
        api_key=agent_token(configured) if configured else "arclight",
        collector_token=config.collector.token or os.environ.get("ARCLIGHT_COLLECTOR_TOKEN"),
        gateway_token=gateway_token or configured,
        agent_path=paths, timeout_s=r.timeout_s, retries=r.retries,
        temperature=temperature if temperature is not None else r.temperature if mode == "train" else 0.0,
        resources=dict(r.resources if resources is None else resources), mode=mode,
        prompt_versions=dict(prompt_versions or {}),
        command=command, command_env=dict(r.command_env), command_cwd=str(cwd.resolve()), sampling_seed=r.seed,
    )


def rollout_seed(settings: RunnerSettings, spec: RolloutSpec, attempt: int) -> int | None:
    """The seed of one attempt's model sampling (the gateway derives each call's from it): a hash of rollouts.seed, the
    epoch, the task, the sample's place in its group and the attempt, so a rerun of the run with the same config draws
    the same samples, and a retried attempt new ones. Not the run's id: two runs of one config are meant to agree."""
    if settings.sampling_seed is None:
        return None
    key = f"{settings.sampling_seed}\0{spec.epoch}\0{spec.task_id}\0{spec.sample_index}\0{attempt}".encode()
    return int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little") >> 1
