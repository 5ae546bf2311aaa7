"""Our servers die under a flow (issue 40): each is restarted during the rollout stage, the rollouts it failed run
again, and none of them trains as it was. A SIGKILL, as an OOM kill or a crash would, while rollouts are in flight."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import pytest

from lightning_core.store.catalog import Catalog
from lightning_core.common.services import free_port
from tests.conftest import REPO, make_config
from tests.helpers.processes import gateway_calls, pids_matching

pytestmark = pytest.mark.integration

POLICY = "faults"


def _config(tmp_path: Path, tiny_model_dir: Path, *, tasks: int, run_name: str):
    questions = [{"id": f"q{i}", "question": f"Say the word {w}.", "turns": 4, "pause_s": 0.5}
                 for i, w in enumerate(["xyzzy", "plugh", "qwfp", "zork"][:tasks])]
    dataset = tmp_path / "tasks.jsonl"
    dataset.write_text("".join(json.dumps(q) + "\n" for q in questions))
    settings = {
        "project_dir": str(tmp_path), "name": "faults", "run_name": run_name,
        "collector.port": str(free_port()), "gateway.port": str(free_port()), "serving.port": str(free_port()),
        "collector.compact_idle_s": "3600",
        "model.path": str(tiny_model_dir), "model.served_name": "tiny", "serving.dtype": "float32",
        "serving.max_model_len": "512", "serving.redeploy": "lora",
        "policies": json.dumps([{"name": POLICY}]),
        "rollouts.agent": "tests.helpers.flow_agent:run_steady", "rollouts.agent_path": json.dumps([str(REPO)]),
        "rollouts.dataset": str(dataset), "rollouts.group_size": "4", "rollouts.concurrency": "8",
        "rollouts.timeout_s": "60",
        "trainer.micro_batch_size": "8", "trainer.lora_r": "4", "trainer.lora_alpha": "8",
    }
    overrides = [f"{k}={v}" for k, v in settings.items()]
    return make_config(tmp_path, *overrides), overrides


def _kill_when(cfg, *, calls: float, pattern: str, timeout_s: float = 300) -> threading.Thread:
    """In the background: once the gateway has answered ``calls`` calls, SIGKILL the process group of the server whose
    command line matches ``pattern``. The thread's ``killed`` attribute holds its pid."""
    def kill() -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if gateway_calls(cfg.gateway.url) >= calls:
                [pid] = pids_matching(pattern)
                os.killpg(pid, signal.SIGKILL)
                thread.killed = pid
                return
            time.sleep(0.1)

    thread = threading.Thread(target=kill, daemon=True)
    thread.killed = None
    thread.start()
    return thread


def _assert_nothing_ours_trained(cfg, run_id: str) -> list[tuple]:
    """Every triplet is of a rollout that succeeded, from its last attempt, with no call our side failed."""
    with Catalog.from_config(cfg).read() as con:
        wrong = con.execute(
            "SELECT t.rollout_id, t.attempt, r.attempt, r.status FROM triplets t JOIN rollouts r USING (rollout_id) "
            "WHERE t.run_id = ? AND (t.attempt <> r.attempt OR r.status <> 'succeeded')", [run_id]).fetchall()
        failed_calls = con.execute(
            "SELECT count(*) FROM triplets t JOIN spans s ON s.span_id = t.span_id AND s.trace_id = t.trace_id "
            "WHERE t.run_id = ? AND json_extract(s.attributes, '$.\"arclight.llm.upstream_failed\"')::BOOLEAN",
            [run_id]).fetchall()[0][0]
        rows = con.execute("SELECT rollout_id, status, error_kind, infra_failures, attempt FROM rollouts "
                           "WHERE run_id = ? ORDER BY 1", [run_id]).fetchall()
    assert wrong == [] and failed_calls == 0
    return rows


def test_a_killed_vllm_is_restarted_during_the_rollouts_and_the_rollouts_it_failed_run_again(
        prefect_harness, tmp_path, tiny_model_dir):
    from flows.train import train_epoch

    cfg, overrides = _config(tmp_path, tiny_model_dir, tasks=2, run_name="vllm-killed")
    killer = _kill_when(cfg, calls=6, pattern=rf"vllm\.entrypoints\.openai\.api_server .*--port {cfg.serving.port} ")
    result = train_epoch(overrides=overrides)
    killer.join(timeout=5)
    assert killer.killed is not None, "vLLM was never killed: the rollouts ended first"
    assert result["status"] == "completed" and result["new_version"] == f"{POLICY}-v1"
    rows = _assert_nothing_ours_trained(cfg, "vllm-killed")
    assert any(r[3] > 0 for r in rows)  # some ran again ...
    assert all(r[1] == "succeeded" and r[2] is None for r in rows)  # ... and finished
    with Catalog.from_config(cfg).read(spans=False) as con:
        incidents = json.loads(con.execute("SELECT incidents FROM epochs WHERE run_id = 'vllm-killed'").fetchall()[0][0])
    assert any(o.startswith("vllm0 exited with status -9") and o.endswith("restarted") for o in incidents["outages"])
    assert incidents["retried"] == sum(r[3] > 0 for r in rows) and incidents["left_out"] == 0
    assert killer.killed not in pids_matching(rf"--port {cfg.serving.port} ")  # stopped with the stack: nothing left either


def test_a_killed_collector_and_a_killed_gateway_are_restarted_and_every_rollouts_spans_arrive(
        prefect_harness, tmp_path, tiny_model_dir):
    from flows.train import train_epoch

    cfg, overrides = _config(tmp_path, tiny_model_dir, tasks=3, run_name="servers-killed")
    collector = _kill_when(cfg, calls=6, pattern=rf"lightning_core collector .*--port {cfg.collector.port} ")

    def then_the_gateway() -> None:
        collector.join(timeout=300)
        deadline = time.monotonic() + 60
        while not pids_matching(rf"lightning_core collector .*--port {cfg.collector.port} ") and time.monotonic() < deadline:
            time.sleep(0.2)  # back
        [pid] = pids_matching(rf"lightning_core gateway .*--port {cfg.gateway.port} ")
        time.sleep(1.0)
        os.killpg(pid, signal.SIGKILL)
        gateway.killed = pid

    gateway = threading.Thread(target=then_the_gateway, daemon=True)
    gateway.killed = None
    gateway.start()
    result = train_epoch(overrides=overrides)
    gateway.join(timeout=5)
    assert collector.killed is not None and gateway.killed is not None, "the rollouts ended before both were killed"
    assert result["status"] == "completed" and result["new_version"] == f"{POLICY}-v1"
    rows = _assert_nothing_ours_trained(cfg, "servers-killed")
    assert any(r[3] > 0 for r in rows) and all(r[1] == "succeeded" for r in rows)
    with Catalog.from_config(cfg).read() as con:
        incidents = json.loads(con.execute("SELECT incidents FROM epochs WHERE run_id = 'servers-killed'").fetchall()[0][0])
        arrived = con.execute(
            "SELECT r.rollout_id, count(*) FILTER (WHERE s.span_kind = 'rollout'), count(*) FILTER (WHERE s.span_kind = 'llm'), "
            "count(*) FILTER (WHERE s.span_kind = 'reward') FROM rollouts r LEFT JOIN spans s ON s.rollout_id = r.rollout_id "
            "AND s.attempt = r.attempt WHERE r.run_id = 'servers-killed' GROUP BY 1").fetchall()
    outages = incidents["outages"]
    assert any(o.startswith("collector exited with status -9") and o.endswith("restarted") for o in outages)
    assert any(o.startswith("gateway exited with status -9") and o.endswith("restarted") for o in outages)
    assert len(arrived) == 12 and all(row[1:] == (1, 4, 1) for row in arrived)  # every succeeded rollout's spans
