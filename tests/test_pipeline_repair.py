"""Stage 1-2 (sql/repair.sql, sql/agents.sql) on synthetic span trees written to a real lake."""

from __future__ import annotations

from tests.conftest import make_config
from tests.spans_factory import Rollout, rows, shared_stages, write

MISSING = "dead00000000beef"


def _tree(con):
    return {r["span_id"]: r for r in rows(con, "SELECT * FROM span_agents")}


def test_missing_parent_is_reparented_to_the_enclosing_agent_and_the_original_is_kept(tmp_path):
    cfg = make_config(tmp_path)
    r = Rollout("ro1", task_id="t")
    root = r.span("rollout", 0, 100)
    planner = r.agent("planner", 10, 60, parent=root)
    call = r.call(20, 30, parent=MISSING)
    write(cfg.lake.path, [r])
    tree = _tree(shared_stages(cfg))
    assert tree[call]["parent_span_id"] == planner
    assert tree[call]["original_parent_id"] == MISSING
    assert tree[call]["repair_reason"] == "missing_parent"
    assert tree[call]["agent_name"] == "planner"
    assert tree[planner]["repair_reason"] is None and tree[planner]["parent_span_id"] == root


def test_multi_level_orphan_chain_is_repaired_at_every_depth(tmp_path):
    cfg = make_config(tmp_path)
    r = Rollout("ro1")
    root = r.span("rollout", 0, 100)
    agent = r.agent("executor", 10, 90, parent="0000000000000a01")
    tool = r.tool("search", 20, 80, parent="0000000000000a02")
    inner = r.span("inner", 25, 75, parent="0000000000000a03")
    call = r.call(30, 40, parent="0000000000000a04")
    write(cfg.lake.path, [r])
    tree = _tree(shared_stages(cfg))
    assert [tree[s]["parent_span_id"] for s in (agent, tool, inner, call)] == [root, agent, tool, inner]
    assert {tree[s]["repair_reason"] for s in (agent, tool, inner, call)} == {"missing_parent"}
    assert tree[call]["agent_name"] == "executor" and tree[call]["depth"] == 4


def test_extra_http_server_root_does_not_disable_repair(tmp_path):
    cfg = make_config(tmp_path)
    r = Rollout("ro1")
    http = r.span("POST /run", 0, 200, trace_id="f" * 32)  # auto-instrumented server span, own trace
    rollout = r.span("rollout", 5, 195)
    planner = r.agent("planner", 10, 100, parent=rollout)
    call = r.call(20, 30, parent=MISSING)
    write(cfg.lake.path, [r])
    tree = _tree(shared_stages(cfg))
    assert tree[call]["parent_span_id"] == planner and tree[call]["agent_name"] == "planner"
    assert tree[rollout]["parent_span_id"] == http and tree[rollout]["repair_reason"] == "enclosed_root"
    assert tree[http]["parent_span_id"] is None


def test_clock_skew_never_puts_a_span_under_its_own_descendant(tmp_path):
    cfg = make_config(tmp_path)
    r = Rollout("ro1")
    root = r.span("rollout", 0, 300)
    agent = r.agent("planner", 100, 200, parent=MISSING)
    # the gateway's clock runs early: its span seems to enclose its own agent
    skewed = r.call(90, 210, parent=agent)
    # and two spans that name each other as parent (a corrupt cycle)
    a_id, b_id = "00000000000c0001", "00000000000c0002"
    r.span("a", 150, 160, parent=b_id, span_id=a_id)
    r.span("b", 150, 160, parent=a_id, span_id=b_id)
    write(cfg.lake.path, [r])
    con = shared_stages(cfg)
    tree = _tree(con)
    assert tree[agent]["parent_span_id"] == root  # not the skewed child that encloses it
    # the skewed span keeps the parent it named, and with it its agent
    assert tree[skewed]["parent_span_id"] == agent and tree[skewed]["repair_reason"] is None
    assert tree[skewed]["agent_name"] == "planner"
    assert {tree[a_id]["repair_reason"], tree[b_id]["repair_reason"]} == {"parent_cycle"}
    assert {tree[a_id]["parent_span_id"], tree[b_id]["parent_span_id"]} <= {agent, a_id, b_id}
    # no span is lost: every span is reachable from a root of the repaired tree
    assert con.execute("SELECT count(*) FROM span_agents").fetchone()[0] == 5
    assert tree[a_id]["agent_name"] == "planner" and tree[b_id]["agent_name"] == "planner"


def test_sibling_agents_with_identical_time_ranges_keep_their_own_children(tmp_path):
    cfg = make_config(tmp_path)
    r = Rollout("ro1")
    root = r.span("rollout", 0, 100)
    planner = r.agent("planner", 10, 50, parent=root)
    executor = r.agent("executor", 10, 50, parent=root)
    c_planner = r.call(20, 30, parent=planner)
    c_executor = r.call(20, 30, parent=executor)
    orphan = r.call(35, 40, parent=MISSING)
    write(cfg.lake.path, [r])
    tree = _tree(shared_stages(cfg))
    assert tree[c_planner]["agent_name"] == "planner" and tree[c_planner]["repair_reason"] is None
    assert tree[c_executor]["agent_name"] == "executor" and tree[c_executor]["repair_reason"] is None
    assert tree[orphan]["parent_span_id"] in (planner, executor)
    assert tree[planner]["parent_span_id"] == root and tree[executor]["parent_span_id"] == root


def test_duplicate_rows_of_a_span_count_once(tmp_path):
    cfg = make_config(tmp_path)
    r = Rollout("ro1")
    root = r.span("rollout", 0, 100)
    r.call(10, 20, parent=root, span_id="00000000000d0001", received_ns=1)
    r.call(10, 20, parent=root, span_id="00000000000d0001", received_ns=2)
    write(cfg.lake.path, [r])
    write(cfg.lake.path, [r])  # an OTLP retry stored the whole batch again
    con = shared_stages(cfg)
    assert con.execute("SELECT count(*) FROM repaired_spans").fetchone()[0] == 2
    assert con.execute("SELECT count(*) FROM llm_calls").fetchone()[0] == 1


def test_llm_span_hung_on_the_root_is_moved_into_the_agent_that_encloses_it(tmp_path):
    cfg = make_config(tmp_path)
    r = Rollout("ro1")
    graph = r.span("LangGraph", 0, 100)
    node = r.span("executor", 10, 60, parent=graph, attrs={"metadata": '{"langgraph_node": "executor"}'})
    call = r.span("openai.chat", 20, 30, parent=graph, attrs={"gen_ai.operation.name": "chat"})
    write(cfg.lake.path, [r])
    tree = _tree(shared_stages(cfg))
    assert tree[call]["parent_span_id"] == node and tree[call]["repair_reason"] == "agent_skipped"
    assert tree[call]["agent_name"] == "executor"


def test_only_the_last_attempt_of_a_rollout_is_used(tmp_path):
    cfg = make_config(tmp_path)
    first, second = Rollout("ro1", attempt=0), Rollout("ro1", attempt=1)
    first.call(1, 2, parent=first.span("rollout", 0, 10))
    second.call(21, 22, parent=second.span("rollout", 20, 30))
    write(cfg.lake.path, [first, second])
    con = shared_stages(cfg)
    assert rows(con, "SELECT attempt, start_ns FROM llm_calls") == [{"attempt": 1, "start_ns": 21000}]


def test_spans_without_an_attempt_number_join_the_last_attempt_they_fall_in(tmp_path):
    # the gateway's span of a call carries no attempt when the rollout was registered without one
    cfg = make_config(tmp_path)
    first, second = Rollout("ro1", attempt=0), Rollout("ro1", attempt=1)
    first.call(1, 2, parent=first.span("rollout", 0, 10))
    gateway = Rollout("ro1", attempt=None)
    gateway.call(3, 4, prompt=(9,), response_id="old")
    second.span("openai.chat", 21, 24, parent=second.agent("solver", 20, 30),
                        attrs={"gen_ai.operation.name": "chat", "gen_ai.response.id": "new"})
    gateway.call(22, 23, prompt=(7, 8), response_id="new")
    write(cfg.lake.path, [first, second, gateway])
    calls = rows(shared_stages(cfg), "SELECT response_id, prompt_token_ids, agent_name, span_count FROM llm_calls")
    assert calls == [{"response_id": "new", "prompt_token_ids": [7, 8], "agent_name": "solver", "span_count": 2}]


def test_an_existing_parent_that_does_not_enclose_its_child_is_kept(tmp_path):
    # fails before: the gateway's span, a few ms off, moved to the root and lost its agent
    cfg = make_config(tmp_path)
    r = Rollout("ro1")
    root = r.span("rollout", 0, 100)
    agent = r.agent("solver", 10, 50, parent=root)
    call = r.call(45, 55, parent=agent)  # another process's clock: ends after its agent
    write(cfg.lake.path, [r])
    tree = _tree(shared_stages(cfg))
    assert (tree[call]["parent_span_id"], tree[call]["repair_reason"], tree[call]["agent_name"]) == (agent, None, "solver")


def test_kept_skewed_parents_and_moved_roots_never_form_a_cycle(tmp_path):
    # two trees whose roots each enclose part of the other, through parents that do not enclose
    # their children: moving each root to its tightest enclosing span would close a cycle
    cfg = make_config(tmp_path)
    r = Rollout("ro1")
    outer = r.span("rollout", 0, 300)
    d1 = r.agent("first", 100, 200, parent="0000000000000d01")
    d2 = r.agent("second", 95, 205, parent="0000000000000d02")
    c1 = r.span("c1", 90, 210, parent=d2)  # skewed: encloses its own parent
    c2 = r.span("c2", 94, 206, parent=d1)
    write(cfg.lake.path, [r])
    con = shared_stages(cfg)
    tree = _tree(con)
    assert len(tree) == 5  # every span reached from a root: no cycle swallowed any
    assert tree[c1]["parent_span_id"] == d2 and tree[c2]["parent_span_id"] == d1  # kept as sent
    assert tree[d2]["parent_span_id"] == outer  # not c2, under d1, which would point back through c1
    assert tree[d1]["parent_span_id"] in (d2, outer) and tree[d1]["repair_reason"] == "missing_parent"


def test_repair_off_keeps_every_parent_as_sent(tmp_path):
    cfg = make_config(tmp_path, "pipeline.repair=false")
    r = Rollout("ro1")
    graph = r.span("LangGraph", 0, 100)
    node = r.span("executor", 10, 60, parent=graph, attrs={"metadata": '{"langgraph_node": "executor"}'})
    hung = r.span("openai.chat", 20, 30, parent=graph, attrs={"gen_ai.operation.name": "chat"})
    orphan = r.call(40, 50, parent=MISSING)
    a_id, b_id = "00000000000c0001", "00000000000c0002"
    r.span("a", 70, 80, parent=b_id, span_id=a_id)
    r.span("b", 70, 80, parent=a_id, span_id=b_id)
    write(cfg.lake.path, [r])
    tree = _tree(shared_stages(cfg))
    assert len(tree) == 6
    assert (tree[hung]["parent_span_id"], tree[hung]["agent_name"], tree[hung]["repair_reason"]) == (graph, None, None)
    assert (tree[orphan]["parent_span_id"], tree[orphan]["repair_reason"]) == (None, "missing_parent_not_repaired")
    assert tree[a_id]["parent_span_id"] is None and tree[a_id]["repair_reason"] == "parent_cycle_not_repaired"
    assert tree[node]["parent_span_id"] == graph
