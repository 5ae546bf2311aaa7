"""Build span rows for pipeline tests directly in the lake's schema (no SDK in between; attributes
are promoted to typed columns exactly as at ingest)."""

from __future__ import annotations

import itertools
import json
from pathlib import Path
from typing import Any

from lightning_core.store.spans import Lake
from lightning_core.store.span_schema import Partition
from lightning_core.ingest.span_rows import promoted_columns, rows_to_table

_ids = itertools.count(1)


def new_id(width: int = 16) -> str:
    """Return a fresh hex id (16 chars for spans, 32 for traces)."""
    return format(next(_ids), f"0{width}x")


class Rollout:
    """Span rows of one rollout (one trace unless told otherwise), times in microseconds."""

    def __init__(self, rollout_id: str | None, *, task_id: str | None = None, attempt: int | None = 0, trace_id: str | None = None):
        self.rollout_id, self.task_id, self.attempt = rollout_id, task_id, attempt
        self.trace_id = trace_id or new_id(32)
        self.rows: list[dict[str, Any]] = []

    def span(self, name: str, start: int, end: int, *, parent: str | None = None, attrs: dict | None = None,
             status: str = "UNSET", events: list | None = None, span_id: str | None = None,
             trace_id: str | None = None, received_ns: int = 0) -> str:
        """Add one span; return its id."""
        span_id = span_id or new_id()
        self.rows.append({
            "trace_id": trace_id or self.trace_id, "span_id": span_id, "parent_id": parent, "name": name,
            "kind": "INTERNAL", "start_ns": start * 1000, "end_ns": end * 1000, "status_code": status,
            "status_message": None, **promoted_columns(attrs or {}), "events": json.dumps(events or []),
            "links": "[]", "resource": "{}", "scope_name": "test", "scope_version": None, "service_name": "test",
            "rollout_id": self.rollout_id, "task_id": self.task_id, "attempt": self.attempt, "received_ns": received_ns,
        })
        return span_id

    def agent(self, name: str, start: int, end: int, **kw) -> str:
        """An SDK agent span."""
        return self.span(f"agent {name}", start, end, attrs={"arclight.span.kind": "agent", "agent.name": name, **kw.pop("attrs", {})}, **kw)

    def call(self, start: int, end: int, *, prompt=(1, 2, 3), response=(4, 5), logprobs=(-0.1, -0.2),
             response_id: str | None = None, text: str = "ok", **kw) -> str:
        """A gateway LLM span with token ids (None drops them)."""
        attrs = {"arclight.span.kind": "llm", "gen_ai.operation.name": "chat",
                 "arclight.llm.request_messages": json.dumps([{"role": "user", "content": f"q{start}"}]),
                 "arclight.llm.response_text": text, "arclight.policy.version": "v1",
                 "arclight.llm.served_model": "base"}
        if prompt is not None:
            attrs["arclight.llm.prompt_token_ids"] = list(prompt)
        if response is not None:
            attrs["arclight.llm.response_token_ids"] = list(response)
        if logprobs is not None:
            attrs["arclight.llm.response_logprobs"] = list(logprobs)
        if response_id:
            attrs["gen_ai.response.id"] = response_id
        attrs.update(kw.pop("attrs", {}))
        return self.span("chat base", start, end, attrs=attrs, **kw)

    def reward(self, value, at: int, **kw) -> str:
        """An emit_reward span (value None = missing)."""
        attrs = {"arclight.span.kind": "reward", "arclight.reward.name": "primary"}
        if value is not None:
            attrs["arclight.reward.value"] = value
        attrs.update(kw.pop("attrs", {}))
        return self.span("reward primary", at, at, attrs=attrs, **kw)

    def tool(self, name: str, start: int, end: int, *, failed: bool = False, reward: float | None = None, **kw) -> str:
        """An SDK tool span, failed with an exception event when told, with its own reward (arclight.tool.reward) when given."""
        events = [{"name": "exception", "time_ns": end * 1000, "attributes": {"exception.type": "ValueError"}}] if failed else []
        attrs = {"arclight.span.kind": "tool", "tool.name": name}
        if reward is not None:
            attrs["arclight.tool.reward"] = reward
        return self.span(f"tool {name}", start, end, attrs=attrs,
                         status="ERROR" if failed else "UNSET", events=events, **kw)


def write(lake_root: Path, rollouts: list[Rollout], *, run_id: str | None = "r1", epoch: int | None = 0) -> None:
    """Write the rollouts' rows into one lake partition."""
    rows = [row for r in rollouts for row in r.rows]
    partition = Partition(run_id, epoch) if run_id else Partition(None, None, "2026-11-01")
    Lake(lake_root).write_table(partition, rows_to_table(rows))


def shared_stages(config, *, run_id: str | None = "r1", epoch: int | None = 0):
    """Run the policy-independent stages; return the DuckDB connection holding their tables."""
    from lightning_core.pipeline.triplets import SHARED_STAGES, connect, shared_parameters
    from lightning_core.pipeline.steps import run_stage

    con = connect(config)
    for stage, table in SHARED_STAGES:
        run_stage(con, stage, params=shared_parameters(config, run_id=run_id, epoch=epoch), table=table)
    return con


def rows(con, sql: str) -> list[dict]:
    """Return a query's rows as dicts."""
    return con.sql(sql).to_arrow_table().to_pylist()
