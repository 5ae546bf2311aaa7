"""The loop across hosts that share no disk (issue 53): network and mount namespaces made by the test.

First the hosts themselves (a private disk each, a link that can be cut, no way out), then step 1 across them: a
version deployed from ``control`` reaches vLLM on ``serve`` only through object storage on ``store`` and the gateway
beside vLLM, byte for byte, with the user-facing commands (``moto_server``, ``arclight serve``, ``arclight
redeploy``)."""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import threading
import time
import uuid

import psutil
import pytest

from lightning_core.common.model import DEFAULT_MODEL_DIR, is_model_dir
from tests.conftest import REPO
from tests.helpers.hosts import Hosts, missing

pytestmark = pytest.mark.integration

PYTHON = sys.executable
ARCLIGHT = str(REPO / ".venv" / "bin" / "arclight")
CALC = REPO / "examples" / "calc"
AWS = {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test", "AWS_REGION": "us-east-1"}


@pytest.fixture(autouse=True)
def _rights():
    why = missing()
    if why:
        pytest.skip(why)


def _http(host, url: str, *, token: str | None = None, body: dict | None = None, timeout_s: float = 2) -> str:
    """A request from ``host`` (with the project's Python: nothing the repository does not install): "<status> <body>",
    or "unreachable"."""
    code = ("import httpx, json, sys\n"
            "a = json.loads(sys.argv[1])\n"
            "try:\n"
            "    r = httpx.request('POST' if a['body'] is not None else 'GET', a['url'], json=a['body'], timeout=a['t'],"
            " headers={'Authorization': 'Bearer ' + a['token']} if a['token'] else {})\n"
            "    print(r.status_code, r.text)\n"
            "except httpx.HTTPError:\n"
            "    print('unreachable')\n")
    args = json.dumps({"url": url, "token": token, "body": body, "t": timeout_s})
    return host.sh(shlex.join([PYTHON, "-c", code, args]), timeout_s=timeout_s + 60).stdout.strip()


def _wait(host, url: str, *, timeout_s: float, process=None) -> None:
    """Wait until ``url`` answers (asked from ``host``); fail with the process's log if it exits first."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise AssertionError(f"exited {process.returncode}:\n{process.log_path.read_text()[-3000:]}")
        if _http(host, url).startswith(("2", "4")):
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
        assert _http(work, f"http://{store.address}:8000/") == "unreachable"
        work.link(True)
        _wait(work, f"http://{store.address}:8000/", timeout_s=30)
        assert store.bytes_sent() > sent
        names = [h.netns for h in hosts.hosts.values()]
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert not any(name in listed for name in names), listed


def test_a_second_ctrl_c_during_cleanup_still_removes_every_host(tmp_path):
    """Ctrl-C in a terminal (or a wrapper such as ``timeout`` passing its signal on) can reach the test twice: the
    second must not cut the cleanup short and leave hosts and their servers behind."""
    script = tmp_path / "hosts.py"
    script.write_text(
        "import sys, time\n"
        "from tests.helpers.hosts import Hosts\n"
        f"with Hosts(['a', 'b'], logs={str(tmp_path / 'logs')!r}) as hosts:\n"
        "    hosts['a'].start(['bash', '-c', 'trap \"\" TERM; sleep 1000 & wait'], log='stubborn')\n"
        "    print(' '.join(h.netns for h in hosts.hosts.values()), flush=True)\n"
        "    time.sleep(120)\n")
    process = subprocess.Popen([PYTHON, str(script)], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    names = process.stdout.readline().split()
    assert len(names) == 2, process.stderr.read()
    time.sleep(1)
    process.send_signal(signal.SIGINT)
    time.sleep(2)  # inside the cleanup: it waits up to 10 s for the server that ignores SIGTERM
    process.send_signal(signal.SIGINT)
    process.wait(timeout=60)
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
        _wait(control, f"http://{serve.address}:8400/healthz", timeout_s=600, process=served)  # vLLM, loaded machine

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
        answer = _http(control, f"http://{serve.address}:8400/v1/chat/completions", token=token, timeout_s=120,
                       body={"model": "calc", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3})
        assert answer.startswith("200 ") and json.loads(answer[4:])["model"] in ("calc", "calc-v1"), answer
        print(f"bytes sent during the redeploy: {sent}")
        adapter_bytes = int(control.sh("du -cb /mnt/adapter/adapter_model.safetensors | tail -1").stdout.split()[0])
        assert sent["control"] >= adapter_bytes and sent["store"] >= adapter_bytes  # up to S3, down to serve


class _Counters:
    """Every host's bytes-sent counter, sampled each second in the background, to split traffic by time."""

    def __init__(self, hosts: Hosts):
        self.hosts, self.samples, self.done = hosts, [], threading.Event()
        self.sample()
        self.thread = threading.Thread(target=self.loop, daemon=True)
        self.thread.start()

    peak_rss = 0  # the most memory the hosts' processes held at once (sum of their RSS)

    def sample(self) -> None:
        self.samples.append((time.time(), {n: h.bytes_sent() for n, h in self.hosts.hosts.items()}))
        rss = 0
        for pid in (p for h in self.hosts.hosts.values() for p in h.pids()):
            with contextlib.suppress(psutil.Error):
                rss += psutil.Process(pid).memory_info().rss
        self.peak_rss = max(self.peak_rss, rss)

    def loop(self) -> None:
        while not self.done.wait(1.0):
            self.sample()

    def stop(self) -> None:
        self.done.set()
        self.thread.join()
        self.sample()

    def at(self, when: float) -> dict[str, int]:
        """The counters as last sampled at or before ``when``."""
        return [c for t, c in self.samples if t <= when][-1] if self.samples[0][0] <= when else self.samples[0][1]


def _log_time(log: str, pattern: str) -> float:
    """When the first line of an Arclight log matching ``pattern`` was written (the log's local time)."""
    line = next(line for line in log.splitlines() if re.search(pattern, line))
    return datetime.datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f").timestamp()


def _json_lines(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def _ray_start(host, *args: str, env: dict[str, str]):
    """``ray start --block`` on ``host`` (the node's own address, no dashboard, a small object store)."""
    head = ["--include-dashboard=false"] if "--head" in args else []  # refused on a worker node
    return host.start([str(REPO / ".venv" / "bin" / "ray"), "start", "--block", f"--node-ip-address={host.address}",
                       "--disable-usage-stats", "--object-store-memory=100000000", *head, *args], log="ray", env=env)


@pytest.mark.skipif(not is_model_dir(DEFAULT_MODEL_DIR), reason="needs the base model: make setup")
def test_two_epochs_of_calc_run_across_hosts_that_share_no_disk(tmp_path):
    """The loop across hosts, each role started with the command a user runs on a real machine: S3 and the MLflow
    server on ``store``, the Prefect server, the Ray head and ``arclight train`` on ``control``, the collector on
    ``ingest`` writing the span tables to S3, vLLM and the gateway on ``serve``, the rollouts on Ray workers on
    ``work-1`` and ``work-2``. (Training still runs on ``control``: issue 53's step 2 moves it.)"""
    names = ["store", "control", "ingest", "serve", "work-1", "work-2"]
    with Hosts(names, logs=tmp_path / "logs") as hosts:
        store, control, ingest, serve = (hosts[n] for n in names[:4])
        workers = [hosts["work-1"], hosts["work-2"]]
        s3 = f"http://{store.address}:5000"
        token, collector_token = uuid.uuid4().hex, uuid.uuid4().hex
        ray_auth = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": uuid.uuid4().hex,
                    "RAY_agent_register_timeout_ms": "300000"}
        prefect_api = f"http://{control.address}:4200/api"
        mlflow_uri = f"http://{store.address}:5001"

        # store: object storage and the MLflow server (runs in SQLite on store's disk, artifacts on S3)
        moto = store.start([str(REPO / ".venv" / "bin" / "moto_server"), "-H", store.address, "-p", "5000"], log="moto")
        _wait(store, s3, timeout_s=60, process=moto)
        store.sh(f"{PYTHON} -c \"import boto3; boto3.client('s3', endpoint_url='{s3}', region_name='us-east-1')"
                 ".create_bucket(Bucket='arclight')\"", env=AWS)
        store.sh("mkdir -p /mnt/mlflow")
        mlflow = store.start([str(REPO / ".venv" / "bin" / "mlflow"), "server", "--host", store.address, "--port", "5001",
                              "--workers", "1", "--backend-store-uri", "sqlite:////mnt/mlflow/mlflow.db",
                              "--artifacts-destination", "s3://arclight/mlflow",
                              "--allowed-hosts", f"{store.address}:5001"],
                             log="mlflow", env={**AWS, "MLFLOW_S3_ENDPOINT_URL": s3})
        # control: the Prefect server and the Ray head (no CPUs of its own: rollouts go to the workers)
        prefect = control.start([str(REPO / ".venv" / "bin" / "prefect"), "server", "start", "--host", control.address,
                                 "--port", "4200"], log="prefect",
                                env={"PREFECT_HOME": "/mnt/prefect", "PREFECT_UI_ENABLED": "0",
                                     "PREFECT_SERVER_ANALYTICS_ENABLED": "false"})
        head = _ray_start(control, "--head", "--port=6379", "--num-cpus=0", env=ray_auth)
        # ingest: the collector, its span tables on S3
        lake_options = json.dumps({"AWS_ENDPOINT_URL": s3, "AWS_ALLOW_HTTP": "true", "conditional_put": "etag"})
        lake = {"lake.spans_uri": "s3://arclight/spans", "lake.storage_options": lake_options}
        collector = ingest.start([ARCLIGHT, "collector", "--host", ingest.address, "--port", "4318", "--token",
                                  collector_token, "--lake", "/mnt/lake",
                                  *[a for k, v in lake.items() for a in ("--set", f"{k}={v}")]], log="collector", env=AWS)
        # serve: vLLM and the gateway, which records every call to the collector
        config = str(CALC / "config.yaml")
        common = {
            "project_dir": "/mnt/project",  # calc serves merged weights (serving.redeploy: merged) ...
            # ... from one vLLM: every call is the policy's (with agent_match a second one would serve frozen agents)
            "policies": json.dumps([{"name": "calc"}]),
            "serving.host": serve.address, "serving.port": "8000", "gateway.host": serve.address, "gateway.port": "8400",
            "gateway.token": token, "collector.endpoint": f"http://{ingest.address}:4318",
            "collector.token": collector_token, "serving.weights_uri": "s3://arclight/weights",
            "serving.weights_storage_options": json.dumps({"AWS_ENDPOINT_URL": s3}),
        }
        flags = [a for k, v in common.items() for a in ("--set", f"{k}={v}")]
        served = serve.start([ARCLIGHT, "serve", "-c", config, *flags], log="serve", env=AWS)
        _wait(control, f"http://{ingest.address}:4318/healthz", timeout_s=120, process=collector)
        _wait(control, f"http://{store.address}:5001/health", timeout_s=180, process=mlflow)
        _wait(control, f"{prefect_api}/health", timeout_s=180, process=prefect)
        # work-1, work-2: Ray workers; what runs there reports task runs to the Prefect server
        nodes = [_ray_start(w, f"--address={control.address}:6379", "--num-cpus=2",
                            env={**ray_auth, "PREFECT_API_URL": prefect_api}) for w in workers]
        deadline = time.monotonic() + 300
        while "0.0/4.0 CPU" not in control.sh(f"{REPO}/.venv/bin/ray status --address={control.address}:6379",
                                              env=ray_auth, check=False).stdout:
            for node in (head, *nodes):
                assert node.poll() is None, node.log_path.read_text()[-3000:]
            assert time.monotonic() < deadline, "the Ray cluster did not reach 2 workers of 2 CPUs in 300 s"
            time.sleep(3)
        _wait(control, f"http://{serve.address}:8400/healthz", timeout_s=600, process=served)

        # control: two epochs of the calc example
        run = {
            **common, **lake, "gateway.endpoint": f"http://{serve.address}:8400",
            "serving.urls": json.dumps([f"http://{serve.address}:8000"]), "tracking.mlflow_uri": mlflow_uri,
            "rollouts.executor": "ray", "rollouts.address": f"{control.address}:6379",
            "rollouts.dataset": str(CALC / "train.jsonl"), "rollouts.eval_dataset": str(CALC / "test.jsonl"),
            "rollouts.agent_path": json.dumps([str(CALC)]),
            "rollouts.tasks_per_epoch": "4", "rollouts.group_size": "4", "rollouts.informative_groups": "2",
            "rollouts.max_tasks_per_epoch": "16", "rollouts.concurrency": "16", "evaluation.every_epochs": "null",
        }
        counters = _Counters(hosts)
        trained = control.sh(shlex.join([ARCLIGHT, "train", config, "--epochs", "2",
                                         *[a for k, v in run.items() for a in ("--set", f"{k}={v}")]]),
                             env={**AWS, **ray_auth, "PREFECT_API_URL": prefect_api}, timeout_s=1500, check=False)
        counters.stop()
        output = trained.stdout + trained.stderr
        (tmp_path / "logs" / "control-train.log").write_text(output)
        assert trained.returncode == 0, output[-5000:]
        # what each host sent in each epoch: the counters between the starts of the epochs' rollouts (control's log)
        log = control.sh("cat /mnt/project/.arclight/logs/arclight.log").stdout
        starts = [_log_time(log, rf"epoch {e}: \d+ rollouts planned") for e in (0, 1)] + [time.time()]
        per_epoch = [{name: counters.at(b)[name] - counters.at(a)[name] for name in names}
                     for a, b in zip(starts, starts[1:])]
        print(f"the hosts' processes held at most {counters.peak_rss / 2**30:.1f} GiB at once")
        for epoch, sent in enumerate(per_epoch):
            print(f"epoch {epoch}: MB sent by each host: " + ", ".join(f"{n} {v / 1e6:.1f}" for n, v in sent.items()))

        # the weights vLLM serves are the ones the trainer merged, byte for byte, fetched to serve's own disk
        merged = control.sh("find /mnt/project -type d -name calc-v2.merged").stdout.split()
        assert len(merged) == 1, merged
        fetched = "/mnt/project/.arclight/gateway/weights/calc/calc-v2.merged"
        sums = "cd {} && find . -type f -not -name manifest.json | sort | xargs sha256sum"
        assert serve.sh(sums.format(fetched)).stdout == control.sh(sums.format(merged[0])).stdout
        assert f"reloaded the weights of calc from {fetched}" in control.sh(  # "vLLM at <url> reloaded ..."
            "cat /mnt/project/.arclight/logs/arclight.log").stdout
        assert serve.sh(f"ls {merged[0]}", check=False).returncode != 0  # control's disk is not serve's

        # every model call of the rollouts came from work-1 or work-2, and the spans are on S3, read from control
        query = ("SELECT json_extract_string(attributes, '$.\"client.address\"') AS client, count(*) AS calls "
                 "FROM spans WHERE span_kind = 'llm' GROUP BY 1 ORDER BY 1")
        rows = _json_lines(control.sh(shlex.join([ARCLIGHT, "query", query, "--format", "json", "-c", config,
                                                 *[a for k, v in run.items() for a in ("--set", f"{k}={v}")]]),
                                     env=AWS, timeout_s=300).stdout)
        assert {r["client"] for r in rows} == {w.address for w in workers}, rows
        # no span data file on the collector's disk, nor on control's but the read copies (DuckDB reads no S3)
        assert ingest.sh("find /mnt/lake -path '*spans/*' -name '*.parquet'").stdout == ""
        assert control.sh("find /mnt/project -path '*spans/*' -name '*.parquet' -not -path '*_mirror*'").stdout == ""
        assert int(store.sh(f"{PYTHON} -c \"import boto3; print(boto3.client('s3', endpoint_url='{s3}', "
                            "region_name='us-east-1').list_objects_v2(Bucket='arclight', Prefix='spans/')['KeyCount'])\"",
                            env=AWS).stdout) > 0

        # the MLflow server holds both epochs' metrics
        history = control.sh(f"{PYTHON} -c \"from mlflow import MlflowClient; c = MlflowClient('{mlflow_uri}'); "
                             "runs = c.search_runs([e.experiment_id for e in c.search_experiments()]); "
                             "print(sorted(m.step for r in runs for m in c.get_metric_history(r.info.run_id, "
                             "'reward/mean')))\"").stdout.strip()
        assert history == "[0, 1]", history
