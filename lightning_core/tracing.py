"""Tracing SDK for agent processes: OpenTelemetry set-up plus agent, tool, reward and message spans.

    from lightning_core import tracing
    tracing.init_tracing(endpoint="http://127.0.0.1:4318")   # or lake="path/to/lake" (embedded)
    with tracing.agent("planner"):
        ...
        tracing.emit_reward(1.0)
    tracing.flush()

Any OTLP producer works without this module; it adds the rollout context as resource
attributes, Arclight's span conventions, and attribute values that never crash the exporter.
The rollout context comes from the arguments or from ``ARCLIGHT_*`` environment variables, which
the rollout runner sets for agents in other processes.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import json
import logging
import math
import os
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Mapping, Sequence

from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor, SpanExporter

from lightning_core import semconv
from lightning_core.common.ids import SystemRandomIds
from lightning_core.common.http_guard import bearer

log = logging.getLogger("arclight.tracing")

TRACER_NAME = "arclight"
ENV_KEYS = {
    "run_id": "ARCLIGHT_RUN_ID",
    "epoch": "ARCLIGHT_EPOCH",
    "rollout_id": "ARCLIGHT_ROLLOUT_ID",
    "task_id": "ARCLIGHT_TASK_ID",
    "attempt": "ARCLIGHT_ATTEMPT",
}
ENV_ENDPOINT = "ARCLIGHT_COLLECTOR_URL"
ENV_TOKEN = "ARCLIGHT_COLLECTOR_TOKEN"
ENV_LAKE = "ARCLIGHT_LAKE"

_PRIMITIVES = (str, bool, int, float)


@dataclass(frozen=True)
class RolloutContext:
    """Which run, epoch, rollout, task and attempt an agent process is working on."""

    run_id: str | None = None
    epoch: int | None = None
    rollout_id: str | None = None
    task_id: str | None = None
    attempt: int | None = None

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> "RolloutContext":
        """Read the context the rollout runner passes through ``ARCLIGHT_*`` variables."""
        env = os.environ if environ is None else environ
        values: dict[str, Any] = {field: env.get(key) or None for field, key in ENV_KEYS.items()}
        for field in ("epoch", "attempt"):
            if values[field] is not None:
                values[field] = int(values[field])
        return cls(**values)

    def to_env(self) -> dict[str, str]:
        """Return the ``ARCLIGHT_*`` variables that carry this context to a child process."""
        return {key: str(getattr(self, field)) for field, key in ENV_KEYS.items() if getattr(self, field) is not None}

    def resource_attributes(self) -> dict[str, Any]:
        """Return the context as OpenTelemetry resource attributes (None fields left out)."""
        keys = {
            "run_id": semconv.RUN_ID,
            "epoch": semconv.EPOCH,
            "rollout_id": semconv.ROLLOUT_ID,
            "task_id": semconv.TASK_ID,
            "attempt": semconv.ATTEMPT,
        }
        return {key: getattr(self, field) for field, key in keys.items() if getattr(self, field) is not None}


def sanitize_attributes(attributes: Mapping[str, Any] | None) -> dict[str, Any]:
    """Return attributes the OpenTelemetry SDK accepts: None dropped, other values coerced.

    Primitives and homogeneous lists of primitives pass unchanged; dicts, mixed lists and other
    objects become JSON (or ``str``) so nothing is lost and nothing raises. The keys that had to
    change are listed under ``arclight.attributes.coerced``.
    """
    clean: dict[str, Any] = {}
    coerced: list[str] = []
    for key, value in (attributes or {}).items():
        if value is None:
            continue
        if isinstance(value, _PRIMITIVES):
            clean[str(key)] = value
            continue
        if isinstance(value, Sequence) and not isinstance(value, (bytes, bytearray)):
            items = [v for v in value if v is not None]
            kinds = {type(v) for v in items}
            if len(items) == len(value) and len(kinds) <= 1 and kinds <= set(_PRIMITIVES):
                clean[str(key)] = list(value)
                continue
        clean[str(key)] = _to_json(value)
        coerced.append(str(key))
    if coerced:
        clean[semconv.ATTRIBUTES_DROPPED] = coerced
    return clean


def _to_json(value: Any) -> str:
    try:
        return json.dumps(value, default=str, ensure_ascii=False)
    except (TypeError, ValueError):
        return str(value)


class Tracing:
    """A configured tracer provider for one agent process."""

    def __init__(self, provider: TracerProvider, context: RolloutContext):
        self.provider = provider
        self.context = context
        self.tracer = provider.get_tracer(TRACER_NAME)

    def flush(self, timeout_s: float = 30.0) -> bool:
        """Export every finished span now; True when all were handed over in time."""
        return self.provider.force_flush(int(timeout_s * 1000))

    def shutdown(self) -> None:
        """Flush and stop the exporters."""
        self.provider.shutdown()


_current: Tracing | None = None


def init_tracing(
    *,
    service_name: str = "arclight-agent",
    endpoint: str | None = None,
    lake: str | os.PathLike[str] | None = None,
    token: str | None = None,
    context: RolloutContext | None = None,
    resource_attributes: Mapping[str, Any] | None = None,
    set_global: bool = True,
    exporter: SpanExporter | None = None,
    batch: bool = True,
) -> Tracing:
    """Set up tracing for this process and return it.

    Exports over OTLP/HTTP to ``endpoint`` (default ``$ARCLIGHT_COLLECTOR_URL`` or
    http://127.0.0.1:4318), or, with ``lake`` (or ``$ARCLIGHT_LAKE``), straight into that lake.
    ``set_global`` also makes it the global provider, so framework instrumentations use it.
    ``batch=False`` exports each span in its own request as it ends (for debugging; slow).
    """
    global _current
    context = context or RolloutContext.from_env()
    attributes = {semconv.SERVICE_NAME: service_name, **sanitize_attributes(resource_attributes)}
    attributes.update(context.resource_attributes())
    provider = TracerProvider(resource=Resource.create(attributes), id_generator=SystemRandomIds())
    lake = lake if lake is not None else os.environ.get(ENV_LAKE) if endpoint is None else None
    if exporter is None:
        if lake is not None:
            from lightning_core.ingest.embedded import LakeSpanExporter  # embedded mode: the collector's code, in process

            exporter = LakeSpanExporter(lake)
        else:
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

            url = (endpoint or os.environ.get(ENV_ENDPOINT) or "http://127.0.0.1:4318").rstrip("/")
            token = token or os.environ.get(ENV_TOKEN)
            exporter = OTLPSpanExporter(endpoint=f"{url}/v1/traces", headers=bearer(token) or None)
    if batch:
        provider.add_span_processor(BatchSpanProcessor(exporter, max_queue_size=65536, max_export_batch_size=2048, schedule_delay_millis=200))
    else:
        provider.add_span_processor(SimpleSpanProcessor(exporter))
    if set_global:
        trace.set_tracer_provider(provider)
    _current = Tracing(provider, context)
    return _current


def current() -> Tracing:
    """Return the tracing set up by ``init_tracing`` (it must have been called)."""
    if _current is None:
        raise RuntimeError("tracing is not set up: call lightning_core.tracing.init_tracing() first")
    return _current


def flush(timeout_s: float = 30.0) -> bool:
    """Export every finished span of this process now."""
    return current().flush(timeout_s)


def _tracer() -> trace.Tracer:
    return _current.tracer if _current is not None else trace.get_tracer(TRACER_NAME)


class _SpanScope:
    """A span that works as a context manager and as a decorator of sync and async functions."""

    def __init__(self, name: str, attributes: dict[str, Any]):
        self.name, self.attributes = name, attributes
        self._cm: Any = None

    def __enter__(self) -> trace.Span:
        self._cm = _tracer().start_as_current_span(self.name, attributes=self.attributes)
        return self._cm.__enter__()

    def __exit__(self, *exc: Any) -> Any:
        return self._cm.__exit__(*exc)

    def __call__(self, fn: Callable) -> Callable:
        if inspect.iscoroutinefunction(fn):
            @functools.wraps(fn)
            async def async_wrapper(*args: Any, **kwargs: Any) -> Any:
                with _tracer().start_as_current_span(self.name, attributes=self.attributes):
                    return await fn(*args, **kwargs)

            return async_wrapper

        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            with _tracer().start_as_current_span(self.name, attributes=self.attributes):
                return fn(*args, **kwargs)

        return wrapper


def agent(name: str, **attributes: Any) -> _SpanScope:
    """Mark an agent: its LLM calls and tools are owned by ``name`` (context manager or decorator)."""
    attrs = sanitize_attributes(attributes)
    attrs.update({semconv.SPAN_KIND: semconv.KIND_AGENT, semconv.AGENT_NAME: str(name)})
    return _SpanScope(semconv.SPAN_NAME_AGENT.format(name=name), attrs)


def tool(name: str, **attributes: Any) -> _SpanScope:
    """Mark a tool call; an exception inside marks the span as an error (context manager or decorator)."""
    attrs = sanitize_attributes(attributes)
    attrs.update({semconv.SPAN_KIND: semconv.KIND_TOOL, semconv.TOOL_NAME: str(name)})
    return _SpanScope(semconv.SPAN_NAME_TOOL.format(name=name), attrs)


def reward_function(name: str, **attributes: Any) -> _SpanScope:
    """Mark a reward function: LLM calls inside it (a judge) are not training data (context manager or decorator)."""
    attrs = sanitize_attributes(attributes)
    attrs[semconv.SPAN_KIND] = semconv.KIND_REWARD  # no value and no reward name: a scope, not a reward
    return _SpanScope(semconv.SPAN_NAME_REWARD_FUNCTION.format(name=name), attrs)


def emit_reward(value: float | int | bool | None, name: str = "primary", **attributes: Any) -> None:
    """Record a reward as a span; ``None`` or a non-number is recorded as a missing value."""
    attrs = sanitize_attributes(attributes)
    attrs.update({semconv.SPAN_KIND: semconv.KIND_REWARD, semconv.REWARD_NAME: str(name)})
    number = _as_reward(value)
    if number is not None:
        attrs[semconv.REWARD_VALUE] = number
    elif value is not None:
        attrs["arclight.reward.invalid"] = repr(value)[:200]
        log.warning("reward %r is not a finite number; recorded as missing", value)
    with _tracer().start_as_current_span(semconv.SPAN_NAME_REWARD.format(name=name), attributes=attrs):
        pass


def _as_reward(value: Any) -> float | None:
    if value is None:
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def emit_message(content: Any, *, role: str = "assistant", **attributes: Any) -> None:
    """Record a message (anything the agent said or heard) as a span."""
    attrs = sanitize_attributes(attributes)
    text = content if isinstance(content, str) else _to_json(content)
    attrs.update({semconv.SPAN_KIND: semconv.KIND_MESSAGE, semconv.MESSAGE_ROLE: role, semconv.MESSAGE_CONTENT: text})
    with _tracer().start_as_current_span(semconv.SPAN_NAME_MESSAGE, attributes=attrs):
        pass


@contextlib.contextmanager
def span(name: str, **attributes: Any) -> Iterator[trace.Span]:
    """Open a plain span with sanitized attributes."""
    with _tracer().start_as_current_span(name, attributes=sanitize_attributes(attributes)) as s:
        yield s
