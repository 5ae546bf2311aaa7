"""A Ray head node for tests (``ray start --head``), in its own process group, stopped by killing that group."""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

from lightning_core.common.services import free_port

# One token for every Ray this pytest process starts or joins: Ray caches the token a process first read (its
# AuthenticationTokenLoader), so a second head with a token of its own refused this process's driver (CI at f728853:
# after test_flows_cluster's head, the single-rank Ctrl-C test's local Ray failed with "InvalidAuthToken").
_AUTH = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(16)}


@contextlib.contextmanager
def ray_auth() -> Iterator[None]:
    """This process's Ray token in the environment while the block runs, as it was before afterwards."""
    previous = {key: os.environ.get(key) for key in _AUTH}
    os.environ.update(_AUTH)
    try:
        yield
    finally:
        for key, value in previous.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@contextlib.contextmanager
def ray_head(temp: Path, *, num_cpus: int = 2, resources: dict[str, float] | None = None) -> Iterator[str]:
    """Start a head node with ``num_cpus`` and ``resources``; yield its address. Ray's token comes through this
    process's environment (set while the head runs), as a client of the cluster needs it."""
    port = free_port()
    ray = str(Path(sys.executable).with_name("ray"))
    # The raylet waits 30 s by default for its dashboard agent, which took over a minute to start on this
    # 2-core machine under load (the raylet then aborts: "Timed out waiting for file .../metrics_agent_port").
    # Ray 2.60 clients expect token authentication (RAY_AUTH_MODE=token) and look for the token in
    # ~/.ray/auth_token, which `ray start` writes only on some machines (not on a fresh one): the head
    # and every client get this process's token through the environment instead.
    env = {**os.environ, **_AUTH, "RAY_agent_register_timeout_ms": "300000"}
    proc = subprocess.Popen(
        [ray, "start", "--head", "--block", f"--port={port}", f"--num-cpus={num_cpus}", "--object-store-memory=200000000",
         "--include-dashboard=false", "--disable-usage-stats", f"--temp-dir={temp}",
         *([f"--resources={json.dumps(resources)}"] if resources else [])],
        env=env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    with ray_auth():
        try:
            deadline = time.monotonic() + 240
            while True:
                if (temp / "ray_current_cluster").is_file():
                    address = (temp / "ray_current_cluster").read_text().strip()
                    if subprocess.run([ray, "status", f"--address={address}"], capture_output=True).returncode == 0:
                        break
                assert proc.poll() is None and time.monotonic() < deadline, "ray start --head did not come up in 240 s"
                time.sleep(3)
            yield address
        finally:
            with contextlib.suppress(ProcessLookupError):  # SIGTERM first; Ray's processes outlive it, so then SIGKILL
                os.killpg(proc.pid, signal.SIGTERM)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(timeout=20)
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=20)
