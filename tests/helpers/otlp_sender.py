"""Run in a separate process: send N spans through the real OTLP/HTTP exporter to a collector.

Usage: python -m tests.helpers.otlp_sender URL N OUT.json [TOKEN]
Writes what the SDK exported (ids, parents, times, attributes, events) to OUT.json, so the test
can compare it with what the collector stored.
"""

from __future__ import annotations

import json
import sys

from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from lightning_core import tracing


def main(url: str, n: int, out: str, token: str | None = None) -> None:
    ctx = tracing.RolloutContext(run_id="bulk", epoch=3, rollout_id="ro-1", task_id="task-1", attempt=0)
    handle = tracing.init_tracing(endpoint=url, token=token, context=ctx, set_global=False, service_name="sender")
    memory = InMemorySpanExporter()
    handle.provider.add_span_processor(SimpleSpanProcessor(memory))
    tracer = handle.tracer
    sent = 0
    while sent < n:
        # A three-level tree per iteration: agent -> llm -> tool, with events and odd attributes.
        with tracing.agent(f"worker-{sent % 7}", note=None, tags=["a", "b"], nested={"k": [1, 2]}):
            sent += 1
            with tracer.start_as_current_span("llm call", attributes={"ids": [1, 2, 3], "p": 0.5, "flag": True}) as s:
                s.add_event("token", {"index": sent, "text": "x", "probs": [0.1, 0.2]})
                sent += 1
                if sent < n:
                    with tracing.tool("calc", expr="2*3", nothing=None, mixed=[1, "two", None]):
                        sent += 1
        if n - sent == 1:
            tracing.emit_reward(None if sent % 2 else 1.0)
            sent += 1
    assert handle.flush(60), "exporter did not flush in time"
    rows = []
    for span in memory.get_finished_spans():
        rows.append(
            {
                "trace_id": f"{span.context.trace_id:032x}",
                "span_id": f"{span.context.span_id:016x}",
                "parent_id": f"{span.parent.span_id:016x}" if span.parent else None,
                "name": span.name,
                "start_ns": span.start_time,
                "end_ns": span.end_time,
                "attributes": {k: list(v) if isinstance(v, tuple) else v for k, v in span.attributes.items()},
                "events": [
                    {"name": e.name, "time_ns": e.timestamp,
                     "attributes": {k: list(v) if isinstance(v, tuple) else v for k, v in e.attributes.items()}}
                    for e in span.events
                ],
            }
        )
    handle.shutdown()
    with open(out, "w") as fh:
        json.dump(rows, fh)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), sys.argv[3], *(sys.argv[4:5]))
