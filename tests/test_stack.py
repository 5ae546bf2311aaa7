"""arclight up / status / down: long-lived services recorded per project, and flows attaching to them."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import httpx
import pytest

from lightning_core.epoch.stack import start_stack, state_path
from lightning_core.common.services import ServiceError, free_port
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


def test_a_collector_on_another_host_is_checked_by_where_its_span_tables_are(tmp_path, s3):
    """With the span tables on object storage a collector has a folder of its own (another host's disk): the project
    attaches to one that writes to its lake.spans_uri, with the collector's token, and refuses one that writes
    elsewhere, naming both places."""
    from lightning_core.epoch.stack import check_collector_lake
    from lightning_core.ingest.service import start_collector

    options = json.dumps({"AWS_ENDPOINT_URL": s3, "AWS_ALLOW_HTTP": "true", "conditional_put": "etag"})
    theirs = make_config(tmp_path / "ingest", f"lake.path={tmp_path / 'ingest' / 'lake'}", f"collector.port={free_port()}",
                         "lake.spans_uri=s3://arclight/hosts/spans", f"lake.storage_options={options}",
                         "collector.token=secret", "collector.host=127.0.0.1")
    service = start_collector(theirs, log_dir=tmp_path)
    try:
        def ours(uri: str):
            return make_config(tmp_path / "control", f"collector.endpoint={service.url}", "collector.token=secret",
                               f"lake.spans_uri={uri}", f"lake.storage_options={options}")

        check_collector_lake(ours("s3://arclight/hosts/spans/"), service)  # another folder, the same tables
        with pytest.raises(ServiceError, match="writes its spans to s3://arclight/hosts/spans, but this project "
                                               "reads them from s3://arclight/other/spans"):
            check_collector_lake(ours("s3://arclight/other/spans"), service)
    finally:
        service.stop()


def test_sigterm_during_work_stops_the_servers_the_process_started(tmp_path):
    # the way measure.py and `arclight train` run: start servers, work, stop them in `finally`
    script = tmp_path / "work.py"
    script.write_text(
        "import sys, time\n"
        "from lightning_core.ingest.service import start_collector\n"
        "from lightning_core.common.stopping import on_signals\n"
        "from tests.conftest import make_config\n"
        f"cfg = make_config({str(tmp_path)!r})\n"
        "with on_signals():\n"
        "    collector = start_collector(cfg)\n"
        "    try:\n"
        "        print(collector.process.pid, flush=True)\n"
        "        time.sleep(120)\n"
        "    finally:\n"
        "        collector.stop()\n"
    )
    proc = subprocess.Popen([sys.executable, str(script)], cwd=REPO, stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    child = int(proc.stdout.readline())
    assert _alive(child)
    proc.terminate()
    proc.wait(timeout=60)
    assert proc.returncode != 0 and not _alive(child)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().split(") ")[1][0] != "Z"
    except FileNotFoundError:
        return False


def test_down_removes_the_scratch_folders_of_what_up_started(tmp_path):
    """A vLLM that ``up`` started keeps its temporary files in a folder of its own; ``down`` removes it."""
    from lightning_core.epoch.stack import down

    cfg = make_config(tmp_path)
    scratch = tmp_path / "arclight-vllm0-scratch"
    scratch.mkdir()
    (scratch / "engine.sock").write_text("")
    process = subprocess.Popen(["sleep", "300"], start_new_session=True)
    path = state_path(cfg)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"vllm0": {"url": "http://127.0.0.1:9", "health_url": "http://127.0.0.1:9/health",
                                          "pid": process.pid, "log": None, "scratch": str(scratch)}}))
    assert down(cfg) == ["vllm0"]
    assert process.wait(10) is not None
    assert not scratch.exists() and not path.exists()


def test_a_failure_that_a_stop_caused_comes_out_as_the_stop():
    """After Ctrl-C, a thread's own way of stopping (a training's TrainingStopped) may reach the command before the
    main thread's KeyboardInterrupt: it is the stop all the same (exit 130, "interrupted"), not an error."""
    import signal
    import time

    from lightning_core.common.stopping import on_signals

    with pytest.raises(KeyboardInterrupt) as stopped:
        with on_signals():
            try:
                os.kill(os.getpid(), signal.SIGINT)
                time.sleep(5)
            except KeyboardInterrupt:
                pass  # lost on its way, as when the training thread's failure comes out first
            raise RuntimeError("training stopped at step 3: a stop was asked for")
    assert isinstance(stopped.value.__cause__, RuntimeError)
    with pytest.raises(RuntimeError):  # without a stop, a failure stays what it is
        with on_signals():
            raise RuntimeError("a real failure")
