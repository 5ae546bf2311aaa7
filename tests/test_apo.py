"""Prompt optimisation (APO) and prompts as versioned resources: unit checks, then the flow end to end
on the tiny model with the real collector, gateway, vLLM, Prefect and MLflow."""

from __future__ import annotations

import json
import time

import mlflow
import pytest
from typer.testing import CliRunner

from lightning_core.apo import critic, prompts
from lightning_core.apo import search as apo
from lightning_core.store.catalog import Catalog
from lightning_core.config import ConfigError
from lightning_core.rollouts.runner import AgentContext
from tests.conftest import REPO, make_config
from tests.test_flows import _dataset, _overrides

NEEDS = ["alpha", "beta", "gamma", "delta"]


def test_clean_prompt_strips_what_critics_wrap_around_a_prompt():
    assert apo.clean_prompt("```\nNew prompt: Be exact.\n```", max_chars=100) == "Be exact."
    assert apo.clean_prompt('"Use CALC first."', max_chars=100) == "Use CALC first."
    assert apo.clean_prompt("<<<\nAnswer with a number.\n>>>", max_chars=100) == "Answer with a number."
    assert apo.clean_prompt("x" * 50, max_chars=10) == "x" * 10
    assert apo.usable("", "p") == "empty"
    assert apo.usable("Answer briefly.", "Answer briefly.") == "same as its parent"
    assert apo.usable("ok", "Answer briefly.").startswith("too short")
    assert apo.usable("Answer briefly and exactly.", "Answer briefly.") is None


def test_prompts_must_be_named_texts_and_the_search_needs_one(tmp_path):
    with pytest.raises(ConfigError, match="resources.prompts.system must be a non-empty text"):
        make_config(tmp_path, 'rollouts.resources={"prompts": {"system": ""}}')
    with pytest.raises(ConfigError, match="prompt name"):
        make_config(tmp_path, 'rollouts.resources={"prompts": {"../x": "hi"}}')
    with pytest.raises(apo.ApoError, match="rollouts.resources.prompts.<name>"):
        apo.target_prompts(make_config(tmp_path))
    two = make_config(tmp_path, 'rollouts.resources={"prompts": {"a": "one", "b": "two"}}')
    with pytest.raises(apo.ApoError, match=r"prompt_optimization.prompt 'c' is not under rollouts.resources.prompts \(it has: a, b\)"):
        apo.target_prompts(make_config(tmp_path, 'rollouts.resources={"prompts": {"a": "one", "b": "two"}}',
                                       "prompt_optimization.prompt=c"))
    assert apo.target_prompts(make_config(tmp_path, 'rollouts.resources={"prompts": {"a": "one"}}')) == ["a"]
    assert apo.run_id(two) == "default.apo"


def test_ctx_prompt_reads_the_resource_formats_it_and_names_the_key_when_missing():
    ctx = AgentContext("r", 0, "r-e0-t-0", "t", 0, "http://x", "m", "k", resources={"prompts": {"system": "Solve {topic}."}})
    assert ctx.prompt("system", topic="sums") == "Solve {topic}.".format(topic="sums")
    assert ctx.prompt("other", default="fallback") == "fallback"
    with pytest.raises(KeyError, match="rollouts.resources.prompts.other"):
        ctx.prompt("other")


def test_a_config_edit_becomes_a_new_serving_version_but_an_unchanged_config_keeps_a_promoted_one(tmp_path):
    cfg = make_config(tmp_path, 'rollouts.resources={"prompts": {"system": "Be brief."}}')
    catalog = Catalog.from_config(cfg)
    catalog.ensure()
    first = prompts.register_config_prompts(catalog, cfg)["system"]
    assert (first.version, first.made_by, first.serving) == ("system-v1", "config", True)
    better, new = prompts.add_candidate(catalog, name="system", text="Be brief and exact.", parent=first.version,
                                        made_by="critic", critique="say exact", run_id="default.apo", round=1)
    assert new and better.version == "system-v2" and not better.serving
    assert prompts.add_candidate(catalog, name="system", text="Be brief and exact.", parent=first.version, made_by="critic",
                                 critique=None, run_id="default.apo", round=2) == (better, False)
    prompts.promote(catalog, better.version)
    assert prompts.resolve(catalog, cfg)["system"].version == "system-v2"  # same config: the promoted one serves
    assert prompts.resolve(catalog, cfg, ["system-v1"])["system"].version == "system-v1"  # evaluate --prompt
    edited = make_config(tmp_path, 'rollouts.resources={"prompts": {"system": "Be very brief."}}')
    now = prompts.resolve(catalog, edited)["system"]
    assert (now.version, now.parent_version, now.made_by) == ("system-v3", "system-v2", "config")
    with pytest.raises(prompts.PromptError, match="not in the catalog"):
        prompts.resolve(catalog, edited, ["system-v9"])


def test_evaluate_refuses_an_unknown_prompt_version_in_one_line(tmp_path):
    from lightning_core.cli.main import app

    config = tmp_path / "c.yaml"
    config.write_text("rollouts:\n  resources:\n    prompts:\n      system: Be brief.\n")
    (tmp_path / ".arclight" / "lake").mkdir(parents=True)
    result = CliRunner().invoke(app, ["evaluate", str(config), "--prompt", "system-v7"])
    assert result.exit_code == 2
    assert "prompt version 'system-v7' is not in the catalog" in result.output and "Traceback" not in result.output


def _tasks(prefix: str, n: int) -> list[dict]:
    return [{"id": f"{prefix}{i}", "question": f"Say {i}.", "needs": [NEEDS[i % 4], NEEDS[(i + 1) % 4]]} for i in range(n)]


def _apo_overrides(tmp_path, fixtures, **extra) -> list[str]:
    return _overrides(
        tmp_path, **fixtures, dataset=_dataset(tmp_path / "train.jsonl", _tasks("t", 8)),
        **{"rollouts.agent": "tests.helpers.prompt_agent:run",
           "rollouts.eval_dataset": _dataset(tmp_path / "test.jsonl", _tasks("h", 4)),
           "rollouts.resources": json.dumps({"prompts": {"instructions": "Answer briefly."}}),
           "rollouts.group_size": "2", "rollouts.tasks_per_epoch": "2", "prompt_optimization.tasks_per_eval": "4",
           "prompt_optimization.critic.kind": "scripted",
           "prompt_optimization.critic.function": "tests.helpers.prompt_critic:critic", **extra})


def _one_model_critic_call(tmp_path, fixtures, run_name: str, **extra) -> list[str]:
    """A GEPA search of one iteration whose model critic is asked once (GEPA's reflection prompt), no held-out
    evaluation: the start on the 2 validation tasks, then on a minibatch of 2, which leaves the budget of 3 spent."""
    return _apo_overrides(tmp_path, fixtures, **{
        "run_name": run_name, "prompt_optimization.critic.kind": "model", "prompt_optimization.max_metric_calls": "3",
        "prompt_optimization.minibatch_size": "2", "prompt_optimization.tasks_per_eval": "2",
        "prompt_optimization.critic.max_tokens": "12", "prompt_optimization.held_out": "false", **extra})


def _poll(catalog, sql: str, *, rows: int, timeout_s: float = 20.0) -> list[tuple]:
    """Query until ``rows`` rows are there (spans reach the lake shortly after the flow returns) or time runs out."""
    deadline, found = time.monotonic() + timeout_s, []
    while time.monotonic() < deadline and len(found) < rows:
        with catalog.read() as con:
            found = con.execute(sql).fetchall()
        time.sleep(0.5)
    return found


@pytest.mark.integration
def test_the_model_critic_calls_are_traced_under_the_search_run_and_never_reach_training(
    prefect_harness, tmp_path, vllm_server, collector, collector_config, tiny_model_dir
):
    from flows.optimize_prompt import optimize_prompt

    fixtures = dict(vllm_server=vllm_server, collector=collector, collector_config=collector_config, tiny_model_dir=tiny_model_dir)
    overrides = _one_model_critic_call(tmp_path, fixtures, "apomodel")
    summary = optimize_prompt(overrides=overrides)
    assert summary["critic_calls"] == 1  # GEPA's reflection prompt, once
    catalog = Catalog.from_config(make_config(tmp_path, *overrides))
    made = [v for v in prompts.versions(catalog, "instructions") if v.made_by == "critic"]
    assert summary["rounds"][-1]["proposals"] == 1 and len(made) + len(summary["rounds"][-1]["rejected"]) == 1
    assert all(v.parent_version == "instructions-v1" and v.run_id == "apomodel.apo" for v in made)
    calls = _poll(catalog, "SELECT rollout_id, span_kind, name FROM spans WHERE run_id = 'apomodel.apo' "
                           "AND rollout_id LIKE '%-critic-%' AND span_kind = 'llm'", rows=1)
    assert len(calls) == 1 and calls[0][0].rsplit("-", 1)[1] == "reflect"
    with catalog.read() as con:
        roles = con.execute("SELECT DISTINCT json_extract_string(attributes, '$.\"arclight.apo.role\"') FROM spans "
                            "WHERE run_id = 'apomodel.apo' AND name LIKE 'apo %'").fetchall()
        planned = con.execute("SELECT count(*) FROM rollouts WHERE rollout_id LIKE '%-critic-%'").fetchall()[0][0]
    assert [r[0] for r in roles] == ["reflect"]
    assert planned == 0  # critic calls are not rollouts of any run, and the .apo run is never trained


def test_calc_rule_critic_reads_trajectories_and_adds_the_missing_instruction():
    import importlib.util

    spec = importlib.util.spec_from_file_location("prompt_rules", REPO / "examples/calc/prompt_rules.py")
    rules = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(rules)
    question = "Ann has 3 boxes of 5 pens. How many pens?"
    base = [{"role": "system", "content": "Answer."}, {"role": "user", "content": question}]
    prose = {"task": {"question": question, "answer": 15}, "reward": 0.0, "messages": base, "response": "There are many pens."}
    no_answer = {"task": {"question": question, "answer": 15}, "reward": 0.0,
                 "messages": base + [{"role": "assistant", "content": "CALC: 3 * 5"}, {"role": "user", "content": "RESULT: 15"}],
                 "response": "The pens are 15 in total"}
    out = rules.critic("Answer.", [prose, prose, no_answer], 2)
    assert [critique.split(":")[0] for critique, _ in out] == ["2 of 3 failures", "1 of 3 failures"]
    assert out[0][1] == "Answer. Your first reply must be exactly one line: 'CALC: <expression>'."
    assert "ANSWER: <value>" in out[1][1]
    assert rules.critic(out[0][1], [prose], 2) == []  # an instruction already in the prompt is not proposed again


@pytest.mark.integration
def test_a_hosted_critic_by_url_and_key_is_traced_from_the_flow(
    prefect_harness, tmp_path, vllm_server, collector, collector_config, tiny_model_dir, monkeypatch
):
    """critic.url: any OpenAI-compatible API (here the vLLM server itself, not through the gateway), key from the environment."""
    from flows.optimize_prompt import optimize_prompt

    monkeypatch.setenv("ARCLIGHT_TEST_CRITIC_KEY", "sk-test")
    fixtures = dict(vllm_server=vllm_server, collector=collector, collector_config=collector_config, tiny_model_dir=tiny_model_dir)
    overrides = _one_model_critic_call(tmp_path, fixtures, "apohosted", **{
        "prompt_optimization.critic.url": f"{vllm_server.url}/v1", "prompt_optimization.critic.model": "tiny",
        "prompt_optimization.critic.api_key_env": "ARCLIGHT_TEST_CRITIC_KEY"})
    summary = optimize_prompt(overrides=overrides)
    assert summary["critic_calls"] == 1
    catalog = Catalog.from_config(make_config(tmp_path, *overrides))
    spans = _poll(catalog, "SELECT json_extract_string(attributes, '$.\"arclight.apo.role\"'), gen_ai_operation, "
                           "json_extract_string(attributes, '$.\"arclight.llm.request_messages\"') IS NOT NULL, "
                           "json_extract_string(attributes, '$.\"arclight.llm.response_text\"') IS NOT NULL "
                           "FROM spans WHERE run_id = 'apohosted.apo' AND name LIKE 'apo %'", rows=1)
    assert spans == [("reflect", "chat", True, True)]


def test_a_hosted_critic_without_its_key_says_which_variable_to_set(tmp_path, monkeypatch):
    monkeypatch.delenv("NO_SUCH_KEY_FOR_ARCLIGHT", raising=False)
    cfg = make_config(tmp_path, 'rollouts.resources={"prompts": {"a": "one"}}', "prompt_optimization.critic.url=http://127.0.0.1:9/v1",
                      "prompt_optimization.critic.model=m", "prompt_optimization.critic.api_key_env=NO_SUCH_KEY_FOR_ARCLIGHT")
    with pytest.raises(apo.ApoError, match=r"\$NO_SUCH_KEY_FOR_ARCLIGHT is empty"):
        critic.make_critic(cfg, gateway_client=None, collector_url="http://127.0.0.1:9", collector_token=None)


def _trajectory(**extra) -> dict:
    system = {"role": "system", "content": "Answer briefly."}
    question = {"role": "user", "content": "Say 3."}
    first = {"agent": "planner", "messages": [{"role": "system", "content": "Plan."}, question], "response": "CALC: 3"}
    second = {"agent": "prompted", "messages": [system, question, {"role": "assistant", "content": "CALC: 3"},
                                                {"role": "tool", "content": "RESULT: 3"}], "response": "It is 3."}
    return {"rollout_id": "r-1", "task_id": "t3", "task": {"id": "t3", "question": "Say 3.", "answer": 3}, "reward": 0.5,
            "status": "finished", "error": None, "calls": [first, second, {"agent": "judge", "messages": [question],
                                                                          "response": "ok"}],
            "failed_tools": [{"tool": "calc", "error": "ZeroDivisionError: division by zero\nTraceback"}], **extra}


def test_gepa_reflective_records_carry_the_task_the_steered_call_its_answer_the_reward_and_failed_tools():
    from lightning_core.apo import gepa_adapter

    failure = gepa_adapter.as_failure(_trajectory(), "Answer briefly.")
    assert (failure["agent"], failure["response"]) == ("prompted", "It is 3.")  # the call whose messages hold the prompt
    assert gepa_adapter.as_failure(_trajectory(), "Never used.")["agent"] == "judge"  # else the last call
    rec = gepa_adapter.record(failure)
    assert rec["Inputs"] == {"task": '{"question": "Say 3.", "answer": 3}', "agent": "prompted",
                             "conversation": "user: Say 3.\nassistant: CALC: 3\ntool: RESULT: 3"}
    assert rec["Generated Outputs"] == "It is 3."
    assert rec["Feedback"] == "reward: 0.5 (finished); tool calc failed: ZeroDivisionError: division by zero"
    failed = gepa_adapter.record(gepa_adapter.as_failure(_trajectory(reward=None, status="failed", error="Timeout\nx",
                                                                     failed_tools=[], calls=[]), "Answer briefly."))
    assert failed == {"Inputs": {"task": '{"question": "Say 3.", "answer": 3}'}, "Generated Outputs": "",
                      "Feedback": "reward: none (failed); error: Timeout"}


def test_gepa_splits_validation_from_training_tasks_and_names_its_budget_and_prompts(tmp_path):
    from lightning_core.apo import gepa_adapter

    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(t) + "\n" for t in _tasks("t", 8)))
    cfg = make_config(tmp_path, f"rollouts.dataset={data}", "prompt_optimization.tasks_per_eval=3",
                      'rollouts.resources={"prompts": {"writer": "W.", "rewriter": "R."}}')
    train, val = gepa_adapter.split_tasks(cfg)
    assert len(val) == 3 and len(train) == 5 and not {t["id"] for t in val} & {t["id"] for t in train}
    assert [t["id"] for t in val] == [t["id"] for t in apo.draw_tasks(cfg, 0)]
    assert apo.target_prompts(cfg) == ["rewriter", "writer"]  # GEPA: one component per named prompt
    assert apo.gepa_budget(cfg) == 300  # no budget set: 300 rollouts, about what the beam search's defaults spent
    assert apo.gepa_budget(make_config(tmp_path, "prompt_optimization.samples_per_task=2")) == 150
    assert apo.gepa_budget(make_config(tmp_path, "prompt_optimization.max_rollouts=40",
                                       "prompt_optimization.samples_per_task=2")) == 20
    assert apo.gepa_budget(make_config(tmp_path, "prompt_optimization.max_rollouts=40",
                                       "prompt_optimization.max_metric_calls=7")) == 7
    one = make_config(tmp_path, 'rollouts.resources={"prompts": {"writer": "W.", "rewriter": "R."}}',
                      "prompt_optimization.prompt=writer")
    assert apo.target_prompts(one) == ["writer"]
    v1 = prompts.PromptVersion("writer-v1", "writer", 1, "W.", None, None, None, "config", None, None, None, True)
    assert gepa_adapter.label({"writer": v1}, [{"id": "b"}, {"id": "a"}]) == gepa_adapter.label({"writer": v1}, [{"id": "a"}, {"id": "b"}])
    assert gepa_adapter.label({"writer": v1}, [{"id": "a"}]).startswith("writer-v1 g")


@pytest.mark.integration
def test_optimize_prompt_runs_gepa_records_its_candidates_reflects_on_the_lake_promotes_the_best_and_train_uses_it(
    prefect_harness, tmp_path, vllm_server, collector, collector_config, tiny_model_dir
):
    """`optimize-prompt` with the defaults (GEPA, the library) through the real gateway, collector and lake, with the
    scripted critic: 20 task evaluations, then the held-out evaluation, a resumed run and a training epoch."""
    from flows.optimize_prompt import optimize_prompt
    from flows.train import train_epoch
    from tests.helpers import prompt_critic

    fixtures = dict(vllm_server=vllm_server, collector=collector, collector_config=collector_config, tiny_model_dir=tiny_model_dir)
    overrides = _apo_overrides(tmp_path, fixtures, **{
        "run_name": "gepa", "prompt_optimization.max_metric_calls": "20", "prompt_optimization.minibatch_size": "2"})
    prompt_critic.SEEN.clear()
    summary = optimize_prompt(overrides=overrides)
    cfg = make_config(tmp_path, *overrides)
    catalog = Catalog.from_config(cfg)

    # candidates and parents: every new version descends from one GEPA reflected on, through the critic's edit
    found = {v.version: v for v in prompts.versions(catalog, "instructions")}
    assert found["instructions-v1"].made_by == "config" and found["instructions-v1"].parent_version is None
    children = [v for v in found.values() if v.version != "instructions-v1"]
    assert children and all(v.made_by == "scripted" and v.run_id == "gepa.apo" and v.critique for v in children)
    assert all(v.text == f"{found[v.parent_version].text} Mention {v.text.rsplit(' ', 1)[1]}" for v in children)
    assert summary["metric_calls"] <= 20 and summary["rollouts"] == summary["metric_calls"]  # one sample per task

    # the reflective dataset, from the lake: per task, its text, the model's answer in the lake, the reward
    lines = [json.loads(line) for line in (catalog.state_root / "gepa" / "gepa.apo" / "reflections.jsonl").read_text().splitlines()]
    assert lines and all(set(line["dataset"]) == {"instructions"} for line in lines)
    first = lines[0]
    with catalog.read() as con:
        answers = dict(con.execute(
            "SELECT task_id, json_extract_string(attributes, '$.\"arclight.llm.response_text\"') FROM spans "
            "WHERE run_id = 'gepa.apo' AND epoch = ? AND span_kind = 'llm'", [first["epoch"]]).fetchall())
        rewards = dict(con.execute("SELECT task_id, reward FROM rollouts WHERE run_id = 'gepa.apo' AND epoch = ?",
                                   [first["epoch"]]).fetchall())
    records = first["dataset"]["instructions"]
    assert len(records) == len(answers) == 2  # the minibatch
    by_question = {json.loads(r["Inputs"]["task"])["question"]: r for r in records}
    questions = {f"Say {task_id[1:]}.": task_id for task_id in answers}
    assert set(by_question) == set(questions)
    for question, r in by_question.items():
        assert r["Generated Outputs"] == answers[questions[question]]
        assert r["Feedback"] == f"reward: {rewards[questions[question]]} (succeeded)"
        assert r["Inputs"]["agent"] == "prompted"
    # the scripted critic saw real failures: the task, the rollout's model call under a candidate's prompt
    texts = {v.text for v in found.values()}
    assert prompt_critic.SEEN and all(f["reward"] < 1 and f["messages"][0]["role"] == "system" for f in prompt_critic.SEEN)
    assert all(f["messages"][0]["content"] in texts for f in prompt_critic.SEEN)
    assert all(f["messages"][1] == {"role": "user", "content": f["task"]["question"]} for f in prompt_critic.SEEN)

    # the version is on every rollout's row and spans
    with catalog.read() as con:
        rows = con.execute("SELECT DISTINCT prompt_versions FROM rollouts WHERE run_id = 'gepa.apo'").fetchall()
        spans = con.execute(
            "SELECT DISTINCT json_extract_string(resource, '$.\"arclight.prompt.instructions.version\"') FROM spans "
            "WHERE run_id = 'gepa.apo' AND span_kind = 'agent'").fetchall()
    assert {json.loads(r[0])["instructions"] for r in rows} == set(found) == {s[0] for s in spans}

    # the best on the validation split is promoted; its score is over the 4 validation tasks
    best = found[summary["best"]]
    assert summary["start_score"] == 0.0 < summary["best_score"] == best.score and best.score_tasks == 4
    assert summary["promoted"] and best.serving and not found["instructions-v1"].serving
    assert best.score == max(v.score for v in found.values() if v.score is not None)

    # held-out: start and best scored on the eval tasks, labelled by version
    held = summary["held_out"]
    assert set(held) == {"instructions-v1", best.version}
    assert held["instructions-v1"]["reward_mean"] < held[best.version]["reward_mean"]
    assert held[best.version]["label"].endswith(best.version)

    # MLflow's run names the search that ran and its budget; the best score as candidates are kept, the table, the plot
    client = mlflow.MlflowClient(cfg.mlflow_uri)
    run = client.search_runs([client.get_experiment_by_name(cfg.name).experiment_id],
                             filter_string="tags.`arclight.policy` = 'prompt:instructions'")[0]
    assert {k: v for k, v in run.data.params.items() if k in ("apo.algorithm", "apo.max_metric_calls", "apo.minibatch_size")} \
        == {"apo.algorithm": "gepa", "apo.max_metric_calls": "20", "apo.minibatch_size": "2"}, run.data.params
    assert [m.value for m in sorted(client.get_metric_history(run.info.run_id, "apo/best_score"), key=lambda m: m.step)] == \
        [r["best_score"] for r in summary["rounds"]]
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "plots")} | \
        {a.path for a in client.list_artifacts(run.info.run_id, "apo")}
    assert {"plots/apo_best_score.png", "apo/candidates.json"} <= artifacts

    # a second run resumes from GEPA's state: nothing is evaluated again
    again = optimize_prompt(overrides=overrides)
    assert (again["rollouts"], again["best"]) == (summary["rollouts"], summary["best"])

    # a later training epoch runs with the promoted prompt
    train_epoch(overrides=overrides)
    with catalog.read() as con:
        used = con.execute("SELECT DISTINCT prompt_versions FROM rollouts WHERE run_id = 'gepa' AND epoch = 0").fetchall()
    assert [json.loads(u[0]) for u in used] == [{"instructions": best.version}]


def test_ctrl_c_inside_a_gepa_evaluation_stops_the_search_instead_of_being_logged_and_skipped(tmp_path):
    import gepa

    from lightning_core.apo import gepa_adapter

    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(t) + "\n" for t in _tasks("t", 6)))
    cfg = make_config(tmp_path, f"rollouts.dataset={data}", "prompt_optimization.tasks_per_eval=2",
                      'rollouts.resources={"prompts": {"instructions": "Answer briefly."}}', "prompt_optimization.critic.kind=scripted",
                      "prompt_optimization.critic.function=tests.helpers.prompt_critic:critic")
    catalog = Catalog.from_config(cfg)
    catalog.ensure()
    start = prompts.register_config_prompts(catalog, cfg)
    train, val = gepa_adapter.split_tasks(cfg)
    calls = []

    def evaluate(chosen, tasks):  # the first evaluation (the start on the validation split) scores; the second is cut off
        calls.append(sorted(t["id"] for t in tasks))
        if len(calls) == 2:
            raise KeyboardInterrupt
        return 0, {t["id"]: 0.0 for t in tasks}

    adapter = gepa_adapter.ArclightAdapter(
        catalog=catalog, run_id="default.apo", start=start, evaluate_fn=evaluate, val_ids=[t["id"] for t in val],
        critic=critic.make_critic(cfg, gateway_client=None, collector_url="http://127.0.0.1:9", collector_token=None),
        success=1.0, max_prompt_chars=2000)
    with pytest.raises(KeyboardInterrupt):
        gepa.optimize(seed_candidate={"instructions": "Answer briefly."}, trainset=train, valset=val, adapter=adapter,
                      reflection_minibatch_size=2, max_metric_calls=50, seed=0)
    assert len(calls) == 2 and calls[0] == sorted(t["id"] for t in val) and len(calls[1]) == 2
    assert prompts.get(catalog, "instructions-v1").score == 0.0  # the validation score was recorded before the stop


SQL = REPO / "examples" / "sql"


def test_measure_apo_reports_each_prompt_gepa_edited_and_gepa_settings_on_the_sql_examples_two_prompts(tmp_path):
    """measure_apo's table for GEPA over the sql example's writer and rewriter: each one's best text, GEPA's budget and
    minibatch (it looked versions up under the joined name 'rewriter+writer', found none and stopped, and printed the
    beam's settings for GEPA)."""
    import sys

    from examples import measure_apo
    from lightning_core.config import load_config

    sys.path.insert(0, str(SQL))
    import sql_agent

    cfg = load_config(SQL / "config.apo.yaml", overrides=[f"project_dir={tmp_path}"])
    catalog = Catalog.from_config(cfg)
    catalog.ensure()
    start = prompts.register_config_prompts(catalog, cfg)
    assert {n: v.text for n, v in start.items()} == {"writer": sql_agent.WRITER_SYSTEM, "rewriter": sql_agent.REWRITER_SYSTEM}
    assert apo.target_prompts(cfg) == ["rewriter", "writer"] and apo.gepa_budget(cfg) == 264
    run = apo.run_id(cfg)
    better, _ = prompts.add_candidate(catalog, name="writer", text=start["writer"].text + "\nCount with COUNT(*).",
                                      parent="writer-v1", made_by="critic", critique="counts", run_id=run, round=1)
    summary = {  # the shape run_gepa returns
        "algorithm": "gepa", "prompt": "rewriter+writer", "run_id": run, "start": "rewriter-v1+writer-v1",
        "best": "rewriter-v1+writer-v2", "best_versions": {"rewriter": "rewriter-v1", "writer": better.version},
        "held_out": {"rewriter-v1+writer-v1": {"tasks": 83, "reward_mean": 0.34, "success_rate": 0.337},
                     "rewriter-v1+writer-v2": {"tasks": 83, "reward_mean": 0.4, "success_rate": 0.4}},
        "rounds": [{"round": 0, "best_score": 0.25, "rejected": []}, {"round": 1, "best_score": 0.3, "rejected": [{"why": "empty"}]}],
        "rollouts": 40, "metric_calls": 40, "max_metric_calls": 264, "critic_calls": 2, "search_s": 120.0}
    assert prompts.versions(catalog, summary["prompt"]) == []  # what the joined name found before
    table = measure_apo.report(cfg, summary, catalog, title="examples/sql/config.apo.yaml", seed=0, stamp="s",
                               command="c", timing="t | l", machine="m")
    assert "prompt optimisation (gepa), model critic, seed 0" in table and "| best validation score per candidate kept |" in table
    assert "| 0.34 reward, 34% success (rewriter-v1+writer-v1) | 0.40 reward, 40% success (rewriter-v1+writer-v2) | 83 " \
           "| 0: 0.25, 1: 0.30 | 1 (1) | 40 | 2 | 2.0 min | t | l | m |" in table
    assert ("GEPA, max_metric_calls 264 (40 used), minibatch 3 tasks, validation 24 tasks, 1 rollout(s) per task" in table
            and "beam" not in table)
    assert f"Best prompt 'writer' (writer-v2):\n\n```text\n{better.text}\n```" in table
    assert f"Best prompt 'rewriter' (rewriter-v1):\n\n```text\n{sql_agent.REWRITER_SYSTEM}\n```" in table


@pytest.mark.integration
def test_gepa_edits_the_sql_examples_writer_and_rewriter_prompts_each_from_its_own_agents_calls(
    prefect_harness, tmp_path, vllm_server, collector, collector_config, tiny_model_dir
):
    """`optimize-prompt` with the sql example's own config.apo.yaml (GEPA over two prompts) on the tiny model: GEPA
    reflects on each prompt in turn, each with its own agent's calls; the writer gets a child, the rewriter's unchanged
    proposal is dropped; measure_apo reports both."""
    from examples import measure_apo
    from flows.optimize_prompt import optimize_prompt
    from lightning_core.config import load_config
    from tests.helpers import sql_prompt_critic
    from tests.test_examples import _overrides as example_overrides
    from tests.test_examples import _tasks as example_tasks

    overrides = example_overrides(
        tmp_path, run="ex-sql-gepa", agent_path=SQL, dataset=example_tasks(tmp_path, SQL / "train.jsonl", 6),
        vllm_server=vllm_server, collector=collector, collector_config=collector_config, tiny_model_dir=tiny_model_dir, **{
            "rollouts.resources.checker_model": "tiny", "rollouts.resources.checker_max_tokens": "8",
            "rollouts.resources.rewrite": "always",  # the rewriter's prompt steers a call in every rollout
            "rollouts.resources.similarity_weight": "0.5",
            "prompt_optimization.tasks_per_eval": "2", "prompt_optimization.minibatch_size": "2",
            # validation 2, the rewriter's iteration 2 (no proposal), the writer's 4 (+2 on validation if it is better),
            # then the rewriter's again when 2 are left
            "prompt_optimization.max_metric_calls": "10", "prompt_optimization.held_out": "false",
            "prompt_optimization.critic.kind": "scripted",
            "prompt_optimization.critic.function": "tests.helpers.sql_prompt_critic:critic"})
    sql_prompt_critic.SEEN.clear()
    summary = optimize_prompt(config_path=str(SQL / "config.apo.yaml"), overrides=overrides)
    cfg = load_config(SQL / "config.apo.yaml", overrides=overrides)
    catalog = Catalog.from_config(cfg)
    start = {name: prompts.get(catalog, f"{name}-v1") for name in ("writer", "rewriter")}
    assert all(v.made_by == "config" and v.text == cfg.rollouts.resources["prompts"][n] for n, v in start.items())

    # GEPA reflects on each prompt in turn (the rewriter first: names sorted), each time with its own agent's calls
    agent_of = {start["writer"].text: "writer", start["rewriter"].text: "rewriter"}
    seen = [agent_of.get(prompt, prompt) for prompt, _ in sql_prompt_critic.SEEN]
    assert seen[:2] == ["rewriter", "writer"] and seen[2:] in ([], ["rewriter"])
    for prompt, failures in sql_prompt_critic.SEEN:
        assert len(failures) == 2 and all(f["agent"] == agent_of[prompt] and f["messages"][0]["role"] == "system"
                                          and f["messages"][0]["content"] == prompt for f in failures)
    children = {name: [(v.parent_version, v.text, v.made_by, v.run_id) for v in prompts.versions(catalog, name)
                       if v.version != f"{name}-v1"] for name in ("writer", "rewriter")}
    assert children == {"writer": [("writer-v1", start["writer"].text + sql_prompt_critic.ADDED, "scripted", "ex-sql-gepa.apo")],
                        "rewriter": []}
    dropped = {"parent": "rewriter-v1", "why": "same as its parent", "text": start["rewriter"].text[:300]}
    assert dropped in summary["rounds"][-1]["rejected"]
    lines = [json.loads(line) for line in (catalog.state_root / "gepa" / "ex-sql-gepa.apo" / "reflections.jsonl").read_text().splitlines()]
    assert [name for line in lines for name in line["dataset"]] == seen  # one component per iteration, as the critic saw
    assert all(r["Inputs"]["agent"] == name for line in lines for name, records in line["dataset"].items() for r in records)

    # both prompts are in the summary, which measure_apo reports with GEPA's settings
    assert summary["prompt"] == "rewriter+writer" and set(summary["best_versions"]) == {"rewriter", "writer"}
    assert summary["metric_calls"] == 10 and 0 < summary["rollouts"] <= 10  # an evaluation GEPA asks for twice runs once
    table = measure_apo.report(cfg, summary, catalog, title="sql", seed=0, stamp="s", command="c", timing="t", machine="m")
    assert "Best prompt 'writer'" in table and "Best prompt 'rewriter'" in table and "max_metric_calls 10" in table
