"""Span trees exactly as Agent Lightning v0.x writes them give the same calls, agents and rewards as
the same trees written in Arclight's own conventions.

Agent Lightning's tracer (AgentOps, its OpenAI wrapper patched by agentlightning.instrumentation)
names each model call ``openai.chat.completion`` and records ``gen_ai.response.id``, the flattened
``gen_ai.prompt.N.*`` / ``gen_ai.completion.N.*`` messages, ``prompt_token_ids`` /
``response_token_ids`` int arrays and ``logprobs.content`` JSON. Rewards come as AgentOps'
operation output ``{"type": "reward", "value": v}``, as ``agentlightning.reward.0.value`` on an
``agentlightning.annotation`` span (v0.3 ``emit_reward``), or as that span's ``reward`` attribute
(v0.2). A reward function is an ``agentlightning.operation`` span whose
``agentlightning.operation.name`` is ``agentlightning.reward`` (``@operation(name=AGL_REWARD)``);
an LLM judge inside it is not trained on. The spans go through the OpenTelemetry SDK, the OTLP
encoder and the collector's row conversion, as a real export would.
"""

from __future__ import annotations

import json

import pytest

from lightning_core.pipeline.triplets import materialize_triplets
from lightning_core.store.outputs import load_triplets
from tests.conftest import make_config
from tests.otlp_trees import Tree
from tests.spans_factory import rows, shared_stages

CALLS = {  # response id -> (prompt ids, response ids, logprobs, prompt, answer)
    "chatcmpl-1": ([1, 2, 3], [4, 5], [-0.5, -0.25], "2 + 2?", "4"),
    "chatcmpl-2": ([6, 7], [8], [-1.0], "and 3 + 3?", "6"),
    "chatcmpl-3": ([9], [10, 11], [-0.125, -2.0], "plan it", "ok"),
    "chatcmpl-judge": ([12], [13], [-0.75], "is 4 right?", "1.0"),
}


def llm_attributes(style: str, response_id: str) -> dict:
    """A model call's span attributes as Agent Lightning's tracer or Arclight's gateway writes them."""
    prompt_ids, response_ids, logprobs, prompt, answer = CALLS[response_id]
    if style == "agentlightning":
        return {"gen_ai.system": "OpenAI", "gen_ai.request.model": "tiny", "gen_ai.response.model": "tiny",
                "gen_ai.response.id": response_id, "gen_ai.prompt.0.role": "user", "gen_ai.prompt.0.content": prompt,
                "gen_ai.completion.0.role": "assistant", "gen_ai.completion.0.content": answer,
                "prompt_token_ids": prompt_ids, "response_token_ids": response_ids,
                "logprobs.content": json.dumps([{"token": f"t{i}", "logprob": lp, "bytes": [], "top_logprobs": []}
                                                for i, lp in enumerate(logprobs)])}
    return {"arclight.span.kind": "llm", "gen_ai.operation.name": "chat", "gen_ai.response.model": "tiny",
            "gen_ai.response.id": response_id, "arclight.llm.request_messages": json.dumps([{"role": "user", "content": prompt}]),
            "arclight.llm.response_text": answer, "arclight.llm.prompt_token_ids": prompt_ids,
            "arclight.llm.response_token_ids": response_ids, "arclight.llm.response_logprobs": logprobs}


def reward_span(tree: Tree, style: str, value: float, at: int, parent) -> None:
    """A reward in one of Agent Lightning's forms, or Arclight's emit_reward span."""
    if style == "agentops.task.output":  # the deprecated @reward decorator through AgentOps' @operation
        tree.span("compute_reward.task", at, at + 1, parent=parent, attrs={
            "agentops.span.kind": "task", "agentops.task.output": json.dumps({"type": "reward", "value": value})})
    elif style == "agentops.entity.output":  # older AgentOps
        tree.span("compute_reward.task", at, at + 1, parent=parent, attrs={
            "agentops.span.kind": "task", "agentops.entity.output": json.dumps({"type": "reward", "value": value})})
    elif style == "agentlightning.reward.0.value":  # v0.3 emit_reward: an annotation span
        tree.span("agentlightning.annotation", at, at, parent=parent, attrs={
            "agentlightning.reward.0.name": "primary", "agentlightning.reward.0.value": value})
    elif style == "reward":  # v0.2 emit_reward
        tree.span("agentlightning.annotation", at, at, parent=parent, attrs={"reward": value})
    else:
        tree.span("reward primary", at, at, parent=parent, attrs={
            "arclight.span.kind": "reward", "arclight.reward.name": "primary", "arclight.reward.value": value})


def agent_run(style: str, reward_style: str, *, rollout_id: str) -> Tree:
    """Two agents, three calls and a reward, then a reward function whose judge scores the run."""
    agl = style == "agentlightning"
    resource = {"arclight.run_id": "r1", "arclight.epoch": 0, "arclight.task_id": "t1"}
    resource["agentlightning.rollout_id" if agl else "arclight.rollout_id"] = rollout_id
    tree = Tree(resource)
    llm_name = "openai.chat.completion" if agl else "chat tiny"
    root = tree.span("run_one.session" if agl else "rollout", 0, 1000)
    # the OpenAI Agents SDK's agent.name, and AgentOps' @agent (agentops.span.kind + operation.name)
    math = tree.span("MathAgent", 10, 500, parent=root, attrs={"agent.name": "MathAgent"} if agl else {
        "arclight.span.kind": "agent", "agent.name": "MathAgent"})
    tree.span(llm_name, 20, 60, parent=math, attrs=llm_attributes(style, "chatcmpl-1"))
    reward_span(tree, reward_style if agl else "arclight", 0.25, 70, math)
    tree.span(llm_name, 100, 150, parent=math, attrs=llm_attributes(style, "chatcmpl-2"))
    planner = tree.span("Planner.agent", 510, 800, parent=root, attrs={
        "agentops.span.kind": "agent", "operation.name": "Planner"} if agl else {
        "arclight.span.kind": "agent", "agent.name": "Planner"})
    tree.span(llm_name, 520, 560, parent=planner, attrs=llm_attributes(style, "chatcmpl-3"))
    scope = tree.span("agentlightning.operation" if agl else "reward function judge", 810, 990, parent=root, attrs={
        "agentlightning.operation.name": "agentlightning.reward"} if agl else {"arclight.span.kind": "reward"})
    checker = tree.span("Checker", 815, 900, parent=scope, attrs={"agent.name": "Checker"} if agl else {
        "arclight.span.kind": "agent", "agent.name": "Checker"})
    tree.span(llm_name, 820, 880, parent=checker, attrs=llm_attributes(style, "chatcmpl-judge"))
    reward_span(tree, reward_style if agl else "arclight", 1.0, 950, scope)
    return tree


CALL_COLUMNS = ("response_id", "agent_name", "in_reward", "prompt_token_ids", "response_token_ids",
                "response_logprobs", "response_text", "flags")


def outcome(cfg) -> dict:
    """What the pipeline made of the run: calls, rewards, per-rollout summary and triplets under two policies."""
    con = shared_stages(cfg)
    calls = rows(con, f"SELECT {', '.join(CALL_COLUMNS)}, prompt_messages FROM llm_calls ORDER BY start_ns")
    for c in calls:  # the same messages, whichever attributes carried them
        c["prompt_messages"] = [{"role": m["role"], "content": m["content"]} for m in json.loads(c["prompt_messages"])]
    rewards = rows(con, "SELECT kind, value, agent_name, start_ns FROM rewards ORDER BY start_ns")
    summary = rows(con, "SELECT rollout_id, reward, rewards, missing_rewards, calls, judge_calls, agents, flags FROM rollout_summary")
    triplets = {}
    for policy in ("first_occurrence", "latest_unrewarded_call"):
        cfg.pipeline.reward_policy = policy
        materialize_triplets(cfg, run_id="r1", epoch=0)
        triplets[policy] = [(t["response_id"], t["agent_name"], t["reward"], t["prompt_token_ids"], t["response_logprobs"])
                            for t in load_triplets(cfg, run_id="r1", epoch=0, policy="default").to_pylist()]
    return {"calls": calls, "rewards": rewards, "summary": summary, "triplets": triplets}


@pytest.mark.parametrize("reward_style", ["agentops.task.output", "agentops.entity.output",
                                          "agentlightning.reward.0.value", "reward"])
def test_agent_lightning_trees_give_the_same_calls_agents_and_rewards_as_arclight_trees(tmp_path, reward_style):
    # fails before: 0 calls, 0 rewards and no warning from the Agent Lightning trees
    results = {}
    for style in ("agentlightning", "arclight"):
        cfg = make_config(tmp_path / style)
        agent_run(style, reward_style, rollout_id="ro1").write(cfg.lake.path)
        results[style] = outcome(cfg)
    assert results["agentlightning"] == results["arclight"]
    result = results["arclight"]
    assert [(c["response_id"], c["agent_name"], c["in_reward"], c["prompt_token_ids"]) for c in result["calls"]] == [
        ("chatcmpl-1", "MathAgent", False, [1, 2, 3]), ("chatcmpl-2", "MathAgent", False, [6, 7]),
        ("chatcmpl-3", "Planner", False, [9]), ("chatcmpl-judge", "Checker", True, [12])]
    assert [(r["value"], r["agent_name"]) for r in result["rewards"]] == [(0.25, "MathAgent"), (1.0, None)]
    assert result["summary"] == [{"rollout_id": "ro1", "reward": 1.0, "rewards": 2, "missing_rewards": 0, "calls": 3,
                                  "judge_calls": 1, "agents": ["Checker", "MathAgent", "Planner"], "flags": []}]
    assert result["triplets"]["first_occurrence"] == [
        ("chatcmpl-1", "MathAgent", 0.25, [1, 2, 3], [-0.5, -0.25]), ("chatcmpl-2", "MathAgent", 1.0, [6, 7], [-1.0]),
        ("chatcmpl-3", "Planner", 1.0, [9], [-0.125, -2.0])]
    # Agent Lightning's own matching: the 1.0 goes to the latest call before it, and to it alone
    assert [t[2] for t in result["triplets"]["latest_unrewarded_call"]] == [0.25, None, 1.0]


def test_agent_lightning_rollout_id_names_the_rollout(tmp_path):
    cfg = make_config(tmp_path)
    agent_run("agentlightning", "agentlightning.reward.0.value", rollout_id="ro-agl").write(cfg.lake.path)
    con = shared_stages(cfg)
    assert rows(con, "SELECT DISTINCT rollout_id FROM span_nodes") == [{"rollout_id": "ro-agl"}]


def test_agent_lightning_default_llm_call_match_reads_its_spans_without_token_ids(tmp_path):
    # a call recorded before vLLM returned token ids: the name alone marks it, as in Agent Lightning
    cfg = make_config(tmp_path, r"pipeline.llm_call_match=openai\.chat\.completion")
    tree = Tree({"arclight.run_id": "r1", "arclight.rollout_id": "ro1"})
    agent = tree.span("MathAgent", 0, 100, parent=tree.span("run_one.session", 0, 100), attrs={"agent.name": "MathAgent"})
    tree.span("openai.chat.completion", 10, 20, parent=agent, attrs={"gen_ai.response.id": "chatcmpl-9"})
    tree.write(cfg.lake.path)
    calls = rows(shared_stages(cfg), "SELECT response_id, agent_name, flags FROM llm_calls")
    assert calls == [{"response_id": "chatcmpl-9", "agent_name": "MathAgent", "flags": ["missing_token_ids", "missing_logprobs"]}]
