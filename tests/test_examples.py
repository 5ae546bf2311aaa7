"""The examples' configs through the real train-epoch flow: selective and multi-policy sql, LangGraph calc.

Each test runs the example's own config file with overrides that point it at the session's tiny
model (real vLLM with LoRA), collector and a fresh project folder, on a few tasks of the example's
own dataset. The tiny model writes no valid SQL, so the sql tests turn on the example's
``similarity_weight`` reward shaping: groups then have unequal rewards and every epoch trains.
"""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import mlflow
import pytest
from rich.console import Console

from lightning_core.epoch import bookkeeping as ep
from lightning_core.store.catalog import Catalog
from lightning_core.cli.progress import print_summary
from lightning_core.common.services import free_port
from lightning_core.store.outputs import load_triplets
from lightning_core.config import load_config
from tests.conftest import REPO

pytestmark = pytest.mark.integration

SQL = REPO / "examples" / "sql"
LANGGRAPH = REPO / "examples" / "langgraph_calc"


def _tasks(tmp: Path, source: Path, n: int) -> str:
    """The first ``n`` tasks of an example's dataset, as a JSONL file in ``tmp``."""
    rows = source.read_text().splitlines()[:n]
    path = tmp / f"tasks-{source.stem}.jsonl"
    path.write_text("\n".join(rows) + "\n")
    return str(path)


def _overrides(tmp: Path, *, run: str, agent_path: Path, dataset: str, vllm_server, collector, collector_config,
               tiny_model_dir, **extra: str) -> list[str]:
    """Point an example config at the session's servers and a fresh project folder (tests/test_flows.py's pattern)."""
    settings = {
        "project_dir": str(tmp),
        "lake.path": str(collector_config.lake.path),
        "lake.catalog": str(tmp / "catalog.duckdb"),
        "run_name": run,
        "epochs": "2",
        "collector.endpoint": collector.url,
        **({"serving.urls": json.dumps([vllm_server.url]),
            "serving.redeploy": "lora"}  # the session's vLLM serves other tests: never merge into its weights
           if vllm_server is not None else {"serving.redeploy": "merged", "serving.port": "0"}),
        "gateway.port": str(free_port()),
        "model.path": str(tiny_model_dir),
        "model.served_name": "tiny",
        "rollouts.agent_path": json.dumps([str(agent_path)]),
        "rollouts.dataset": dataset,
        "rollouts.tasks_per_epoch": "2",
        "rollouts.group_size": "3",
        "rollouts.concurrency": "6",
        "rollouts.timeout_s": "60",
        "rollouts.resources.max_tokens": "8",
        "trainer.micro_batch_size": "8",
        "trainer.lora_r": "4",
        "trainer.lora_alpha": "8",
        "trainer.learning_rate": "0.01",
        **extra,
    }
    return [f"{k}={v}" for k, v in settings.items()]


def _sql_overrides(tmp: Path, run: str, **servers) -> list[str]:
    return _overrides(tmp, run=run, agent_path=SQL, dataset=_tasks(tmp, SQL / "train.jsonl", 2), **servers, **{
        "rollouts.resources.checker_model": "tiny",  # the base model's served name in the tests
        "rollouts.resources.checker_max_tokens": "8",
        "rollouts.resources.rewrite": "always",
        "rollouts.resources.similarity_weight": "0.5",
        "rollouts.informative_groups": "null",  # two tasks: nothing more to draw
        "evaluation.every_epochs": "null",  # the tiny model writes no SQL: no held-out curve to measure
    })


def _calls(config, run: str, epoch: int) -> list[tuple[str, str, str]]:
    """(agent, served model, policy version) of every model call of an epoch (the llm_calls view)."""
    with Catalog.from_config(config).read() as con:
        return con.execute("SELECT agent_name, model, policy_version FROM llm_calls WHERE run_id = ? AND epoch = ? "
                           "ORDER BY start_ns", [run, epoch]).fetchall()


def _served_by_vllm(vllm_server) -> set[str]:
    return {m["id"] for m in httpx.get(f"{vllm_server.url}/v1/models", timeout=10).json()["data"]}


def test_sql_selective_run_trains_writer_and_rewriter_while_the_checker_stays_on_the_base_model(
    prefect_harness, tmp_path, vllm_server, collector, collector_config, tiny_model_dir
):
    from flows.train import train

    run = "ex-sql-selective"
    overrides = _sql_overrides(tmp_path, run, vllm_server=vllm_server, collector=collector,
                               collector_config=collector_config, tiny_model_dir=tiny_model_dir)
    rows = train(config_path=str(SQL / "config.yaml"), overrides=overrides)
    cfg = load_config(SQL / "config.yaml", overrides=overrides)
    assert cfg.policies[0].name == "sql" and cfg.policies[0].agent_match == "writer|rewriter"  # the example's own config
    assert [(r["epoch"], r["status"], r["succeeded"]) for r in rows] == [(0, "completed", 6), (1, "completed", 6)]
    assert rows[0]["new_version"] == "sql-v1" and rows[1]["policy_version"] == "sql-v1"

    triplets = load_triplets(cfg, run_id=run, epoch=0, policy="sql").to_pylist()
    calls = _calls(cfg, run, 0)
    # every rollout made one call per agent; the checker's six are not training data
    assert sorted(a for a, _, _ in calls) == ["checker"] * 6 + ["rewriter"] * 6 + ["writer"] * 6
    assert sorted(t["agent_name"] for t in triplets) == ["rewriter"] * 6 + ["writer"] * 6
    assert all(t["response_token_ids"] and t["prompt_token_ids"] for t in triplets)

    # in epoch 1 the trained adapter served the writer and the rewriter, the base model the checker
    served = {}
    for agent, model, version in _calls(cfg, run, 1):
        served.setdefault(agent, set()).add((model, version))
    assert served == {"writer": {("sql-v1", "1")}, "rewriter": {("sql-v1", "1")}, "checker": {("tiny", "0")}}

    # per-agent reporting: the catalog, the MLflow run (metrics and plot) and the train summary
    agents = {(a["epoch"], a["agent_name"]): a for a in ep.agent_epochs(Catalog.from_config(cfg), run_id=run)}
    assert sorted(agents) == [(e, a) for e in (0, 1) for a in ("checker", "rewriter", "writer")]
    for e in (0, 1):
        assert (agents[e, "checker"]["policy"], agents[e, "checker"]["calls"], agents[e, "checker"]["triplets"]) == (None, 6, 0)
        for trained in ("writer", "rewriter"):
            assert (agents[e, trained]["policy"], agents[e, trained]["triplets"], agents[e, trained]["rollouts"]) == ("sql", 6, 6)
        rewards = [r for (r,) in _rollout_rewards(cfg, run, e)]
        assert agents[e, "writer"]["reward_mean"] == pytest.approx(sum(rewards) / len(rewards))
    client = mlflow.MlflowClient(cfg.mlflow_uri)
    mlflow_run = client.search_runs([client.get_experiment_by_name(cfg.name).experiment_id],
                                    filter_string=f"tags.`arclight.run_id` = '{run}'")[0]
    for agent in ("checker", "writer", "rewriter"):
        history = client.get_metric_history(mlflow_run.info.run_id, f"agent/{agent}/triplets")
        assert [(m.step, m.value) for m in history] == [(e, agents[e, agent]["triplets"]) for e in (0, 1)]
    assert "plots/agents.png" in {a.path for a in client.list_artifacts(mlflow_run.info.run_id, "plots")}
    console = Console(record=True, width=220)
    print_summary(cfg, console=console)
    text = console.export_text()
    assert "trained: rewriter, writer   frozen: checker" in text
    assert any([c.strip() for c in line.split("│")[1:3]] == ["checker", "frozen (its calls train nothing)"]
               for line in text.splitlines()), text


def _rollout_rewards(cfg, run: str, epoch: int) -> list[tuple[float]]:
    with Catalog.from_config(cfg).read(spans=False) as con:
        return con.execute("SELECT reward FROM rollouts WHERE run_id = ? AND epoch = ? AND mode = 'train' "
                           "AND status = 'succeeded'", [run, epoch]).fetchall()


def test_sql_selective_run_with_merged_weights_serves_the_frozen_checker_from_its_own_base_model_vllm(
    prefect_harness, tmp_path, collector, collector_config, tiny_model_dir
):
    """The CPU default: the policy's merged weights in one vLLM, the base model in another for the frozen checker."""
    from flows.train import train
    from lightning_core.epoch import stack

    run = "ex-sql-merged"
    overrides = _sql_overrides(tmp_path, run, vllm_server=None, collector=collector,
                               collector_config=collector_config, tiny_model_dir=tiny_model_dir)
    cfg = load_config(SQL / "config.yaml", overrides=overrides)
    probe = {"model": "tiny", "prompt": "SELECT name FROM", "max_tokens": 1, "temperature": 0, "logprobs": 1}
    record = stack.up(cfg)  # as `arclight up`: the train flow attaches to these
    try:
        groups = {name: entry["url"] for name, entry in record.items() if name.startswith("vllm")}
        assert sorted(groups) == ["vllm0@sql", "vllm0@tiny"]  # two vLLMs, grouped

        def logprobs() -> dict[str, dict]:
            return {name: httpx.post(f"{url}/v1/completions", json=probe, timeout=60).json()["choices"][0]["logprobs"]
                    for name, url in groups.items()}

        before = logprobs()
        rows = train(config_path=str(SQL / "config.yaml"), overrides=overrides)
        after = logprobs()
    finally:
        stack.down(cfg)
    assert [r["status"] for r in rows] == ["completed", "completed"] and rows[1]["policy_version"] == "sql-v1"
    assert before["vllm0@sql"] == before["vllm0@tiny"]  # both started as the base model
    assert after["vllm0@tiny"] == before["vllm0@tiny"]  # the frozen checker's vLLM never got trained weights
    assert after["vllm0@sql"] != before["vllm0@sql"]  # the policy's did (sql-v2 merged and reloaded in place)
    served = {}
    for agent, model, version in _calls(cfg, run, 1):
        served.setdefault(agent, set()).add((model, version))
    assert served == {"writer": {("tiny", "1")}, "rewriter": {("tiny", "1")}, "checker": {("tiny", "0")}}
    triplets = load_triplets(cfg, run_id=run, epoch=1, policy="sql").to_pylist()
    assert sorted({t["agent_name"] for t in triplets}) == ["rewriter", "writer"]


def test_sql_two_policies_serve_two_adapters_and_each_agent_calls_its_own(
    prefect_harness, tmp_path, vllm_server, collector, collector_config, tiny_model_dir
):
    from flows.train import train

    run = "ex-sql-multi"
    overrides = _sql_overrides(tmp_path, run, vllm_server=vllm_server, collector=collector,
                               collector_config=collector_config, tiny_model_dir=tiny_model_dir)
    rows = train(config_path=str(SQL / "config.multi.yaml"), overrides=overrides)
    cfg = load_config(SQL / "config.multi.yaml", overrides=overrides)
    assert [(p.name, p.agent_match) for p in cfg.policies] == [("writer", "^writer$"), ("rewriter", "^rewriter$")]
    assert rows[0]["new_version"] == "writer-v1,rewriter-v1"
    assert rows[1]["policy_version"] == "writer-v1,rewriter-v1"

    for policy in ("writer", "rewriter"):
        triplets = load_triplets(cfg, run_id=run, epoch=0, policy=policy).to_pylist()
        assert [t["agent_name"] for t in triplets] == [policy] * 6
    assert {"writer-v1", "rewriter-v1"} <= _served_by_vllm(vllm_server)  # both adapters loaded at once

    served = {}
    for agent, model, version in _calls(cfg, run, 1):
        served.setdefault(agent, set()).add((model, version))
    assert served == {"writer": {("writer-v1", "1")}, "rewriter": {("rewriter-v1", "1")}, "checker": {("tiny", "0")}}


def test_langgraph_calc_agent_trains_from_openinference_spans_with_node_names_as_agents(
    prefect_harness, tmp_path, vllm_server, collector, collector_config, tiny_model_dir
):
    from flows.train import train_epoch

    assert "lightning_core" not in (LANGGRAPH / "calc_graph.py").read_text()  # the graph is plain LangGraph
    run = "ex-langgraph"
    overrides = _overrides(tmp_path, run=run, agent_path=LANGGRAPH, vllm_server=vllm_server, collector=collector,
                           collector_config=collector_config, tiny_model_dir=tiny_model_dir,
                           dataset=_tasks(tmp_path, REPO / "examples" / "calc" / "train.jsonl", 2),
                           **{"rollouts.agent_path": json.dumps([str(LANGGRAPH), str(REPO / "examples" / "calc")])})
    row = train_epoch(config_path=str(LANGGRAPH / "config.yaml"), overrides=overrides)
    cfg = load_config(LANGGRAPH / "config.yaml", overrides=overrides)
    assert (row["status"], row["succeeded"]) == ("completed", 6)

    with Catalog.from_config(cfg).read() as con:
        instrumented = con.execute(
            "SELECT count(*) FROM spans WHERE run_id = ? AND epoch = 0 "
            "AND json_extract_string(attributes, '$.\"openinference.span.kind\"') = 'LLM'", [run]).fetchall()[0][0]
        gateway = dict(con.execute(
            "SELECT response_id, response_token_ids FROM spans WHERE run_id = ? AND epoch = 0 AND span_kind = 'llm' "
            "AND response_token_ids IS NOT NULL", [run]).fetchall())
        calls = con.execute("SELECT agent_name, span_count FROM llm_calls WHERE run_id = ? AND epoch = 0", [run]).fetchall()
    triplets = load_triplets(cfg, run_id=run, epoch=0, policy="calc-langgraph").to_pylist()
    assert instrumented == len(gateway) >= 6  # one ChatOpenAI span per gateway call
    assert calls and all(c == ("solver", 2) for c in calls)  # the instrumentation's and the gateway's span, one call
    assert len(triplets) == len(gateway)
    for t in triplets:
        assert t["agent_name"] == "solver"
        assert t["response_token_ids"] == gateway[t["response_id"]]
        assert t["reward"] == 0.0 or t["reward"] == 1.0


AUTOGEN = REPO / "examples" / "autogen_calc"


def test_autogen_calc_team_runs_as_a_program_and_trains_only_the_solver(
    prefect_harness, tmp_path, vllm_server, collector, collector_config, tiny_model_dir
):
    from flows.train import train_epoch

    assert "lightning_core" not in (AUTOGEN / "calc_team.py").read_text()  # the team is plain AutoGen
    run = "ex-autogen"
    overrides = _overrides(tmp_path, run=run, agent_path=AUTOGEN, vllm_server=vllm_server, collector=collector,
                           collector_config=collector_config, tiny_model_dir=tiny_model_dir,
                           dataset=_tasks(tmp_path, REPO / "examples" / "calc" / "train.jsonl", 2),
                           **{"rollouts.command_cwd": str(AUTOGEN), "rollouts.informative_groups": "null",
                              "evaluation.every_epochs": "null", "epochs": "1"})
    row = train_epoch(config_path=str(AUTOGEN / "config.yaml"), overrides=overrides)
    cfg = load_config(AUTOGEN / "config.yaml", overrides=overrides)
    assert (row["status"], row["succeeded"]) == ("completed", 6)

    with Catalog.from_config(cfg).read() as con:
        gateway = dict(con.execute(
            "SELECT response_id, response_token_ids FROM spans WHERE run_id = ? AND epoch = 0 AND span_kind = 'llm' "
            "AND response_token_ids IS NOT NULL", [run]).fetchall())
        calls = con.execute("SELECT agent_name, count(*) FROM llm_calls WHERE run_id = ? AND epoch = 0 GROUP BY 1 "
                            "ORDER BY 1", [run]).fetchall()
        runtime = con.execute("SELECT count(*) FROM spans WHERE run_id = ? AND epoch = 0 AND name LIKE 'autogen %'",
                              [run]).fetchall()[0][0]
    triplets = load_triplets(cfg, run_id=run, epoch=0, policy="calc-autogen").to_pylist()
    # every rollout: the solver at least once, the reviewer exactly once (the speaker order is a function, not a model)
    assert dict(calls)["reviewer"] == 6 and dict(calls)["solver"] >= 6 and set(dict(calls)) == {"solver", "reviewer"}
    assert runtime > 0  # AutoGen's own spans, exported from the program's environment
    assert len(triplets) == dict(calls)["solver"] and sum(n for _, n in calls) == len(gateway)
    for t in triplets:
        assert t["agent_name"] == "solver" and t["response_token_ids"] == gateway[t["response_id"]]
        assert t["reward"] in (0.0, 1.0)
