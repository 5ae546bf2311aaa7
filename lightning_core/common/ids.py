"""Trace and span ids from the operating system's random source, never from Python's ``random``.

OpenTelemetry's default id generator draws from the global ``random`` generator, which whatever else
runs in the process may seed: the trainer seeds it before every training stage (``seed_everything``),
and agents often seed it per task. The ids then repeat. In one ``arclight train`` process every epoch's
``rollout outcome`` spans had the trace and span ids of the epoch before (the test two epochs long saw
it once another test had trained in the same process), and an agent that seeds per task would give
each rollout of a task the same trace. ``secrets`` reads ``os.urandom``: no seed reaches it, and a
forked worker draws its own ids.
"""

from __future__ import annotations

import secrets

from opentelemetry.sdk.trace.id_generator import IdGenerator
from opentelemetry.trace import INVALID_SPAN_ID, INVALID_TRACE_ID


def trace_id() -> int:
    """A new 128-bit trace id (never the invalid 0)."""
    while True:
        value = secrets.randbits(128)
        if value != INVALID_TRACE_ID:
            return value


def span_id() -> int:
    """A new 64-bit span id (never the invalid 0)."""
    while True:
        value = secrets.randbits(64)
        if value != INVALID_SPAN_ID:
            return value


class SystemRandomIds(IdGenerator):
    """The id generator of every tracer provider Arclight builds (``TracerProvider(id_generator=...)``)."""

    def generate_span_id(self) -> int:
        return span_id()

    def generate_trace_id(self) -> int:
        return trace_id()
