"""Stopping a service stops its whole process group, even after the group's leader died, and removes its scratch folder."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from lightning_core.common.services import Service, ServiceError, free_port, start_process


def test_stop_kills_what_a_dead_leader_left_in_its_process_group(tmp_path):
    pid_file = tmp_path / "child.pid"
    leader = subprocess.Popen(["bash", "-c", f"sleep 300 & echo $! > {pid_file}; wait"], start_new_session=True)
    deadline = time.monotonic() + 10
    while not (pid_file.exists() and pid_file.read_text().strip()) and time.monotonic() < deadline:
        time.sleep(0.05)
    child = int(pid_file.read_text())
    leader.send_signal(signal.SIGKILL)  # as a crashed vLLM API server: its engine core lives on
    leader.wait(10)
    os.kill(child, 0)  # still running
    Service(name="vllm0", url="http://127.0.0.1:9", health_url="http://127.0.0.1:9/health", process=leader).stop()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if not _running(child):
            return
        time.sleep(0.05)
    raise AssertionError(f"process {child} of the dead leader's group is still running")


def _running(pid: int) -> bool:
    """True while ``pid`` runs; a zombie (killed, not yet reaped by an init that may never reap) has stopped."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_stop_removes_the_scratch_folder_of_the_process(tmp_path):
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    (scratch / "engine.sock").write_text("left by the server")
    process = subprocess.Popen(["sleep", "300"], start_new_session=True)
    Service(name="vllm0", url="http://127.0.0.1:9", health_url="http://127.0.0.1:9/health", process=process,
            scratch=scratch).stop()
    assert process.poll() is not None
    assert not scratch.exists()


def test_a_server_that_dies_during_start_up_leaves_no_scratch_folder(tmp_path):
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    url = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(ServiceError, match="exited with code 3 during start-up"):
        start_process("doomed", [sys.executable, "-c", "import sys; sys.exit(3)"], url=url, health_url=f"{url}/health",
                      log_path=tmp_path / "doomed.log", timeout_s=30, scratch=scratch)
    assert not scratch.exists()


@pytest.mark.integration
def test_vllm_keeps_its_temporary_files_in_a_folder_of_its_own(vllm_server):
    """Each vLLM start used to leave ZeroMQ sockets and a ``vllm_dist_*`` file in /tmp for good."""
    scratch = vllm_server.scratch
    assert scratch is not None and scratch.is_dir()
    entries = list(scratch.iterdir())
    assert any(entry.is_socket() for entry in entries), entries
    assert any(entry.name.startswith("vllm_dist_") for entry in entries), entries


def test_servers_started_side_by_side_fail_at_the_first_death_and_leave_none_running(tmp_path, tiny_model_dir):
    """vLLM replicas start together: one that dies ends the start at once (not after the others' timeout), the error
    names it, and the ones still starting are stopped."""
    from lightning_core.config import load_config
    from lightning_core.serving.vllm import start_vllm_replicas

    port = free_port()
    fake = tmp_path / "python"  # stands in for vLLM's interpreter: the second server dies, the first never answers
    fake.write_text(f"#!/bin/bash\necho $$ >> {tmp_path}/pids\n"
                    f"case \" $* \" in *\" --port {port + 1} \"*) echo 'no such model'; exit 3;; esac\nexec sleep 300\n")
    fake.chmod(0o755)
    cfg = load_config(None, overrides=[f"project_dir={tmp_path}", f"serving.vllm_python={fake}", f"model.path={tiny_model_dir}",
                                       "serving.replicas=2", f"serving.port={port}", "serving.startup_timeout_s=120"])
    started = time.monotonic()
    with pytest.raises(ServiceError, match=r"vllm1 exited with code 3 during start-up[\s\S]*no such model"):
        start_vllm_replicas(cfg)
    assert time.monotonic() - started < 30
    pids = [int(p) for p in (tmp_path / "pids").read_text().split()]
    assert len(pids) == 2 and not any(_running(pid) for pid in pids)


def test_a_vllm_start_past_its_time_limit_names_the_setting_to_raise_and_the_machines_load(tmp_path, tiny_model_dir):
    """A cold vLLM start on a loaded machine ran past 300 s in the main job's test: the error said only "did not
    answer within 300 s", naming neither the setting nor why."""
    from lightning_core.config import load_config
    from lightning_core.serving.vllm import start_vllm

    fake = tmp_path / "python"  # stands in for vLLM's interpreter: it runs and never answers
    fake.write_text(f"#!/bin/bash\necho $$ >> {tmp_path}/pids\nexec sleep 300\n")
    fake.chmod(0o755)
    cfg = load_config(None, overrides=[f"project_dir={tmp_path}", f"serving.vllm_python={fake}", f"model.path={tiny_model_dir}",
                                       f"serving.port={free_port()}", "serving.startup_timeout_s=1"])
    with pytest.raises(ServiceError) as failed:
        start_vllm(cfg)
    assert "within 1 s: a slow or busy machine needs more time, set serving.startup_timeout_s (now 1)" in str(failed.value)
    assert "the machine's load average is " in str(failed.value) and " cores" in str(failed.value)
    pids = [int(p) for p in (tmp_path / "pids").read_text().split()]
    assert pids and not any(_running(pid) for pid in pids)


def test_a_stack_starts_its_collector_and_gateway_beside_vllm_and_stops_both_when_vllm_fails(tmp_path, tiny_model_dir):
    """``start_stack`` starts the collector, vLLM and the gateway side by side: the gateway answers while vLLM is still
    starting (one after the other, it started only once vLLM answered). A vLLM that then dies ends the start with its
    error, and the collector and gateway it started are stopped."""
    from lightning_core.epoch.stack import start_stack
    from tests.conftest import make_config

    cfg = make_config(tmp_path, f"serving.vllm_python={tmp_path / 'python'}", f"model.path={tiny_model_dir}")
    fake = tmp_path / "python"  # stands in for vLLM's interpreter: waits for both other servers, then dies
    fake.write_text(
        "#!/bin/bash\n"
        "up() { (exec 3<>/dev/tcp/127.0.0.1/$1) 2>/dev/null; }\n"
        f"for i in $(seq 300); do up {cfg.collector.port} && up {cfg.gateway.port} && "
        "{ echo 'the collector and the gateway answered while vLLM was starting'; exit 3; }; sleep 0.1; done\n"
        "echo 'the collector and the gateway did not answer while vLLM was starting'; exit 4\n")
    fake.chmod(0o755)
    with pytest.raises(ServiceError, match=r"vllm0 exited with code 3 during start-up[\s\S]*answered while vLLM was starting"):
        start_stack(cfg, log_dir=tmp_path / "logs")
    for port in (cfg.collector.port, cfg.gateway.port):
        with pytest.raises(OSError):
            socket.create_connection(("127.0.0.1", port), timeout=2).close()
