"""prefect.yaml against a real local Prefect server: deploy --all, then run train-epoch/calc on a worker."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from lightning_core.store.catalog import Catalog
from lightning_core.common.services import free_port, start_process
from tests.conftest import REPO, make_config

pytestmark = pytest.mark.integration
PREFECT = str(Path(sys.executable).with_name("prefect"))


@pytest.fixture(scope="module")
def prefect_server(tmp_path_factory):
    home = tmp_path_factory.mktemp("prefect-home")
    port = free_port()
    env = {"PREFECT_HOME": str(home), "PREFECT_API_URL": f"http://127.0.0.1:{port}/api",
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PREFECT_SERVER_UI_ENABLED": "false",
           "PREFECT_LOGGING_LEVEL": "WARNING"}
    service = start_process(
        "prefect-server", [PREFECT, "server", "start", "--host", "127.0.0.1", "--port", str(port), "--no-services"],
        url=f"http://127.0.0.1:{port}", health_url=f"http://127.0.0.1:{port}/api/health",
        log_path=home / "server.log", env=env, timeout_s=120,
    )
    yield {**os.environ, **env, "ARCLIGHT_REPO": str(REPO)}
    service.stop()


def _prefect(env, *args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    proc = subprocess.run([PREFECT, "--no-prompt", *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"prefect {' '.join(args)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


def test_deploy_all_then_run_train_epoch_on_a_process_worker(prefect_server, tmp_path, vllm_server, collector, collector_config, tiny_model_dir):
    env = prefect_server
    _prefect(env, "work-pool", "create", "arclight", "--type", "process")
    _prefect(env, "deploy", "--all")
    listed = _prefect(env, "deployment", "ls").stdout
    for name in ("train-epoch/calc", "train/calc", "evaluate/calc"):
        assert name in listed

    dataset = tmp_path / "tasks.jsonl"
    dataset.write_text("".join(json.dumps({"id": f"q{i}", "question": f"Say {w}.", "target": w}) + "\n"
                               for i, w in enumerate(["xyzzy", "plugh"])))
    overrides = [
        f"project_dir={tmp_path}", "name=deployed", "run_name=deployed",
        f"lake.path={collector_config.lake.path}", f"lake.catalog={tmp_path / 'catalog.duckdb'}",
        f"collector.endpoint={collector.url}", f"serving.urls={json.dumps([vllm_server.url])}",
        f"gateway.port={free_port()}", f"model.path={tiny_model_dir}", "model.served_name=tiny",
        "policies=[{name: deployed}]", "rollouts.agent=tests.helpers.flow_agent:run",
        f"rollouts.agent_path={json.dumps([str(REPO)])}", f"rollouts.dataset={dataset}",
        "rollouts.group_size=3", "rollouts.timeout_s=60", "serving.redeploy=lora", "trainer.lora_r=4", "trainer.lora_alpha=8",
    ]
    run = _prefect(env, "deployment", "run", "train-epoch/calc", "--params", json.dumps({"overrides": overrides}))
    flow_run_id = next(line.split(":")[-1].strip() for line in run.stdout.splitlines() if "UUID" in line)
    # the server's fixture quiets Prefect to WARNING; the flow run logs at Prefect's default level, as a user's would
    worker = _prefect({**env, "PREFECT_LOGGING_LEVEL": "INFO"}, "worker", "start", "--pool", "arclight", "--run-once",
                      timeout=600)

    api = env["PREFECT_API_URL"]
    state = httpx.get(f"{api}/flow_runs/{flow_run_id}").json()["state"]
    assert state["type"] == "COMPLETED", state
    # the worker's output: a line per stage event (flows/logging.yml), no line per task run, no library noise; the
    # flow run's logs in the API keep Prefect's own records, and the libraries' output is in the project's log file
    shown = worker.stdout + worker.stderr
    assert "epoch 0: 6 rollouts planned, 6 to run" in shown, shown[-4000:]
    for noise in ("Task run", "Finished in state Completed()", "Loading weights", "FutureWarning", "MLflow database"):
        assert noise not in shown, f"{noise!r} in the worker's output:\n{shown[-4000:]}"
    records = httpx.post(f"{api}/logs/filter", json={"logs": {"flow_run_id": {"any_": [flow_run_id]}}, "limit": 200}).json()
    messages = [r["message"] for r in records]
    assert "epoch 0: 6 rollouts planned, 6 to run" in messages
    assert sum(1 for r in records if r["task_run_id"] and r["message"] == "Finished in state Completed()") >= 5
    logged = (tmp_path / ".arclight" / "logs" / "arclight.log").read_text()
    assert "FutureWarning" in logged and "MLflow database tables" in logged
    cfg = make_config(tmp_path, *overrides)
    with Catalog.from_config(cfg).read() as con:
        assert con.execute("SELECT epoch, status FROM epochs WHERE run_id = 'deployed'").fetchall() == [(0, "completed")]
        assert con.execute("SELECT count(*) FROM rollouts WHERE run_id = 'deployed' AND status = 'succeeded'").fetchall() == [(6,)]


def test_a_deployment_run_cancelled_from_the_server_ends_cancelled_with_no_process_left_and_no_exporter_noise(
        prefect_server, tmp_path, vllm_server, collector, collector_config, tiny_model_dir):
    # issue 51, finding 10: it held, but nothing guarded it; and the flow's own exporter warned about the collector it
    # had just stopped ("Max retries exceeded ... /v1/traces") after the run ended
    import time
    import uuid

    from tests.helpers.processes import gateway_calls
    from tests.test_main_job import _kill_marked, _marked

    env = prefect_server
    _prefect(env, "work-pool", "create", "arclight", "--type", "process", "--overwrite")
    _prefect(env, "deploy", "--all")
    dataset = tmp_path / "tasks.jsonl"
    dataset.write_text("".join(json.dumps({"id": f"q{i}", "question": f"Say {w}.", "turns": 40, "pause_s": 0.5}) + "\n"
                               for i, w in enumerate(["xyzzy", "plugh"])))
    gateway_port = free_port()
    overrides = [
        f"project_dir={tmp_path}", "name=cancelled", "run_name=cancelled",
        f"lake.path={tmp_path / 'lake'}", f"gateway.port={gateway_port}", f"collector.port={free_port()}",
        f"serving.urls={json.dumps([vllm_server.url])}", f"model.path={tiny_model_dir}", "model.served_name=tiny",
        "policies=[{name: cancelled}]", "rollouts.agent=tests.helpers.flow_agent:run_steady",
        f"rollouts.agent_path={json.dumps([str(REPO)])}", f"rollouts.dataset={dataset}", "rollouts.group_size=2",
        "rollouts.timeout_s=120", "serving.redeploy=lora",
    ]
    run = _prefect(env, "deployment", "run", "train-epoch/calc", "--params", json.dumps({"overrides": overrides}))
    flow_run_id = next(line.split(":")[-1].strip() for line in run.stdout.splitlines() if "UUID" in line)
    mark = f"cancel-{uuid.uuid4().hex[:8]}"
    worker_env = {**env, "PREFECT_LOGGING_LEVEL": "INFO", "ARCLIGHT_TEST_MARK": mark}
    log = tmp_path / "worker.log"
    with open(log, "wb") as out:
        worker = subprocess.Popen([PREFECT, "worker", "start", "--pool", "arclight", "--run-once"], cwd=REPO,
                                  env=worker_env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    api = env["PREFECT_API_URL"]
    try:
        deadline = time.monotonic() + 300
        while gateway_calls(f"http://127.0.0.1:{gateway_port}") < 4:  # the rollouts are in flight
            assert worker.poll() is None and time.monotonic() < deadline, log.read_text(errors="replace")[-3000:]
            time.sleep(0.2)
        assert any("lightning_core gateway" in c for _, c in _marked(mark))
        _prefect(env, "flow-run", "cancel", flow_run_id)
        cancelled = time.monotonic()
        worker.wait(timeout=120)
        took = time.monotonic() - cancelled
        time.sleep(5)  # anything the flow run left would still be sending by now
        left = [(pid, c) for pid, c in _marked(mark)]
    finally:
        _kill_marked(mark)
    state = httpx.get(f"{api}/flow_runs/{flow_run_id}").json()["state"]
    shown = log.read_text(errors="replace")
    assert state["type"] == "CANCELLED", (state, shown[-3000:])
    assert took < 60, took
    assert left == [], f"left running after the cancellation: {left}"
    for noise in ("Max retries exceeded", "/v1/traces", "Failed to export", "Traceback"):
        assert noise not in shown, f"{noise!r} in the worker's output:\n{shown[-4000:]}"
