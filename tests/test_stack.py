"""arclight up / status / down: long-lived services recorded per project, and flows attaching to them."""

from __future__ import annotations

import json
import subprocess
import sys

import httpx
import pytest

from lightning_core.stack import start_stack, state_path
from lightning_core.services import ServiceError, free_port
from tests.conftest import REPO, make_config

pytestmark = pytest.mark.integration


def _arclight(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lightning_core", *args], cwd=REPO, capture_output=True, text=True, timeout=300)


def test_up_status_down_manage_background_services_that_flows_attach_to(tmp_path, vllm_server, tiny_model_dir):
    config = tmp_path / "config.yaml"
    config.write_text(
        f"name: stacktest\nmodel:\n  path: {tiny_model_dir}\n  served_name: tiny\n"
        f"serving:\n  urls: [{vllm_server.url}]\n"
        f"collector:\n  port: {free_port()}\ngateway:\n  port: {free_port()}\n"
    )
    up = _arclight("up", str(config))
    assert up.returncode == 0, up.stderr
    record = json.loads(state_path(make_config(tmp_path)).read_text())
    assert set(record) == {"collector", "vllm", "gateway"}
    assert record["collector"]["pid"] and record["gateway"]["pid"] and record["vllm"]["pid"] is None  # vLLM was attached
    try:
        status = _arclight("status", str(config))
        assert status.returncode == 0 and status.stderr.count("healthy") == 3
        # a second `up` finds everything healthy and starts nothing new
        again = _arclight("up", str(config))
        assert again.returncode == 0
        assert json.loads(state_path(make_config(tmp_path)).read_text())["gateway"]["pid"] == record["gateway"]["pid"]
        # a flow's stack attaches to the recorded services instead of starting its own
        cfg = make_config(tmp_path, f"model.path={tiny_model_dir}", f"serving.urls={json.dumps([vllm_server.url])}")
        cfg = cfg.model_copy(update={"project_dir": tmp_path})
        stack = start_stack(cfg)
        assert [s.owned for s in stack.services()] == [False, False, False]
        assert stack.gateway.url == record["gateway"]["url"]
        stack.stop()  # stops nothing it does not own
        assert httpx.get(record["gateway"]["health_url"]).status_code == 200
    finally:
        down = _arclight("down", str(config))
    assert down.returncode == 0 and "collector" in down.stderr and "gateway" in down.stderr
    assert not state_path(make_config(tmp_path)).exists()
    status = _arclight("status", str(config))
    assert status.returncode == 1 and "no services recorded" in status.stderr
    with pytest.raises(httpx.HTTPError):
        httpx.get(record["collector"]["health_url"], timeout=2)


def test_a_collector_writing_to_another_lake_is_refused(tmp_path, collector, collector_config):
    cfg = make_config(tmp_path, f"collector.endpoint={collector.url}")
    with pytest.raises(ServiceError, match="writes to the lake"):
        start_stack(cfg, with_model=False)
