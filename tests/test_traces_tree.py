"""A rollout's trace is its repaired tree (sql/trace_spans.sql, lightning_core/pipeline/traces.py), published to a real
MLflow store (SQLite) without duplicates (lightning_core/epoch/traces.py). Spans written straight into the lake."""

from __future__ import annotations

import json

from lightning_core.epoch import traces as publishing
from lightning_core.epoch.traces import PUBLISHED, publish_epoch
from lightning_core.pipeline.traces import RolloutTrace, rollout_traces
from tests.conftest import make_config
from tests.spans_factory import Rollout, rows, shared_stages, write


def _rollouts() -> list[Rollout]:
    """Two rollouts: one whose model call has three spans (a chain, the client, the gateway) and whose second call's
    gateway span came in a trace of its own (the repair puts it under the agent); one with a failed tool."""
    a = Rollout("ro-a", task_id="t1")
    agent = a.agent("planner", 0, 100, parent=a.span("rollout", 0, 100, attrs={"arclight.span.kind": "rollout"}))
    chain = a.span("ChatOpenAI", 10, 50, parent=agent, attrs={"llm.request.type": "chat"})
    client = a.span("openai.chat", 11, 49, parent=chain, attrs={"gen_ai.operation.name": "chat",
                                                               "gen_ai.response.id": "chatcmpl-1"})
    a.call(12, 48, parent=client, response_id="chatcmpl-1", prompt=(7, 8), response=(10,), text="CALC: 2+2")
    a.call(60, 70, trace_id="f" * 32, text="ANSWER: 4")  # its own trace: repaired into the rollout
    a.reward(1.0, 90, parent=agent)
    b = Rollout("ro-b", task_id="t1")
    agent_b = b.agent("planner", 0, 100, parent=b.span("rollout", 0, 100, attrs={"arclight.span.kind": "rollout"}))
    b.call(10, 20, parent=agent_b, text="CALC: 2*")
    b.tool("calculator", 30, 40, parent=agent_b, failed=True)
    b.reward(0.0, 90, parent=agent_b)
    return [a, b]


def test_each_span_sits_under_its_repaired_parent_and_every_span_of_a_call_shows_the_call(tmp_path):
    cfg = make_config(tmp_path)
    write(cfg.lake.path, _rollouts())
    repaired = rows(shared_stages(cfg), "SELECT grp, node, parent_node, span_id, repair_reason FROM repaired_spans")
    traces = {t.rollout_id: t for t in rollout_traces(cfg, run_id="r1", epoch=0)}
    assert sorted(traces) == ["ro-a", "ro-b"]
    for grp, trace in traces.items():
        assert {(s.node, s.parent) for s in trace.spans} == {(r["node"], r["parent_node"]) for r in repaired
                                                               if r["grp"] == grp}
        seen = set()
        for s in trace.spans:  # each parent before its children
            assert s.parent is None or s.parent in seen
            seen.add(s.node)
    a = traces["ro-a"]
    llm = [s for s in a.spans if s.kind == "LLM"]
    first = [s for s in llm if s.name != "chat base" or s.start_ns == 12_000]
    assert len(llm) == 4 and len(first) == 3
    # the three spans of the first call all show its messages and its answer, with the gateway's token counts
    assert {json.dumps(s.outputs) for s in first} == {json.dumps(
        {"choices": [{"index": 0, "message": {"role": "assistant", "content": "CALC: 2+2"}}]})}
    assert all(s.attributes["mlflow.chat.tokenUsage"] == {"input_tokens": 2, "output_tokens": 1, "total_tokens": 3}
               for s in first)
    moved = next(s for s in llm if s.start_ns == 60_000)
    assert moved.attributes["arclight.repair_reason"] and moved.parent == next(s.node for s in a.spans if s.kind == "AGENT")
    b = traces["ro-b"]
    tool = next(s for s in b.spans if s.kind == "TOOL")
    assert tool.error == "" and b.row["reward"] == 0.0 and a.row["reward"] == 1.0


def test_publishing_twice_makes_each_trace_once_in_a_real_mlflow_store(tmp_path):
    import mlflow

    cfg = make_config(tmp_path, f"tracking.mlflow_uri=sqlite:///{tmp_path / 'mlflow.db'}", "run_name=r1")
    write(cfg.lake.path, _rollouts())
    first = publish_epoch(cfg, run_id="r1", epoch=0)
    assert (first.published, first.already, first.error) == (2, 0, None), first.summary()
    again = publish_epoch(cfg, run_id="r1", epoch=0)
    assert (again.published, again.already, again.error) == (0, 2, None), again.summary()
    experiment = mlflow.get_experiment_by_name(cfg.tracking.experiment or cfg.name).experiment_id
    found = mlflow.search_traces(locations=[experiment], return_type="list")
    assert sorted(t.info.tags["arclight.rollout_id"] for t in found) == ["ro-a", "ro-b"]
    assert {t.info.tags[PUBLISHED] for t in found} == {"true"}
    a = next(t for t in found if t.info.tags["arclight.rollout_id"] == "ro-a")
    assert [(x.name, x.value) for x in a.info.assessments] == [("reward", 1.0)]
    # the trace's spans: the rollout's one root span as the trace's root, every other span under its repaired parent
    names = sorted(s.name for s in a.data.spans)
    assert names == sorted(["rollout t1", "agent planner", "ChatOpenAI", "openai.chat", "chat base", "chat base",
                            "reward primary"])
    by_id = {s.span_id: s for s in a.data.spans}
    moved = next(s for s in a.data.spans if s.name == "chat base" and s.attributes.get("arclight.repair_reason"))
    assert by_id[moved.parent_id].name == "agent planner"


def test_production_traces_publish_one_trace_per_trace_id_and_again_none(tmp_path):
    import mlflow

    cfg = make_config(tmp_path, f"tracking.mlflow_uri=sqlite:///{tmp_path / 'mlflow.db'}")
    served = []
    for answer in ("4", "5"):
        r = Rollout(None, attempt=None)
        agent = r.agent("planner", 0, 100)
        r.call(10, 20, parent=agent, text=answer)
        served.append(r)
    write(cfg.lake.path, served, run_id=None, epoch=None)
    first = publish_epoch(cfg, run_id=None, epoch=None, mode="production")
    again = publish_epoch(cfg, run_id=None, epoch=None, mode="production")
    assert (first.published, again.published, again.already) == (2, 0, 2), (first.summary(), again.summary())
    experiment = mlflow.get_experiment_by_name(cfg.tracking.experiment or cfg.name).experiment_id
    found = mlflow.search_traces(locations=[experiment], return_type="list")
    assert sorted(t.info.tags["arclight.rollout_id"] for t in found) == sorted(r.trace_id for r in served)
    assert {t.info.tags["arclight.run_id"] for t in found} == {"(production)"}


def test_sample_keeps_failed_rollouts_and_each_groups_best_and_worst_up_to_the_cap():
    def rollout(name: str, group: str, reward: float | None, status: str = "succeeded") -> RolloutTrace:
        return RolloutTrace(run_id="r", epoch=0, row={"rollout_id": name, "group_id": group, "reward": reward,
                                                      "status": status})

    rollouts = [rollout("a0", "a", 0.0), rollout("a1", "a", 1.0), rollout("a2", "a", 0.5), rollout("b0", "b", 0.2),
                rollout("b1", "b", None, "failed"), rollout("c0", "c", 1.0), rollout("c1", "c", 1.0)]
    picked = publishing.choose(rollouts, mode="sample", cap=100)
    assert [t.rollout_id for t in picked] == ["a0", "a1", "b0", "b1", "c0", "c1"]
    assert [t.rollout_id for t in publishing.choose(rollouts, mode="sample", cap=2)] == ["a1", "b1"]
    assert publishing.choose(rollouts, mode="off", cap=100) == [] and len(publishing.choose(rollouts, mode="all", cap=1)) == 7
