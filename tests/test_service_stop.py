"""Stopping a service stops its whole process group, even after the group's leader died."""

from __future__ import annotations

import os
import signal
import subprocess
import time

from lightning_core.services import Service


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
