"""The train-epoch flow through Prefect with the real collector, gateway, vLLM and MLflow."""

from __future__ import annotations

import io
import json
import math
import os
import subprocess
import sys
import time

import mlflow
import pytest
from rich.console import Console

from lightning_core import analyst
from lightning_core.cli.progress import print_summary
from lightning_core.store.catalog import Catalog
from lightning_core.common.services import free_port
from tests.conftest import REPO, make_config

pytestmark = pytest.mark.integration

POLICY = "flowtest"


def _dataset(path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def _overrides(tmp, *, vllm_server, collector, collector_config, tiny_model_dir, dataset, **extra) -> list[str]:
    settings = {
        "project_dir": str(tmp),
        "lake.path": str(collector_config.lake.path),
        "lake.catalog": str(tmp / "catalog.duckdb"),
        "name": "flowtest",
        "run_name": "flowrun",
        "collector.endpoint": collector.url,
        "serving.urls": json.dumps([vllm_server.url]),
        "gateway.port": str(free_port()),
        "model.path": str(tiny_model_dir),
        "model.served_name": "tiny",
        "policies": json.dumps([{"name": POLICY}]),
        "rollouts.agent": "tests.helpers.flow_agent:run",
        "rollouts.agent_path": json.dumps([str(REPO)]),
        "rollouts.dataset": dataset,
        "rollouts.group_size": "4",
        "rollouts.concurrency": "4",
        "rollouts.timeout_s": "20",
        "trainer.micro_batch_size": "4",
        "trainer.lora_r": "4",
        "trainer.lora_alpha": "8",
        "trainer.learning_rate": "0.01",
        "serving.redeploy": "lora",  # the session shares one vLLM: keep its base weights (test_redeploy covers merged)
        **extra,
    }
    return [f"{k}={v}" for k, v in settings.items()]


def test_two_epochs_chain_policy_versions_and_record_failures(
    prefect_harness, tmp_path, vllm_server, collector, collector_config, tiny_model_dir
):
    from flows.train import train_epoch

    questions = [{"id": f"q{i}", "question": f"Say the word {w}.", "target": w, "hops": hops}
                 for i, (w, hops) in enumerate([("xyzzy", 1), ("plugh", 2), ("qwfp", 2)])]
    odd = [{"id": "boom", "behavior": "raise", "question": "", "target": ""},
           {"id": "stuck", "behavior": "hang", "question": "", "target": ""},
           {"id": "quiet", "behavior": "silent", "question": "", "target": ""}]
    dataset = _dataset(tmp_path / "tasks.jsonl", questions + odd)
    overrides = _overrides(tmp_path, vllm_server=vllm_server, collector=collector, collector_config=collector_config,
                           tiny_model_dir=tiny_model_dir,
                           dataset=dataset, **{"rollouts.timeout_s": "15", "rollouts.group_size": "2",
                                               "rollouts.metrics_by": "hops"})
    cfg = make_config(tmp_path, *overrides)
    # an analyst in another process holds one connection for the whole two-epoch run, polling
    polls_path = tmp_path / "analyst.jsonl"
    poller = subprocess.Popen([sys.executable, "-m", "tests.helpers.analyst_poller", str(cfg.lake.path),
                               str(cfg.lake.catalog_path), "flowrun", str(polls_path)], cwd=REPO)
    try:
        deadline = time.monotonic() + 60
        while not (polls_path.exists() and polls_path.read_text().strip()) and time.monotonic() < deadline:
            time.sleep(0.1)  # connected before the flow starts
        first = train_epoch(overrides=overrides)
        second = train_epoch(overrides=overrides)
    finally:
        (tmp_path / "analyst.jsonl.stop").touch()
        poller.wait(timeout=60)
    polls = [json.loads(line) for line in polls_path.read_text().splitlines()]
    assert [p for p in polls if "error" in p] == []
    assert len(polls) >= 20
    twice = [p for p in polls if not p["raw"] == p["distinct"] == p["spans"]]
    assert twice == [], twice[:3]  # no span twice, no half-written commit
    assert all(a["spans"] <= b["spans"] and a["version"] <= b["version"] for a, b in zip(polls, polls[1:]))
    # the output tables too: each epoch's triplets appear in one commit and stay
    assert all(a["triplets"] <= b["triplets"] and a["triplets_version"] <= b["triplets_version"]
               for a, b in zip(polls, polls[1:]))
    assert polls[-1]["triplets"] > 0
    assert polls[0]["completed_epochs"] == 0 and polls[-1]["completed_epochs"] == 2 and polls[-1]["spans"] > 0
    catalog = Catalog.from_config(cfg)
    with catalog.read() as con:
        epochs = con.execute("SELECT epoch, status, policy_version, new_version FROM epochs WHERE run_id='flowrun' ORDER BY epoch").fetchall()
        outcomes = dict(con.execute(
            "SELECT task_id, string_agg(DISTINCT status) FROM rollouts WHERE run_id='flowrun' AND epoch=0 GROUP BY task_id").fetchall())
        errors = dict(con.execute("SELECT task_id, any_value(error) FROM rollouts WHERE run_id='flowrun' AND epoch=0 GROUP BY task_id").fetchall())
        versions = con.execute("SELECT version, parent_version, epoch FROM policy_versions WHERE policy = ? ORDER BY version", [POLICY]).fetchall()
        served = con.execute(
            "SELECT DISTINCT json_extract_string(attributes, '$.\"arclight.policy.version\"') FROM spans "
            "WHERE run_id='flowrun' AND epoch=1 AND span_kind='llm'").fetchall()
    assert [e[:2] for e in epochs] == [(0, "completed"), (1, "completed")]
    assert epochs[0][3] == f"{POLICY}-v1" and epochs[1][2] == f"{POLICY}-v1"  # epoch 1 sampled from what epoch 0 trained
    assert versions[0] == (f"{POLICY}-v1", None, 0)
    assert versions[1] == (f"{POLICY}-v2", f"{POLICY}-v1", 1)
    assert [s[0] for s in served] == ["1"] or [s[0] for s in served] == [f"{POLICY}-v1"]
    assert outcomes["boom"] == "failed" and "asked this agent to fail" in errors["boom"]
    assert outcomes["stuck"] == "timed_out"
    assert outcomes["quiet"] == "failed" and "produced no spans" in errors["quiet"]
    assert all(outcomes[q["id"]] == "succeeded" for q in questions)
    assert first["epoch"] == 0 and second["epoch"] == 1
    # the snapshot epoch 0 trained on: the spans of epoch 0 only, and its triplets
    then = analyst.connect(cfg, at_epoch=("flowrun", 0))
    assert then.execute("SELECT count(*) FROM spans WHERE run_id = 'flowrun' AND epoch = 1").fetchall() == [(0,)]
    trained_on = then.execute("SELECT count(*) FROM triplets WHERE run_id = 'flowrun' AND epoch = 0").fetchall()[0][0]
    now = analyst.connect(cfg).execute("SELECT count(*) FROM triplets WHERE run_id = 'flowrun' AND epoch = 0").fetchall()
    assert trained_on > 0 and now == [(trained_on,)]
    client = mlflow.MlflowClient(cfg.mlflow_uri)
    experiment = client.get_experiment_by_name("flowtest")
    runs = client.search_runs([experiment.experiment_id])
    history = [m.step for r in runs for m in client.get_metric_history(r.info.run_id, "reward/mean")]
    assert sorted(set(history)) == [0, 1]

    # the collapse signals (issue 70): in each epoch's row, in MLflow at step = epoch, and in the run's summary
    with catalog.read(spans=False) as con:
        kept = con.execute("SELECT epoch, entropy, stats FROM epochs WHERE run_id='flowrun' ORDER BY epoch").fetchall()
    [run] = [r for r in runs if r.data.tags.get("arclight.policy") == POLICY]
    vocab = json.loads((tiny_model_dir / "config.json").read_text())["vocab_size"]
    logged = {key: {m.step: m.value for m in client.get_metric_history(run.info.run_id, key)}
              for key in ("zero_variance_groups", "reward_spread", "tool_calls_per_rollout", "entropy/epoch_mean",
                          "tool_calls_per_rollout/hops_1", "reward/mean/hops_2")}
    for epoch, entropy, stats in kept:
        signals = {s["slice"]: s for s in json.loads(stats)["signals"]}
        assert sorted(signals) == ["all", "hops=1", "hops=2"]  # the odd tasks made no call: no triplet, no slice
        assert (signals["hops=1"]["groups"], signals["hops=2"]["groups"], signals["all"]["rollouts"]) == (1, 2, 6)
        # the agent's rewards differ by 0.01 per sample at least: no group is all-equal, none spreads less than 0.005
        assert signals["all"]["zero_variance_groups"] == 0.0 and signals["all"]["reward_spread"] >= 0.0049
        assert signals["all"]["tool_calls_per_rollout"] == 0.0  # it calls no tool
        assert 0 < entropy <= math.log(vocab) + 1e-6  # nats per sampled token, at most log V
        assert logged["entropy/epoch_mean"][epoch] == pytest.approx(entropy)
        for key, (where, name) in {"zero_variance_groups": ("all", "zero_variance_groups"),
                                   "reward_spread": ("all", "reward_spread"),
                                   "tool_calls_per_rollout": ("all", "tool_calls_per_rollout"),
                                   "tool_calls_per_rollout/hops_1": ("hops=1", "tool_calls_per_rollout"),
                                   "reward/mean/hops_2": ("hops=2", "reward_mean")}.items():
            assert logged[key][epoch] == pytest.approx(signals[where][name]), key
    console = Console(file=io.StringIO(), width=120)
    print_summary(cfg, console=console)
    lines = console.file.getvalue().splitlines()
    table = lines[next(i for i, line in enumerate(lines) if line.strip() == "collapse signals"):]
    table = table[:next(i for i, line in enumerate(table) if line.startswith("└"))]
    assert "by hops: reward, tool calls" in table[2]
    cells = [[c.strip() for c in line.strip("│").split("│")] for line in table if line.startswith("│")]
    assert [(c[0], c[1], c[3], c[4]) for c in cells] == [(str(e), "0%", f"{h:.3f}", "0.00") for e, h, _ in kept]
    assert all(c[5].startswith("1: ") and " · 2: " in c[5] for c in cells)


def _kill_tree(pid: int) -> None:
    import psutil

    parent = psutil.Process(pid)
    for proc in [*parent.children(recursive=True), parent]:
        try:
            proc.kill()
        except psutil.NoSuchProcess:
            pass


def test_killed_during_training_resumes_without_rerunning_rollouts(
    prefect_harness, tmp_path, vllm_server, collector, collector_config, tiny_model_dir
):
    from flows.train import train_epoch

    questions = [{"id": f"k{i}", "question": f"Say the word {w}.", "target": w} for i, w in enumerate(["xyzzy", "plugh"])]
    dataset = _dataset(tmp_path / "tasks.jsonl", questions)
    overrides = _overrides(tmp_path, vllm_server=vllm_server, collector=collector, collector_config=collector_config,
                           tiny_model_dir=tiny_model_dir, dataset=dataset,
                           **{"run_name": "killrun", "rollouts.group_size": "3", "trainer.passes": "200"})
    cfg = make_config(tmp_path, *overrides)
    catalog = Catalog.from_config(cfg)
    script = "import sys, json; from flows.train import train_epoch; train_epoch(overrides=json.loads(sys.argv[1]))"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_API")}
    proc = subprocess.Popen([sys.executable, "-c", script, json.dumps(overrides)], cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 400
        status = None
        while time.monotonic() < deadline and proc.poll() is None:
            with catalog.read(spans=False) as con:
                rows = con.execute("SELECT status FROM epochs WHERE run_id = 'killrun'").fetchall()
            status = rows[0][0] if rows else None
            if status == "triplets_done":  # the train task has started
                time.sleep(4)
                break
            time.sleep(0.2)
        assert status == "triplets_done" and proc.poll() is None, f"never reached training (status {status})"
    finally:
        _kill_tree(proc.pid)
        proc.wait(timeout=30)

    with catalog.read() as con:
        before = con.execute("SELECT rollout_id, status, finished_at FROM rollouts WHERE run_id='killrun' ORDER BY 1").fetchall()
        outcome_spans = con.execute("SELECT count(*) FROM spans WHERE run_id='killrun' AND span_kind='rollout_outcome'").fetchall()
        assert con.execute("SELECT count(*) FROM policy_versions WHERE run_id='killrun'").fetchall() == [(0,)]
    assert len(before) == 6 and all(r[1] == "succeeded" for r in before)

    result = train_epoch(overrides=[*overrides, "trainer.passes=1"])
    assert result["epoch"] == 0 and result["status"] == "completed"
    with catalog.read() as con:
        after = con.execute("SELECT rollout_id, status, finished_at FROM rollouts WHERE run_id='killrun' ORDER BY 1").fetchall()
        assert con.execute("SELECT count(*) FROM spans WHERE run_id='killrun' AND span_kind='rollout_outcome'").fetchall() == outcome_spans
        assert con.execute("SELECT version, epoch FROM policy_versions WHERE run_id='killrun'").fetchall() == [(f"{POLICY}-v1", 0)]
    assert after == before  # no rollout ran again


def test_an_agent_without_an_agent_span_trains_and_its_calls_are_reported_as_no_agent(
    prefect_harness, tmp_path, vllm_server, collector, collector_config, tiny_model_dir
):
    # plain client code and agents in other languages often open no agent span: the MLflow metric name of such
    # calls crashed `arclight train` after the epoch had trained ('agent/(no agent)/calls')
    from rich.console import Console

    from flows.train import train_epoch
    from lightning_core.cli.progress import print_summary

    questions = [{"id": f"n{i}", "question": f"Say the word {w}.", "target": w} for i, w in enumerate(["xyzzy", "plugh"])]
    overrides = _overrides(tmp_path, vllm_server=vllm_server, collector=collector, collector_config=collector_config,
                           tiny_model_dir=tiny_model_dir, dataset=_dataset(tmp_path / "tasks.jsonl", questions),
                           **{"run_name": "agentless", "rollouts.agent": "tests.helpers.flow_agent:run_without_agent_span",
                              "policies": json.dumps([{"name": POLICY, "agent_match": ".*"}])})
    cfg = make_config(tmp_path, *overrides)
    result = train_epoch(overrides=overrides)
    assert result["status"] == "completed" and result["new_version"] == f"{POLICY}-v1"
    with Catalog.from_config(cfg).read() as con:
        assert con.execute("SELECT agent_name, policy, calls > 0, triplets > 0 FROM agent_epochs "
                           "WHERE run_id = 'agentless'").fetchall() == [(None, POLICY, True, True)]
    client = mlflow.MlflowClient(cfg.mlflow_uri)
    [run] = client.search_runs([client.get_experiment_by_name("flowtest").experiment_id],
                               filter_string="tags.`arclight.run_id` = 'agentless'")
    assert [m.value for m in client.get_metric_history(run.info.run_id, "agent/no_agent/calls")] == [8.0]
    console = Console(record=True, width=200)
    print_summary(cfg, console=console)
    assert "(no agent)" in console.export_text()


def test_a_run_stopped_by_the_agents_own_failures_trains_the_epoch_to_the_end_once_the_cause_is_fixed(
        prefect_harness, tmp_path, vllm_server, collector, collector_config, tiny_model_dir):
    # issue 51, finding 8: only planned rollouts and our failures ran again, so the same command stopped again on the
    # same old failures after the user had fixed the agent's backend
    from flows.train import train_epoch
    from lightning_core.epoch.failures import RunStopped

    marker = tmp_path / "backend-down"
    marker.touch()
    rows = [{"id": f"q{i}", "question": f"Say the word {w}.", "target": w, "fail_while": str(marker)}
            for i, w in enumerate(["xyzzy", "plugh"])]
    overrides = _overrides(tmp_path, vllm_server=vllm_server, collector=collector, collector_config=collector_config,
                           tiny_model_dir=tiny_model_dir, dataset=_dataset(tmp_path / "tasks.jsonl", rows),
                           **{"rollouts.agent": "tests.helpers.flow_agent:run_unless_marked", "run_name": "agent-down"})
    with pytest.raises(RunStopped) as err:
        train_epoch(overrides=overrides)
    assert "8 of 8 rollouts" in str(err.value) and "calculator backend unreachable (x8)" in str(err.value)
    assert "this round's 8 failed rollouts run again" in str(err.value)
    marker.unlink()  # the backend is back
    result = train_epoch(overrides=overrides)
    assert result["status"] == "completed" and result["new_version"] == f"{POLICY}-v1"
    cfg = make_config(tmp_path, *overrides)
    with Catalog.from_config(cfg).read() as con:
        assert con.execute("SELECT status, attempt, count(*) FROM rollouts WHERE run_id = 'agent-down' GROUP BY ALL"
                           ).fetchall() == [("succeeded", 1, 8)]  # each ran again as a new attempt
        assert con.execute("SELECT DISTINCT attempt FROM triplets WHERE run_id = 'agent-down'").fetchall() == [(1,)]


def test_an_evaluation_on_another_held_out_file_runs_its_own_rollouts_and_reports_its_own_figure(
        prefect_harness, tmp_path, vllm_server, collector, collector_config, tiny_model_dir):
    # issue 68, finding 10: `arclight evaluate --set rollouts.eval_dataset=<other>.jsonl` right after an evaluation
    # of the same version planned 3 rollouts and ran 0, then reported the first file's figure as its own
    from flows.train import evaluate

    held_out = _dataset(tmp_path / "test.jsonl", [  # the flow agent scores "constant" tasks 0.5
        {"id": f"test-{i:04d}", "behavior": "constant", "question": f"Say {i}.", "target": "-"} for i in range(3)])
    reworded = _dataset(tmp_path / "test_reworded.jsonl", [  # ... and these 1.0: the target "" is in every reply
        {"id": f"reph-{i:04d}", "question": f"Repeat the number {i}.", "target": ""} for i in range(3)])
    overrides = _overrides(tmp_path, vllm_server=vllm_server, collector=collector, collector_config=collector_config,
                           tiny_model_dir=tiny_model_dir, dataset=held_out,
                           **{"run_name": "evalsets", "rollouts.eval_dataset": held_out, "tracking.traces": "off"})
    cfg = make_config(tmp_path, *overrides)

    def rollouts_by_epoch():
        with Catalog.from_config(cfg).read() as con:
            return dict(con.execute("SELECT epoch, list(task_id ORDER BY task_id) FROM rollouts "
                                    "WHERE run_id = 'evalsets.eval' AND status = 'succeeded' GROUP BY epoch").fetchall())

    first = evaluate(overrides=overrides)
    second = evaluate(overrides=[*overrides, f"rollouts.eval_dataset={reworded}"])
    assert first["label"] == second["label"] == "base"  # one version serving, two held-out files
    assert second["eval_epoch"] != first["eval_epoch"]
    assert rollouts_by_epoch() == {first["eval_epoch"]: [f"test-{i:04d}" for i in range(3)],
                                   second["eval_epoch"]: [f"reph-{i:04d}" for i in range(3)]}  # 3 planned, 3 ran
    assert (first["dataset"], first["tasks"], first["reward_mean"], first["success_rate"]) == (held_out, 3, 0.5, 0.0)
    assert (second["dataset"], second["tasks"], second["success_rate"]) == (reworded, 3, 1.0)
    assert second["reward_mean"] == pytest.approx(1.0)

    again = evaluate(overrides=overrides)  # the first file again: the same evaluation, reused, nothing runs
    assert again == first and len(rollouts_by_epoch()) == 2


def test_an_evaluation_of_a_missing_held_out_file_says_so_before_any_server_is_asked_for(prefect_harness, tmp_path):
    """`arclight evaluate --set rollouts.eval_dataset=<a path that is not there>` started the collector, vLLM and the
    gateway (46 s for the calc example) before it said the file was missing. The services named here do not exist:
    the file's error must come first, or the run fails on them instead."""
    from flows.train import evaluate
    from lightning_core.rollouts.dataset import DatasetError

    dead = f"http://127.0.0.1:{free_port()}"
    missing = tmp_path / "nowhere" / "test.jsonl"
    with pytest.raises(DatasetError, match=rf"held-out dataset {missing} not found"):
        evaluate(overrides=[f"project_dir={tmp_path}", f"collector.endpoint={dead}", f"serving.urls={json.dumps([dead])}",
                            f"gateway.endpoint={dead}", f"rollouts.eval_dataset={missing}", "tracking.traces=off"])


def test_a_flow_logs_on_when_the_log_folder_of_an_earlier_flows_project_was_removed(prefect_harness, tmp_path):
    """A flow called from Python keeps logging to its project's file after it returns. When that folder goes (a
    deleted project, a test's temporary folder) and the handler had been closed meanwhile (``logging.config`` closes
    every handler when a library sets logging up again), the next record could not be written: logging's error
    report went through ``print``, which a ``log_prints`` flow turns into a record for the same handler, and CI's
    next two flows failed with a RecursionError. The folder is made again and the record written."""
    import logging
    import shutil

    from prefect import flow

    from lightning_core.common import logs

    project = tmp_path / "gone"
    logs.to_project_log(project)
    path = logs.log_path(project)
    handler = next(h for h in logging.getLogger().handlers if getattr(h, "baseFilename", None) == str(path))
    handler.close()
    shutil.rmtree(project)

    @flow(log_prints=True)
    def talk() -> int:
        logging.getLogger("flows.talk").warning("still here")
        return 1

    assert talk() == 1
    assert "still here" in path.read_text()


def test_a_secret_given_to_arclight_evaluate_with_set_takes_effect_but_is_not_a_parameter_of_its_flow_run(
        prefect_harness, tmp_path, monkeypatch):
    """Prefect keeps a flow run's parameters in its database and shows them in its UI: a token given with --set (the
    collector's here) reaches the flow and takes effect, and its value is in none of the run's parameters. A collector
    started with that token tells its lake folder only to a caller that sends the token, so the flow's refusal of a
    collector that writes to another lake proves the flow used it (and it stops there, before any vLLM)."""
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL
    from typer.testing import CliRunner

    from lightning_core.cli.main import app
    from lightning_core.ingest.service import start_collector

    secret = "SECRET-col-flow-71c3"
    theirs = make_config(tmp_path / "theirs", f"collector.token={secret}")
    collector = start_collector(theirs, log_dir=tmp_path)
    config = tmp_path / "ours" / "config.yaml"
    config.parent.mkdir()
    config.write_text("name: secrets\n")
    held_out = tmp_path / "ours" / "test.jsonl"  # a held-out file is checked before any service (the collector here)
    held_out.write_text(json.dumps({"task_id": "t0", "question": "1+1", "answer": "2"}) + "\n")
    monkeypatch.setenv("PREFECT_API_URL", PREFECT_API_URL.value())  # the command's flows report to the harness
    try:
        result = CliRunner().invoke(app, [
            "evaluate", str(config), "--set", f"collector.endpoint={collector.url}", "--set", f"collector.token={secret}",
            "--set", f"serving.urls=[http://127.0.0.1:{free_port()}]", "--set", f"rollouts.eval_dataset={held_out}"])
    finally:
        collector.stop()
    assert result.exit_code == 1, result.output
    assert f"writes to the lake {theirs.lake.path}" in result.output, result.output  # it held the collector's token

    with get_client(sync_client=True) as client:
        runs = [r for r in client.read_flow_runs() if r.parameters.get("config_path") == str(config)]
    assert len(runs) == 1 and runs[0].state.is_failed(), runs
    assert secret not in json.dumps(runs[0].parameters), runs[0].parameters
    assert f"collector.endpoint={collector.url}" in runs[0].parameters["overrides"]  # what is no secret stays readable
    assert "collector.token=***" in runs[0].parameters["overrides"]
