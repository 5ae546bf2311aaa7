"""Agent names from every convention (docs/span-conventions.md, "Agent names"), on span trees shaped
like the ones AutoGen and CrewAI write natively, with OpenInference and with OpenLLMetry.

tests/test_framework_agents.py runs the real frameworks; these pin the rules one at a time.
"""

from __future__ import annotations

import pytest

from lightning_core.pipeline.triplets import materialize_triplets
from lightning_core.store.catalog import Catalog
from lightning_core.store.outputs import load_triplets
from tests.conftest import make_config
from tests.spans_factory import Rollout, write

OI_AGENT = {"openinference.span.kind": "AGENT"}


def _owners(cfg, pattern: str | None = None) -> list[str]:
    materialize_triplets(cfg, run_id="r1", epoch=0, agent_match=pattern)
    return load_triplets(cfg, run_id="r1", epoch=0, policy="default")["agent_name"].to_pylist()


def test_openinference_agent_spans_are_named_by_graph_node_id_not_their_method(tmp_path):
    # CrewAI + OpenInference: the AGENT span is called '<role>._execute_core', its graph.node.id is the role
    cfg = make_config(tmp_path)
    r = Rollout("ro1", task_id="t1")
    root = r.span("rollout", 0, 1000)
    crew = r.span("Crew.kickoff", 1, 900, parent=root, attrs={"openinference.span.kind": "CHAIN"})
    for i, role in enumerate(["Question planner", "Arithmetic solver"]):
        agent = r.span(f"{role}._execute_core", 10 + i * 100, 90 + i * 100, parent=crew,
                       attrs={**OI_AGENT, "graph.node.id": role})
        r.call(20 + i * 100, 30 + i * 100, parent=agent, prompt=(i,))
    r.reward(1.0, 950, parent=root)
    write(cfg.lake.path, [r])
    assert _owners(cfg) == ["Question planner", "Arithmetic solver"]
    assert _owners(cfg, "^Arithmetic solver$") == ["Arithmetic solver"]


def test_a_method_named_agent_span_inside_the_agent_it_names_is_that_agent(tmp_path):
    # AutoGen + OpenInference: AutoGen's own 'invoke_agent solver' (gen_ai.agent.name) encloses OpenInference's
    # 'solver.on_messages_stream'; without graph.node.id the nearer span's name would have won
    cfg = make_config(tmp_path)
    r = Rollout("ro1", task_id="t1")
    root = r.span("rollout", 0, 1000)
    for i, name in enumerate(["solver", "reviewer"]):
        invoke = r.span(f"invoke_agent {name}", 10 + i * 100, 90 + i * 100, parent=root,
                        attrs={"gen_ai.operation.name": "invoke_agent", "gen_ai.agent.name": name})
        stream = r.span(f"{name}.on_messages_stream", 11 + i * 100, 89 + i * 100, parent=invoke, attrs=OI_AGENT)
        r.call(20 + i * 100, 30 + i * 100, parent=stream, prompt=(i,))
    # a method-named agent span inside a different agent is its own agent
    other = r.span("critic.on_messages_stream", 300, 390, parent=r.rows[1]["span_id"], attrs=OI_AGENT)
    r.call(310, 320, parent=other, prompt=(9,))
    r.reward(1.0, 950, parent=root)
    write(cfg.lake.path, [r])
    assert _owners(cfg) == ["solver", "reviewer", "critic.on_messages_stream"]
    assert _owners(cfg, "^solver$") == ["solver"]


def test_autogen_agent_types_lose_the_team_id_so_names_hold_across_rollouts(tmp_path):
    # the selector's speaker-selection call runs in 'SelectorGroupChatManager_<team uuid>', a new uuid every run
    cfg = make_config(tmp_path)
    rollouts = []
    for k, team in enumerate(["0ca54ca8-3c1e-4b8e-9a57-1f0e2d3c4b5a", "f3b1c2d4e5f60718293a4b5c6d7e8f90"]):
        r = Rollout(f"ro{k}", task_id="t1")
        root = r.span("rollout", 0, 1000)
        for i, agent in enumerate(["SelectorGroupChatManager", "solver"]):
            process = r.span(f"autogen process {agent}_{team}", 10 + i * 100, 90 + i * 100, parent=root,
                             attrs={"recipient_agent_type": f"{agent}_{team}", "messaging.operation": "process"})
            r.call(20 + i * 100, 30 + i * 100, parent=process, prompt=(k, i))
        r.reward(1.0, 950, parent=root)
        rollouts.append(r)
    write(cfg.lake.path, rollouts)
    assert _owners(cfg) == ["SelectorGroupChatManager", "solver"] * 2
    assert _owners(cfg, "^SelectorGroupChatManager$") == ["SelectorGroupChatManager"] * 2


@pytest.mark.parametrize("attrs, name", [
    ({"gen_ai.agent.name": "solver"}, "solver"),
    ({**OI_AGENT, "graph.node.id": "Arithmetic solver"}, "Arithmetic solver"),
    ({"graph.node.id": "not an agent span"}, None),
    ({"agent.name": "sdk", "gen_ai.agent.name": "other"}, "sdk"),
])
def test_the_spans_view_fills_agent_name_from_each_convention(tmp_path, attrs, name):
    cfg = make_config(tmp_path)
    r = Rollout("ro1", task_id="t1")
    r.span("some agent span", 0, 10, attrs=attrs)
    write(cfg.lake.path, [r])
    with Catalog.from_config(cfg).read() as con:
        assert con.execute("SELECT agent_name FROM spans WHERE name = 'some agent span'").fetchall() == [(name,)]
