"""Agents that are programs (``rollouts.command``): one process per rollout, in any environment.

The programs know nothing of Arclight: a Python script run by another virtualenv's interpreter
(``.venv-agents``, built by setup), and a Node.js script with the OpenTelemetry JS SDK. They read
the rollout from their environment and standard input, as docs/agents.md says, and export to the
real collector; the model calls go through the real gateway to a real vLLM.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time

import pytest

from lightning_core.config import ArclightConfig, RolloutsConfig
from lightning_core.pipeline.triplets import materialize_triplets
from lightning_core.rollouts.runner import (AGENT, FAILED, SUCCEEDED, TIMED_OUT, RolloutSpec, RunnerSettings,
                                            flush_outcome_spans, run_rollout, settings_from_config)
from lightning_core.serving.client import GatewayClient
from lightning_core.store.catalog import Catalog
from lightning_core.store.outputs import load_triplets
from tests.conftest import REPO
from tests.helpers.tokens import gateway_tokens

AGENTS = REPO / "tests" / "command_agents"
OTEL_AGENT = AGENTS / "otel_agent.py"
NODE_AGENT = REPO / "tests" / "node_sender" / "command_agent.mjs"
AGENTS_PYTHON = REPO / ".venv-agents" / "bin" / "python"


def _settings(collector, command: list[str], *, gateway_url: str = "http://127.0.0.1:8400", **kw) -> RunnerSettings:
    return RunnerSettings(agent=None, collector_url=collector.url, gateway_url=gateway_url, model=kw.pop("model", "default"),
                          command=tuple(command), command_cwd=str(AGENTS), timeout_s=kw.pop("timeout_s", 60), **kw)


def _spec(run_id: str, rollout_id: str, task: dict) -> RolloutSpec:
    return RolloutSpec(run_id, 0, rollout_id, f"task-{rollout_id}", f"task-{rollout_id}", 0, task)


def _lake_rows(cfg, sql: str, params: list) -> list[tuple]:
    with Catalog.from_config(cfg).read() as con:
        return con.execute(sql, params).fetchall()


def test_a_program_gets_the_task_on_stdin_and_the_rollout_in_its_environment(collector, collector_config, tmp_path):
    report = tmp_path / "report.json"
    settings = _settings(collector, [sys.executable, str(OTEL_AGENT)], collector_token="s3cret token",
                         command_env={"ARCLIGHT_MODEL": "overridden", "MY_TOOL_URL": "http://tools"},
                         resources={"max_turns": 3}, temperature=0.7, prompt_versions={"system": "v2"})
    task = {"id": "t-7", "behaviour": "report", "question": "2 + 2 = ?", "report_file": str(report)}
    outcome = run_rollout(settings, _spec("cmd", "cmd-report", task))
    # the last line of output is the reward; the lines before it are the program's own
    assert (outcome.status, outcome.reward, outcome.error) == (SUCCEEDED, 0.25, None)
    assert flush_outcome_spans(run_id="cmd", epoch=0)
    seen = json.loads(report.read_text())
    env = seen["env"]
    assert seen["task"] == task and seen["cwd"] == str(AGENTS) and seen["python"] == sys.executable
    assert env["OPENAI_BASE_URL"] == env["ARCLIGHT_BASE_URL"] == "http://127.0.0.1:8400/rollout/cmd-report/v1"
    assert json.loads(env["ARCLIGHT_TASK"]) == task and json.loads(env["ARCLIGHT_RESOURCES"]) == {"max_turns": 3}
    assert (env["ARCLIGHT_RUN_ID"], env["ARCLIGHT_EPOCH"], env["ARCLIGHT_ROLLOUT_ID"], env["ARCLIGHT_ATTEMPT"]) == (
        "cmd", "0", "cmd-report", "0")
    assert (env["ARCLIGHT_GROUP_ID"], env["ARCLIGHT_SAMPLE_INDEX"]) == ("task-cmd-report", "0")
    assert env["ARCLIGHT_MODEL"] == "overridden" and env["MY_TOOL_URL"] == "http://tools"  # command_env wins
    assert env["ARCLIGHT_TEMPERATURE"] == "0.7" and env["ARCLIGHT_MODE"] == "train"
    assert env["OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"] == f"{collector.url}/v1/traces"
    assert env["OTEL_EXPORTER_OTLP_PROTOCOL"] == "http/protobuf"
    assert env["OTEL_EXPORTER_OTLP_HEADERS"] == "authorization=Bearer%20s3cret%20token"
    assert env["OTEL_RESOURCE_ATTRIBUTES"].split(",") == [
        "arclight.run_id=cmd", "arclight.epoch=0", "arclight.rollout_id=cmd-report", "arclight.task_id=task-cmd-report",
        "arclight.attempt=0", "arclight.prompt.system.version=v2"]
    # TRACEPARENT is the runner's rollout span, so the program's spans can continue its trace
    (trace_id, span_id), = _lake_rows(collector_config, "SELECT trace_id, span_id FROM spans WHERE run_id = 'cmd' "
                                      "AND rollout_id = 'cmd-report' AND span_kind = 'rollout'", [])
    assert env["TRACEPARENT"] == f"00-{trace_id}-{span_id}-01"


def test_a_program_holds_the_agent_token_and_never_the_gateways_admin_token(collector, tmp_path, monkeypatch):
    # issue 68: every agent's api_key was the gateway token, which also opens the admin routes (POST /admin/weights)
    monkeypatch.setenv("ARCLIGHT_GATEWAY_TOKEN", "admin-s3cret")  # exported for `arclight train`, as docs/scaling.md does
    config = ArclightConfig(project_dir=AGENTS, rollouts=RolloutsConfig(command=[sys.executable, str(OTEL_AGENT)]))
    settings = settings_from_config(config, collector_url=collector.url, gateway_url="http://127.0.0.1:8400", model="m")
    report = tmp_path / "report.json"
    outcome = run_rollout(settings, _spec("cmd", "cmd-token", {"id": "t-8", "behaviour": "report",
                                                               "report_file": str(report)}))
    assert outcome.status == SUCCEEDED and settings.gateway_token == "admin-s3cret"  # the runner registers with it
    env = json.loads(report.read_text())["env"]
    assert [k for k, v in env.items() if "admin-s3cret" in v] == []
    assert env["OPENAI_API_KEY"] == env["ARCLIGHT_API_KEY"] and env["OPENAI_API_KEY"].startswith("agent-")


def test_a_failing_program_is_the_agents_failure_with_its_status_and_stderr(collector):
    outcome = run_rollout(_settings(collector, [sys.executable, str(OTEL_AGENT)]),
                          _spec("cmd", "cmd-fail", {"id": "t-1", "behaviour": "fail"}))
    assert (outcome.status, outcome.error_kind, outcome.reward) == (FAILED, AGENT, None)
    assert "exited with status 3" in outcome.error and "cannot solve t-1: the tool is broken" in outcome.error


def test_a_hung_program_and_what_it_started_are_stopped_at_the_timeout(collector, tmp_path):
    pid_file = tmp_path / "child.pid"
    started = time.monotonic()
    outcome = run_rollout(_settings(collector, [sys.executable, str(OTEL_AGENT)], timeout_s=4),
                          _spec("cmd", "cmd-hang", {"id": "t-2", "behaviour": "hang", "pid_file": str(pid_file)}))
    assert outcome.status == TIMED_OUT and time.monotonic() - started < 20
    child = int(pid_file.read_text())
    deadline = time.monotonic() + 10
    while _alive(child) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _alive(child), "the program's own child outlived the rollout"


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ")[1][0] != "Z"
    except FileNotFoundError:
        return False


def test_the_command_is_checked_before_any_rollout(tmp_path):
    (tmp_path / "bin").mkdir()
    script = tmp_path / "bin" / "agent"
    script.write_text("#!/bin/sh\necho 1\n")
    script.chmod(0o755)
    config = ArclightConfig(project_dir=tmp_path, rollouts=RolloutsConfig(command="bin/agent --fast 'two words'"))
    settings = settings_from_config(config, collector_url="http://c", gateway_url="http://g", model="m")
    assert settings.command == (str(script), "--fast", "two words") and settings.command_cwd == str(tmp_path)
    assert settings_from_config(ArclightConfig(project_dir=tmp_path, rollouts=RolloutsConfig(command=["sh", "-c", "true"])),
                                collector_url="http://c", gateway_url="http://g", model="m").command[0] == shutil.which("sh")
    with pytest.raises(ValueError, match=r"'bin/missing' is not an executable file at .*bin/missing"):
        settings_from_config(ArclightConfig(project_dir=tmp_path, rollouts=RolloutsConfig(command=["bin/missing"])),
                             collector_url="http://c", gateway_url="http://g", model="m")
    with pytest.raises(ValueError, match="'no-such-agent-xyz' is not on PATH"):
        settings_from_config(ArclightConfig(project_dir=tmp_path, rollouts=RolloutsConfig(command="no-such-agent-xyz")),
                             collector_url="http://c", gateway_url="http://g", model="m")
    with pytest.raises(ValueError, match="are both set"):
        RolloutsConfig(agent="a:b", command="sh")
    with pytest.raises(ValueError, match="rollouts.command is empty"):
        RolloutsConfig(command="")


# --- through the real gateway and vLLM: another virtualenv's Python, and Node.js ----------------------------------


@pytest.fixture(scope="module")
def admin(gateway) -> GatewayClient:
    return GatewayClient(gateway.url, token=gateway.token)


def _run_through_gateway(admin, gateway, collector, *, run_id: str, command: list[str], task: dict):
    rollout_id = f"{run_id}-r0"
    spec = _spec(run_id, rollout_id, task)
    settings = _settings(collector, command, gateway_url=gateway.url, model="tiny")
    outcome = run_rollout(settings, spec, before_attempt=lambda attempt: admin.register_rollout(
        rollout_id=rollout_id, run_id=run_id, epoch=0, task_id=spec.task_id, attempt=attempt))
    assert flush_outcome_spans(run_id=run_id, epoch=0) and admin.flush()
    return outcome


@pytest.mark.integration
def test_a_python_agent_in_its_own_virtualenv_trains_through_the_gateway(admin, gateway, collector, collector_config):
    assert AGENTS_PYTHON.is_file(), f"{AGENTS_PYTHON} is missing: run `make setup` (scripts/setup_agents.sh builds it)"
    probe = subprocess.run([str(AGENTS_PYTHON), "-c", "import lightning_core"], capture_output=True, cwd="/")
    assert probe.returncode != 0, "the agents' virtualenv must not see Arclight's package"
    outcome = _run_through_gateway(admin, gateway, collector, run_id="cmd-venv", command=[str(AGENTS_PYTHON), str(OTEL_AGENT)],
                                   task={"questions": ["What is 2 + 3?", "Name a colour."], "reward": 0.5})
    assert (outcome.status, outcome.error, outcome.reward) == (SUCCEEDED, None, None)  # its reward is a span
    report = materialize_triplets(collector_config, run_id="cmd-venv", epoch=0)
    triplets = load_triplets(collector_config, run_id="cmd-venv", epoch=0, policy="default").to_pylist()
    recorded = gateway_tokens(collector_config, "cmd-venv")
    assert (report.llm_calls, report.rewards, report.silences) == (2, 1, [])
    assert len(recorded) == 2 and {t["response_id"] for t in triplets} == set(recorded)
    for t in triplets:
        assert (t["prompt_token_ids"], t["response_token_ids"]) == recorded[t["response_id"]]
        assert t["agent_name"] == "solver" and t["reward"] == 0.5 and t["rollout_id"] == "cmd-venv-r0"
    # the program continued the runner's trace: its agent span hangs under the rollout span
    (parent_kind,), = _lake_rows(collector_config, "SELECT p.span_kind FROM spans a JOIN spans p ON p.span_id = a.parent_id "
                                 "WHERE a.run_id = 'cmd-venv' AND a.name = 'invoke_agent solver'", [])
    assert parent_kind == "rollout"


@pytest.mark.integration
def test_a_nodejs_agent_gives_its_reward_as_its_last_line_of_output(admin, gateway, collector, collector_config):
    if shutil.which("node") is None:
        pytest.fail("node is needed for the Node.js command agent (apt-get install nodejs npm)")
    if not (NODE_AGENT.parent / "node_modules" / "@opentelemetry" / "resources").is_dir():
        subprocess.run(["npm", "ci", "--no-audit", "--no-fund"], cwd=NODE_AGENT.parent, check=True, capture_output=True,
                       timeout=300)
    outcome = _run_through_gateway(admin, gateway, collector, run_id="cmd-node", command=["node", str(NODE_AGENT)],
                                   task={"questions": ["What is 2 + 3?", "Name a colour."], "reward": 0.75})
    assert (outcome.status, outcome.error, outcome.reward) == (SUCCEEDED, None, 0.75)
    report = materialize_triplets(collector_config, run_id="cmd-node", epoch=0)
    triplets = load_triplets(collector_config, run_id="cmd-node", epoch=0, policy="default").to_pylist()
    recorded = gateway_tokens(collector_config, "cmd-node")
    assert (report.llm_calls, report.rewards, report.silences) == (2, 1, [])
    assert len(recorded) == 2 and sorted(t["response_id"] for t in triplets) == sorted(recorded)
    for t in triplets:
        assert (t["prompt_token_ids"], t["response_token_ids"]) == recorded[t["response_id"]]
        assert t["agent_name"] == "solver" and t["reward"] == 0.75
    # the OTel JS SDK read the resource from OTEL_RESOURCE_ATTRIBUTES: the rollout's context, epoch included
    rows = _lake_rows(collector_config, "SELECT DISTINCT rollout_id, task_id, attempt, service_name FROM spans "
                      "WHERE run_id = 'cmd-node' AND name LIKE 'chat%' AND span_kind IS NULL", [])
    assert rows == [("cmd-node-r0", "task-cmd-node-r0", 0, "arclight-agent")]


# --- issue 68, finding 1: what an agent can do to the gateway, in a real epoch ------------------------------------


ATTACKS = ["manifest-absolute", "manifest-dotdot", "manifest-deep", "uri-empty-segment", "uri-empty-segment-again",
           "uri-dotdot"]


@pytest.mark.integration
def test_a_command_agent_in_an_epoch_can_neither_write_nor_delete_outside_the_gateways_folder(
        prefect_harness, tmp_path, vllm_server, collector, collector_config, tiny_model_dir):
    import os

    from flows.train import train_epoch
    from lightning_core.common.services import free_port
    from lightning_core.serving.vllm import weights_dir
    from tests.conftest import make_config

    project, folder = tmp_path / "project", tmp_path / "agent"
    project.mkdir(), folder.mkdir()
    store = tmp_path / "published"
    tasks = [{"id": "attack", "question": "Say xyzzy.", "attack": str(folder), "store": str(store)},
             {"id": "plain", "question": "Say plugh."}]
    (tmp_path / "tasks.jsonl").write_text("".join(json.dumps(t) + "\n" for t in tasks))
    settings = {
        "project_dir": str(project), "lake.path": str(collector_config.lake.path),
        "lake.catalog": str(project / "catalog.duckdb"), "name": "attacked", "run_name": "attacked",
        "collector.endpoint": collector.url, "serving.urls": json.dumps([vllm_server.url]), "gateway.port": str(free_port()),
        "model.path": str(tiny_model_dir), "model.served_name": "tiny", "policies": json.dumps([{"name": "attacked"}]),
        "rollouts.command": f"{sys.executable} {AGENTS / 'weights_attack.py'}", "rollouts.dataset": str(tmp_path / "tasks.jsonl"),
        "rollouts.group_size": "2", "rollouts.timeout_s": "60", "trainer.micro_batch_size": "4", "trainer.lora_r": "4",
        "trainer.lora_alpha": "8", "serving.redeploy": "lora", "serving.weights_uri": f"file://{store}",
    }
    overrides = [f"{k}={v}" for k, v in settings.items()]
    cfg = make_config(project, *overrides)
    # what an unchecked fetch would prune first: another policy's fetched version, and a folder beside the weights
    other, beside = weights_dir(cfg) / "other" / "other-v1", weights_dir(cfg).parent / "beside"
    other.mkdir(parents=True), beside.mkdir()
    (other / "adapter_model.safetensors").write_bytes(b"another policy's weights")
    (beside / "state").write_text("the gateway's")
    for path in (other.parent, beside):
        os.utime(path, (1, 1))
    result = train_epoch(overrides=overrides)
    statuses = json.loads((folder / "statuses.json").read_text())
    # its own token and none open no admin route; the admin token a process of the user can read in the gateway's
    # environment gets past that, and then the store (403) and the names and the manifest (422) refuse it
    assert {s for label, s in statuses.items() if "admin" not in label} == {401}, statuses
    stolen = {label.rsplit(", ", 1)[0]: s for label, s in statuses.items() if label.endswith("stolen admin token")}
    assert stolen == {**{f"{attack}, own store": 403 for attack in ATTACKS}, **{f"{attack}, configured store": 422
                                                                                 for attack in ATTACKS}}, statuses
    outside = [str(p) for p in tmp_path.rglob("*") if "outside" in p.name and not {folder, store} & set(p.parents)]
    assert outside == []
    assert (other / "adapter_model.safetensors").read_bytes() == b"another policy's weights"
    assert (beside / "state").read_text() == "the gateway's"
    # the flow's own admin calls still authenticate: it registered every rollout and fetched the version it trained
    assert result["status"] == "completed" and result["new_version"] == "attacked-v1", result
    assert sorted(p.name for p in weights_dir(cfg).iterdir()) == ["attacked", "other"]
