"""Rollouts as trees a trace viewer shows, read from the lake: the repaired hierarchy training used.

One ``RolloutTrace`` per rollout of a (run, epoch), or per trace of the production spans: the rollout's row
(``sql/trace_rollouts.sql``) and its spans in the repaired tree (``sql/trace_spans.sql``), each LLM span with the
model call it is part of and the triplets that call became (advantage and return, per policy). The shared stages
of the pipeline run again over the lake for this (they are deterministic: the same spans and config give the tree
the epoch trained on), so it needs nothing but the lake and the config. ``epoch/traces.py`` publishes the trees
to MLflow.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa

from lightning_core import semconv
from lightning_core.config import ArclightConfig
from lightning_core.pipeline import triplets as pipeline
from lightning_core.pipeline.steps import run_stage
from lightning_core.store import outputs
from lightning_core.store.catalog import Catalog


@dataclass
class TraceSpan:
    """One span of the repaired tree, with what the trace viewer shows of it."""

    node: int
    parent: int | None  # the repaired parent's node; None for a root
    name: str
    kind: str  # LLM, TOOL, AGENT, EVALUATOR (a reward), CHAIN (the rollout) or UNKNOWN
    start_ns: int
    end_ns: int
    error: str | None  # the status message of a span whose status is ERROR ("" when it gave none)
    attributes: dict[str, Any]  # what the viewer lists: the stored attributes, and ours (arclight.*)
    inputs: Any = None
    outputs: Any = None


@dataclass
class RolloutTrace:
    """One rollout: its row and its spans, roots first, each after its parent."""

    run_id: str | None
    epoch: int | None
    row: dict[str, Any]
    spans: list[TraceSpan] = field(default_factory=list)

    @property
    def rollout_id(self) -> str:
        return self.row["rollout_id"]

    @property
    def reward(self) -> float | None:
        return self.row["reward"]

    @property
    def failed(self) -> bool:
        return self.row["status"] not in ("succeeded", "ok")


def rollout_traces(config: ArclightConfig, *, run_id: str | None, epoch: int | None,
                   catalog: Catalog | None = None) -> list[RolloutTrace]:
    """The rollouts of ``run_id``/``epoch`` (production traces when ``run_id`` is None) as trees, from the lake."""
    con = pipeline.connect(config, catalog=catalog)
    try:
        base = pipeline.shared_parameters(config, run_id=run_id, epoch=epoch)
        for stage, table in pipeline.SHARED_STAGES:
            run_stage(con, stage, params=base, table=table)
        rows = _records(run_stage(con, "trace_rollouts", params=base))
        spans = _records(run_stage(con, "trace_spans", params=base).order("grp, start_ns, node"))
    finally:
        con.close()
    triplets = _triplets_by_span(config, run_id=run_id, epoch=epoch) if run_id is not None else {}
    by_grp: dict[str, list[dict[str, Any]]] = {}
    for s in spans:
        by_grp.setdefault(s["grp"], []).append(s)
    traces = []
    for row in sorted(rows, key=lambda r: (r["start_ns"] or 0, r["rollout_id"])):
        row["task"] = json.loads(row["task"]) if isinstance(row["task"], str) else row["task"]
        trace = RolloutTrace(run_id=run_id, epoch=epoch, row=row)
        trace.spans = _tree([_span(s, triplets) for s in by_grp.get(row["grp"], [])])
        traces.append(trace)
    return traces


def _records(relation) -> list[dict[str, Any]]:
    names = relation.columns
    return [dict(zip(names, values)) for values in relation.fetchall()]


def _triplets_by_span(config: ArclightConfig, *, run_id: str, epoch: int | None) -> dict[str, list[dict[str, Any]]]:
    """The epoch's triplets by the span of their call: the policy, advantage (and its rollout and turn terms), return
    and sampling version of each."""
    found: dict[str, list[dict[str, Any]]] = {}
    for policy in config.policies:
        try:
            table = outputs.load_triplets(config, run_id=run_id, epoch=epoch, policy=policy.name)
        except (FileNotFoundError, ValueError):  # no triplets (an evaluation run, or an epoch before its pipeline ran)
            continue
        if not isinstance(table, pa.Table) or table.num_rows == 0:
            continue
        columns = table.select(["span_id", "advantage", "rollout_advantage", "turn_advantage", "rollout_return",
                                "policy_version", "reward"]).to_pylist()
        for t in columns:
            found.setdefault(t["span_id"], []).append({"policy": policy.name, **{k: t[k] for k in t if k != "span_id"}})
    return found


def _span(s: dict[str, Any], triplets: dict[str, list[dict[str, Any]]]) -> TraceSpan:
    attributes: dict[str, Any] = json.loads(s["attributes"]) if s["attributes"] else {}
    ours = {"arclight.span_id": s["span_id"], "arclight.trace_id": s["trace_id"], "arclight.agent": s["agent_name"]}
    if s["repair_reason"]:  # moved by the repair: where it was, and why it moved
        ours.update({"arclight.repair_reason": s["repair_reason"], "arclight.original_parent_id": s["original_parent_id"]})
    inputs = outputs_ = None
    if s["is_llm"]:
        kind = "LLM"
        inputs = {"messages": _json_or_text(s["prompt_messages"])} if s["prompt_messages"] else None
        outputs_ = ({"choices": [{"index": 0, "message": {"role": "assistant", "content": s["response_text"]}}]}
                    if s["response_text"] is not None else None)
        ours.update({"arclight.policy_version": s["policy_version"], "arclight.judge_call": bool(s["in_reward"]),
                     "mlflow.llm.model": s["model"]})
        if s["input_tokens"] is not None or s["output_tokens"] is not None:
            i, o = int(s["input_tokens"] or 0), int(s["output_tokens"] or 0)
            ours["mlflow.chat.tokenUsage"] = {"input_tokens": i, "output_tokens": o, "total_tokens": i + o}
        made = triplets.get(s["call_span_id"], []) if s["call_span_id"] else []
        ours["arclight.selected"] = bool(made)  # a policy's agent_match selected the call: it trained
        ours["arclight.triplets"] = made
        if len(made) == 1:
            ours.update({"arclight.policy": made[0]["policy"], "arclight.advantage": made[0]["advantage"],
                         "arclight.rollout_advantage": made[0]["rollout_advantage"],
                         "arclight.turn_advantage": made[0]["turn_advantage"],  # None (left out) under advantage=rollout
                         "arclight.return": made[0]["rollout_return"]})
    elif s["is_tool"]:
        kind = "TOOL"
        inputs = {k: v for k, v in attributes.items() if not k.startswith(("arclight.", "tool.name"))} or None
    elif s["is_reward"]:
        kind = "EVALUATOR"
        outputs_ = {"reward": s["reward_value"]}
    elif s["is_agent"]:
        kind = "AGENT"
    elif s["is_rollout"] or attributes.get(semconv.SPAN_KIND) == semconv.KIND_ROLLOUT_OUTCOME:
        kind = "CHAIN"
    else:
        kind = "UNKNOWN"
    error = (s["status_message"] or "") if s["status_code"] == "ERROR" else None
    return TraceSpan(node=s["node"], parent=s["parent_node"], name=s["name"], kind=kind, start_ns=int(s["start_ns"]),
                     end_ns=int(max(s["end_ns"], s["start_ns"])), error=error,
                     attributes={**attributes, **{k: v for k, v in ours.items() if v is not None}},
                     inputs=inputs, outputs=outputs_)


def _json_or_text(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return text


def _tree(spans: list[TraceSpan]) -> list[TraceSpan]:
    """The spans in an order where each parent comes before its children (a parent that is not in the rollout's spans
    makes a root)."""
    nodes = {s.node for s in spans}
    children: dict[int | None, list[TraceSpan]] = {}
    for s in spans:
        if s.parent not in nodes:
            s.parent = None
        children.setdefault(s.parent, []).append(s)
    ordered: list[TraceSpan] = []
    stack = list(reversed(children.get(None, [])))
    while stack:
        s = stack.pop()
        ordered.append(s)
        stack.extend(reversed(children.get(s.node, [])))
    return ordered
