"""OpenTelemetry set-up shared by the framework agents: plain OTel SDK, configured only by the
standard environment variables a ``rollouts.command`` agent is given (nothing from Arclight).

- ``OTEL_RESOURCE_ATTRIBUTES`` / ``OTEL_SERVICE_NAME``: read by ``Resource.create()``;
- ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`` (or ``OTEL_EXPORTER_OTLP_ENDPOINT``), ``..._HEADERS``: read by
  ``OTLPSpanExporter()`` (OTLP/HTTP, protobuf);
- ``TRACEPARENT``: the runner's rollout span, the parent of the agent's root span when present.

Runs in ``.venv-agents`` (scripts/setup_agents.sh), never in the project's environment.
"""

from __future__ import annotations

import json
import os
import sys
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

def read_task() -> dict[str, Any]:
    """The task: one JSON line on standard input, else ``ARCLIGHT_TASK``."""
    line = "" if sys.stdin is None or sys.stdin.isatty() else sys.stdin.readline()
    text = line.strip() or os.environ.get("ARCLIGHT_TASK", "").strip()
    if not text:
        raise SystemExit("no task: expected one JSON line on standard input or ARCLIGHT_TASK")
    task = json.loads(text)
    if not isinstance(task, dict):
        raise SystemExit(f"the task must be a JSON object, got {type(task).__name__}")
    return task


def model_settings() -> dict[str, Any]:
    """The model endpoint of the rollout (its gateway URL) from the contract's variables."""
    base_url = os.environ.get("ARCLIGHT_BASE_URL") or os.environ.get("OPENAI_BASE_URL")
    if not base_url:
        raise SystemExit("neither ARCLIGHT_BASE_URL nor OPENAI_BASE_URL is set")
    return {
        "base_url": base_url,
        "api_key": os.environ.get("OPENAI_API_KEY") or "unused",
        "model": os.environ.get("ARCLIGHT_MODEL") or "tiny",
        "temperature": float(os.environ.get("ARCLIGHT_TEMPERATURE") or 1.0),
    }


def start_provider(*, set_global: bool) -> TracerProvider:
    """A TracerProvider with the environment's resource and an OTLP/HTTP exporter in a batch processor."""
    provider = TracerProvider(resource=Resource.create())
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    if set_global:
        trace.set_tracer_provider(provider)
    return provider


def parent_context() -> Context | None:
    """The context of the runner's rollout span (``TRACEPARENT``), or None when there is none."""
    traceparent = os.environ.get("TRACEPARENT")
    if not traceparent:
        return None
    carrier = {"traceparent": traceparent}
    if os.environ.get("TRACESTATE"):
        carrier["tracestate"] = os.environ["TRACESTATE"]
    return TraceContextTextMapPropagator().extract(carrier)


@contextmanager
def root_span(provider: TracerProvider, name: str, **attributes: Any) -> Iterator[trace.Span]:
    """The agent's root span, a child of ``TRACEPARENT`` when given, current for the body."""
    tracer = provider.get_tracer("arclight.framework_agents")
    parent = parent_context()
    token = otel_context.attach(parent) if parent is not None else None
    try:
        with tracer.start_as_current_span(name, attributes=attributes) as span:
            yield span
    finally:
        if token is not None:
            otel_context.detach(token)


def finish(provider: TracerProvider, reward: float) -> None:
    """Print the one final line of output, then export every span and stop; a failed export fails the program."""
    print(json.dumps({"reward": float(reward)}), flush=True)
    flushed = provider.force_flush(30_000)
    provider.shutdown()
    if not flushed:
        print("the spans could not be exported to the collector", file=sys.stderr)
        raise SystemExit(3)


def fail(provider: TracerProvider) -> int:
    """Print the error, export what was recorded, stop; return the exit status of a failed run (1)."""
    traceback.print_exc()
    provider.force_flush(10_000)
    provider.shutdown()
    return 1
