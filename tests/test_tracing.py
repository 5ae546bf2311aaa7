"""The tracing SDK: both export paths store the same rows; odd attribute values never crash."""

from __future__ import annotations

import asyncio
import json

import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from opentelemetry.sdk.trace.export import BatchSpanProcessor

from lightning_core import semconv, tracing
from lightning_core.ingest.embedded import LakeSpanExporter
from lightning_core.store.catalog import Catalog


def _agent_code() -> None:
    with tracing.agent("planner", goal="plan", extra=None):
        with tracing.tool("search", query={"q": "x"}):
            tracing.emit_message({"role": "tool", "content": "found"}, role="tool")
        tracing.emit_reward(0.5, name="progress")
    try:
        with tracing.tool("calculator"):
            raise ZeroDivisionError("1/0")
    except ZeroDivisionError:
        pass
    tracing.emit_reward(1, name="primary", judge=None)


def _table(lake_root, run_id: str):
    files = sorted((lake_root / "spans" / "training" / f"run_id={run_id}").rglob("part-*.parquet"))
    table = pq.ParquetDataset(files).read().drop_columns(["received_ns"])
    return table.sort_by("span_id")


def test_embedded_exporter_stores_the_same_rows_as_the_otlp_path(collector, collector_config, tmp_path):
    context = tracing.RolloutContext(run_id="same-rows", epoch=2, rollout_id="r-7", task_id="t-7", attempt=1)
    handle = tracing.init_tracing(endpoint=collector.url, context=context, set_global=False, service_name="agent-x")
    embedded_lake = tmp_path / "embedded"
    handle.provider.add_span_processor(BatchSpanProcessor(LakeSpanExporter(embedded_lake)))
    _agent_code()
    assert handle.flush()
    handle.shutdown()
    via_collector = _table(collector_config.lake.path, "same-rows")
    embedded = _table(embedded_lake, "same-rows")
    assert via_collector.num_rows == 6
    assert embedded.equals(via_collector)
    names = sorted(via_collector.column("name").to_pylist())
    assert names == ["agent planner", "message", "reward primary", "reward progress", "tool calculator", "tool search"]
    failed = via_collector.filter(pc.equal(via_collector["name"], "tool calculator"))
    assert failed["status_code"].to_pylist() == ["ERROR"]
    assert "ZeroDivisionError" in failed["events"][0].as_py()


def test_embedded_mode_rows_reach_the_spans_view(tmp_path):
    lake = tmp_path / "lake"
    handle = tracing.init_tracing(lake=lake, context=tracing.RolloutContext(run_id="emb", epoch=0), set_global=False)
    _agent_code()
    handle.flush()
    catalog = Catalog(lake)
    catalog.ensure()
    with catalog.read() as con:
        rows = con.execute(
            "SELECT span_kind, agent_name, reward_value FROM spans WHERE run_id='emb' AND span_kind IN ('agent','reward') ORDER BY start_ns"
        ).fetchall()
    assert rows == [("agent", "planner", None), ("reward", None, 0.5), ("reward", None, 1.0)]


def test_sanitize_keeps_primitives_and_coerces_the_rest():
    class Thing:
        def __str__(self) -> str:
            return "thing"

    clean = tracing.sanitize_attributes(
        {"s": "x", "i": 1, "f": 1.5, "b": True, "none": None, "ints": [1, 2], "mixed": [1, "a"],
         "holes": [1, None], "d": {"a": [1]}, "obj": Thing(), "empty": []}
    )
    assert clean["s"] == "x" and clean["i"] == 1 and clean["f"] == 1.5 and clean["b"] is True
    assert "none" not in clean
    assert clean["ints"] == [1, 2] and clean["empty"] == []
    assert json.loads(clean["mixed"]) == [1, "a"]
    assert json.loads(clean["holes"]) == [1, None]
    assert json.loads(clean["d"]) == {"a": [1]}
    assert clean["obj"] == '"thing"'
    assert clean[semconv.ATTRIBUTES_DROPPED] == ["mixed", "holes", "d", "obj"]


def test_rewards_that_are_not_numbers_are_recorded_as_missing(tmp_path):
    lake = tmp_path / "lake"
    handle = tracing.init_tracing(lake=lake, context=tracing.RolloutContext(run_id="rw", epoch=0), set_global=False)
    tracing.emit_reward(None)
    tracing.emit_reward("not a number")
    tracing.emit_reward(float("nan"))
    tracing.emit_reward(True)
    handle.flush()
    catalog = Catalog(lake)
    catalog.ensure()
    with catalog.read() as con:
        values = [r[0] for r in con.execute("SELECT reward_value FROM spans WHERE run_id='rw' ORDER BY start_ns").fetchall()]
    assert values == [None, None, None, 1.0]


def test_agent_and_tool_decorate_sync_and_async_functions(tmp_path):
    lake = tmp_path / "lake"
    handle = tracing.init_tracing(lake=lake, context=tracing.RolloutContext(run_id="deco", epoch=0), set_global=False)

    @tracing.agent("async-agent")
    async def run_async(x: int) -> int:
        await asyncio.sleep(0)
        return x + 1

    @tracing.tool("adder")
    def add(a: int, b: int) -> int:
        return a + b

    assert asyncio.run(run_async(1)) == 2
    assert add(2, 3) == 5
    handle.flush()
    catalog = Catalog(lake)
    catalog.ensure()
    with catalog.read() as con:
        names = sorted(r[0] for r in con.execute("SELECT name FROM spans WHERE run_id='deco'").fetchall())
    assert names == ["agent async-agent", "tool adder"]


def test_rollout_context_round_trips_through_the_environment():
    ctx = tracing.RolloutContext(run_id="r", epoch=4, rollout_id="ro", task_id="t", attempt=2)
    assert tracing.RolloutContext.from_env(ctx.to_env()) == ctx
    assert tracing.RolloutContext.from_env({}) == tracing.RolloutContext()
    assert ctx.resource_attributes()[semconv.EPOCH] == 4


def test_flush_before_init_says_what_to_do(monkeypatch):
    monkeypatch.setattr(tracing, "_current", None)
    with pytest.raises(RuntimeError, match="init_tracing"):
        tracing.flush()


def test_span_ids_do_not_repeat_when_the_process_seeds_python_s_random_generator():
    """The trainer seeds ``random`` before every training stage, and agents seed it per task: every tracer Arclight
    builds (an agent's, the runner's outcome spans, the gateway's recorder) draws its ids from the OS instead.
    With OpenTelemetry's default generator, every epoch of one ``arclight train`` gave its ``rollout outcome`` spans
    the ids of the epoch before (tests/test_flows.py saw them in two partitions)."""
    import random

    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    from lightning_core.rollouts.runner import _outcome_provider
    from lightning_core.serving.metrics import GatewayMetrics
    from lightning_core.serving.recording import SpanRecorder
    from lightning_core.trainer.policy_model import seed_everything

    agent = tracing.init_tracing(service_name="seeded-agent", set_global=False, exporter=InMemorySpanExporter(), batch=False)
    outcome = _outcome_provider("http://127.0.0.1:9", None, "seeded-run", 0)  # never flushed: nothing is sent
    memory = InMemorySpanExporter()
    recorder = SpanRecorder(memory, GatewayMetrics(), delay_ms=10)
    seen = []
    for _ in range(2):
        seed_everything(0)  # what the training stage does between two epochs
        for tracer in (agent.provider.get_tracer("t"), outcome.get_tracer("t")):
            span = tracer.start_span("s")
            seen.append((span.get_span_context().trace_id, span.get_span_context().span_id))
        random.seed(0)
        recorder.record(name="chat", resource=Resource.create({}), parent=None, start_ns=1, end_ns=2, attributes={})
    recorder.processor.force_flush()
    seen += [(s.context.trace_id, s.context.span_id) for s in memory.get_finished_spans()]
    assert len(seen) == 6 and len(set(seen)) == 6 and len({t for t, _ in seen}) == 6
