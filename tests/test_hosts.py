"""The loop across hosts that share no disk (issue 53): network and mount namespaces made by the test.

First the hosts themselves (a private disk each, a link that can be cut, no way out), then step 1 across them: a
version deployed from ``control`` reaches vLLM on ``serve`` only through object storage on ``store`` and the gateway
beside vLLM, byte for byte, with the user-facing commands (``moto_server``, ``arclight serve``, ``arclight
redeploy``)."""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
import time
import uuid

import pytest

from lightning_core.common.model import DEFAULT_MODEL_DIR, is_model_dir
from tests.conftest import REPO
from tests.helpers.hosts import Hosts, missing

pytestmark = pytest.mark.integration

PYTHON = sys.executable
ARCLIGHT = str(REPO / ".venv" / "bin" / "arclight")
AWS = {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test", "AWS_REGION": "us-east-1"}


@pytest.fixture(autouse=True)
def _rights():
    why = missing()
    if why:
        pytest.skip(why)


def _wait(host, url: str, *, timeout_s: float, process=None) -> None:
    """Wait until ``url`` answers (asked from ``host``); fail with the process's log if it exits first."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise AssertionError(f"exited {process.returncode}:\n{process.log_path.read_text()[-3000:]}")
        if host.sh(f"curl -s -o /dev/null -m 2 -w '%{{http_code}}' {url}", check=False).stdout.startswith(("2", "4")):
            return
        time.sleep(0.5)
    log = process.log_path.read_text()[-3000:] if process is not None else ""
    raise AssertionError(f"{url} did not answer within {timeout_s:.0f} s\n{log}")


def test_hosts_have_their_own_disks_a_link_that_can_be_cut_and_no_way_out(tmp_path):
    with Hosts(["store", "control", "work-1"], logs=tmp_path / "logs") as hosts:
        store, control, work = hosts["store"], hosts["control"], hosts["work-1"]
        server = store.start([PYTHON, "-m", "http.server", "8000", "--bind", store.address], log="http", cwd="/tmp")
        _wait(control, f"http://{store.address}:8000/", timeout_s=30, process=server)
        store.sh("echo written-on-store > /tmp/mine && echo written-on-store > /mnt/mine")
        assert store.sh("cat /tmp/mine /mnt/mine").stdout.split() == ["written-on-store"] * 2
        for other in (control, work):  # another host's disks: not there
            assert other.sh("cat /tmp/mine", check=False).returncode != 0
            assert other.sh("cat /mnt/mine", check=False).returncode != 0
        assert not (tmp_path / "mine").exists()
        assert control.sh(f"test -x {ARCLIGHT} && echo installed").stdout.strip() == "installed"  # installed everywhere
        # only the switch's subnet is routed: nothing leaves for this machine's network or beyond
        assert control.sh("ip route").stdout.split()[0].startswith("10.77.")
        assert "default" not in control.sh("ip route").stdout
        sent = store.bytes_sent()
        work.link(False)
        assert work.sh(f"curl -s -m 2 http://{store.address}:8000/", check=False).returncode != 0
        work.link(True)
        _wait(work, f"http://{store.address}:8000/", timeout_s=30)
        assert store.bytes_sent() > sent
        names = [h.netns for h in hosts.hosts.values()]
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert not any(name in listed for name in names), listed


@pytest.mark.skipif(not is_model_dir(DEFAULT_MODEL_DIR), reason="needs the base model: make setup")
def test_a_version_deployed_from_control_reaches_vllm_on_serve_only_through_s3_byte_for_byte(tmp_path):
    with Hosts(["store", "control", "serve"], logs=tmp_path / "logs") as hosts:
        store, control, serve = hosts["store"], hosts["control"], hosts["serve"]
        s3 = f"http://{store.address}:5000"
        moto = store.start([str(REPO / ".venv" / "bin" / "moto_server"), "-H", store.address, "-p", "5000"], log="moto")
        _wait(store, s3, timeout_s=60, process=moto)
        store.sh(f"{PYTHON} -c \"import boto3; boto3.client('s3', endpoint_url='{s3}', region_name='us-east-1')"
                 ".create_bucket(Bucket='arclight')\"", env=AWS)

        token = uuid.uuid4().hex
        settings = {
            "project_dir": "/mnt/project", "model.path": str(DEFAULT_MODEL_DIR), "model.served_name": "base",
            "serving.redeploy": "lora", "serving.host": serve.address, "serving.port": "8000",
            "serving.max_model_len": "1024", "gateway.host": serve.address, "gateway.port": "8400",
            "gateway.token": token, "collector.endpoint": "", "serving.weights_uri": "s3://arclight/weights",
            "serving.weights_storage_options": json.dumps({"AWS_ENDPOINT_URL": s3}),
            "policies": json.dumps([{"name": "calc"}]),
        }
        flags = [a for k, v in settings.items() for a in ("--set", f"{k}={v}")]
        served = serve.start([ARCLIGHT, "serve", *flags], log="serve", env=AWS)
        _wait(control, f"http://{serve.address}:8400/healthz", timeout_s=300, process=served)

        # a LoRA adapter made on control's own disk (as the trainer would save it)
        control.sh(f"{PYTHON} -c \"from transformers import AutoModelForCausalLM; from peft import LoraConfig, get_peft_model; "
                   f"m = get_peft_model(AutoModelForCausalLM.from_pretrained('{DEFAULT_MODEL_DIR}'), LoraConfig(r=8, "
                   "target_modules=['q_proj', 'v_proj'], init_lora_weights=False)); m.save_pretrained('/mnt/adapter')\"",
                   timeout_s=300)
        before = {name: host.bytes_sent() for name, host in hosts.hosts.items()}
        deployed = control.sh(shlex.join([ARCLIGHT, "redeploy", "/mnt/adapter", "--policy", "calc", *flags]), env=AWS,
                              timeout_s=300)
        sent = {name: host.bytes_sent() - before[name] for name, host in hosts.hosts.items()}
        assert "policy calc now serves calc-v1" in deployed.stdout + deployed.stderr, deployed.stdout + deployed.stderr

        fetched = "/mnt/project/.arclight/gateway/weights/calc/calc-v1"
        assert serve.sh("ls /mnt/adapter", check=False).returncode != 0  # control's disk is not serve's
        sums = "cd {} && sha256sum adapter_config.json adapter_model.safetensors"
        assert serve.sh(sums.format(fetched)).stdout == control.sh(sums.format("/mnt/adapter")).stdout
        vllm_log = serve.sh("cat /mnt/project/.arclight/logs/vllm0-8000.log").stdout
        assert f"Loaded new LoRA adapter: name 'calc-v1', path '{fetched}'" in vllm_log
        answer = control.sh(f"curl -s -H 'Authorization: Bearer {token}' -H 'Content-Type: application/json' "
                            f"http://{serve.address}:8400/v1/chat/completions -d '{{\"model\": \"calc\", \"messages\": "
                            "[{\"role\": \"user\", \"content\": \"hi\"}], \"max_tokens\": 3}'").stdout
        assert json.loads(answer)["model"] in ("calc", "calc-v1"), answer
        print(f"bytes sent during the redeploy: {sent}")
        adapter_bytes = int(control.sh("du -cb /mnt/adapter/adapter_model.safetensors | tail -1").stdout.split()[0])
        assert sent["control"] >= adapter_bytes and sent["store"] >= adapter_bytes  # up to S3, down to serve
