"""The loop across hosts that share no disk (issue 53): network and mount namespaces made by the test.

First the hosts themselves (a private disk each, a link that can be cut, no way out), then step 1 across them: a
version deployed from ``control`` reaches vLLM on ``serve`` only through object storage on ``store`` and the gateway
beside vLLM, byte for byte, with the user-facing commands (``moto_server``, ``arclight serve``, ``arclight
redeploy``); then the whole calc loop across eight hosts, trained on two train hosts, through a cut link and a dead
worker, stopped in one paragraph by a link cut for good and resumed; then two ranks on two train hosts against one process,
and one of them dying."""

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
from pathlib import Path

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
    second must not cut the cleanup short and leave hosts and their servers behind. The stubborn server ignores
    SIGTERM and has a child in a session of its own, which stopping the server's session does not reach."""
    script = tmp_path / "hosts.py"
    script.write_text(
        "import sys, time\n"
        "from tests.helpers.hosts import Hosts\n"
        f"with Hosts(['a', 'b'], logs={str(tmp_path / 'logs')!r}) as hosts:\n"
        "    hosts['a'].start(['bash', '-c', 'trap \"\" TERM; setsid sleep 1000 & wait'], log='stubborn')\n"
        "    print(' '.join(h.netns for h in hosts.hosts.values()), flush=True)\n"
        "    time.sleep(120)\n")
    process = subprocess.Popen([PYTHON, str(script)], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    names = process.stdout.readline().split()
    assert len(names) == 2, process.stderr.read()
    deadline = time.monotonic() + 30  # every process on the hosts: the two holders, the server and its child
    while len(pids := {int(p) for name in names for p in subprocess.run(
            ["ip", "netns", "pids", name], capture_output=True, text=True).stdout.split()}) < 4:
        assert time.monotonic() < deadline, f"the stubborn server and its child did not start: {pids}"
        time.sleep(0.2)
    process.send_signal(signal.SIGINT)
    time.sleep(2)  # inside the cleanup: it waits up to 10 s for the server that ignores SIGTERM
    process.send_signal(signal.SIGINT)
    process.wait(timeout=60)
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert not any(name in listed for name in names), listed
    left = {}  # a zombie waiting to be reaped has stopped running
    for pid in pids:
        with contextlib.suppress(psutil.NoSuchProcess):
            if (still := psutil.Process(pid)).status() != psutil.STATUS_ZOMBIE:
                left[pid] = " ".join(still.cmdline())
    assert left == {}, f"processes of the removed hosts still run: {left}"


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
        tokens = {"ARCLIGHT_GATEWAY_TOKEN": token}  # in the environment: `ps` shows a command line to every user
        settings = {
            "project_dir": "/mnt/project", "model.path": str(DEFAULT_MODEL_DIR), "model.served_name": "base",
            "serving.redeploy": "lora", "serving.host": serve.address, "serving.port": "8000",
            "serving.max_model_len": "1024", "gateway.host": serve.address, "gateway.port": "8400",
            "collector.endpoint": "", "serving.weights_uri": "s3://arclight/weights",
            "serving.weights_storage_options": json.dumps({"AWS_ENDPOINT_URL": s3}),
            "policies": json.dumps([{"name": "calc"}]),
        }
        flags = [a for k, v in settings.items() for a in ("--set", f"{k}={v}")]
        served = serve.start([ARCLIGHT, "serve", *flags], log="serve", env={**AWS, **tokens})
        _wait(control, f"http://{serve.address}:8400/healthz", timeout_s=600, process=served)  # vLLM, loaded machine

        # a LoRA adapter made on control's own disk (as the trainer would save it)
        control.sh(f"{PYTHON} -c \"from transformers import AutoModelForCausalLM; from peft import LoraConfig, get_peft_model; "
                   f"m = get_peft_model(AutoModelForCausalLM.from_pretrained('{DEFAULT_MODEL_DIR}'), LoraConfig(r=8, "
                   "target_modules=['q_proj', 'v_proj'], init_lora_weights=False)); m.save_pretrained('/mnt/adapter')\"",
                   timeout_s=300)
        before = {name: host.bytes_sent() for name, host in hosts.hosts.items()}
        deployed = control.sh(shlex.join([ARCLIGHT, "redeploy", "/mnt/adapter", "--policy", "calc", *flags]),
                              env={**AWS, **tokens},
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


def _s3_keys(store, s3: str, prefix: str) -> list[str]:
    """The keys under ``prefix`` in the bucket ``arclight`` of the S3 server at ``s3``, listed on ``store``."""
    return store.sh(f"{PYTHON} -c \"import boto3; print('\\n'.join(o['Key'] for o in boto3.client('s3', "
                    f"endpoint_url='{s3}', region_name='us-east-1').list_objects_v2(Bucket='arclight', "
                    f"Prefix='{prefix}').get('Contents', [])))\"", env=AWS).stdout.split()


def _store(store):
    """On ``store``: object storage (moto server, port 5000, bucket ``arclight``) and the MLflow server (port 5001,
    runs in SQLite on store's own disk, artifacts on S3); return the MLflow server's process (wait for its /health)."""
    s3 = f"http://{store.address}:5000"
    moto = store.start([str(REPO / ".venv" / "bin" / "moto_server"), "-H", store.address, "-p", "5000"], log="moto")
    _wait(store, s3, timeout_s=60, process=moto)
    store.sh(f"{PYTHON} -c \"import boto3; boto3.client('s3', endpoint_url='{s3}', region_name='us-east-1')"
             ".create_bucket(Bucket='arclight')\"", env=AWS)
    store.sh("mkdir -p /mnt/mlflow")
    return store.start([str(REPO / ".venv" / "bin" / "mlflow"), "server", "--host", store.address, "--port", "5001",
                        "--workers", "1", "--backend-store-uri", "sqlite:////mnt/mlflow/mlflow.db",
                        "--artifacts-destination", "s3://arclight/mlflow", "--allowed-hosts", f"{store.address}:5001"],
                       log="mlflow", env={**AWS, "MLFLOW_S3_ENDPOINT_URL": s3})


class _Faults:
    """The faults of the two-epoch run, each set off by a line of control's log: ``ingest``'s link cut for 20 s when
    epoch 0's rollouts start, and ``work-2`` killed (every process on it: its node dies) while it runs a batch of
    epoch 1's."""

    def __init__(self, hosts: Hosts, *, log: str = "/mnt/project/.arclight/logs/arclight.log"):
        self.hosts, self.log, self.done = hosts, log, threading.Event()
        self.seen: dict[str, float] = {}
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    def _wait_for(self, pattern: str) -> bool:
        while not self.done.wait(0.5):
            text = self.hosts["control"].sh(f"cat {self.log} 2>/dev/null", check=False).stdout
            if re.search(pattern, text):
                return True
        return False

    def run(self) -> None:
        if not self._wait_for(r"epoch 0: \d+ rollouts planned"):
            return
        self.seen["ingest down"] = time.time()
        self.hosts["ingest"].link(False)
        self.done.wait(20)
        self.hosts["ingest"].link(True)
        self.seen["ingest up"] = time.time()
        if not self._wait_for(r"epoch 1: \d+ rollouts planned"):
            return
        # work-2 dies while it runs a batch, not a fixed time after the epoch started, when it may hold none
        deadline = time.monotonic() + 120
        while not any(_runs_a_rollout_batch(_cmdline(pid)) for pid in self.hosts["work-2"].pids()):
            if time.monotonic() > deadline or self.done.wait(0.2):
                return  # no batch ran on work-2 (faults.seen says so): nothing would be lost with it
        self.done.wait(1)
        self.hosts["work-2"].kill_all()
        self.seen["work-2 killed"] = time.time()

    def stop(self) -> None:
        self.done.set()
        self.thread.join()
        with contextlib.suppress(RuntimeError):
            self.hosts["ingest"].link(True)


class _IngestDownForGood(_Faults):
    """``ingest``'s link cut when epoch 2's rollouts start, and left down until the test stops watching."""

    def run(self) -> None:
        if self._wait_for(r"epoch 2: \d+ rollouts planned"):
            self.hosts["ingest"].link(False)
            self.seen["ingest down"] = time.time()


def _ray_start(host, *args: str, env: dict[str, str]):
    """``ray start --block`` on ``host`` (the node's own address, no dashboard, a small object store)."""
    head = ["--include-dashboard=false"] if "--head" in args else []  # refused on a worker node
    return host.start([str(REPO / ".venv" / "bin" / "ray"), "start", "--block", f"--node-ip-address={host.address}",
                       "--disable-usage-stats", "--object-store-memory=100000000", *head, *args], log="ray", env=env)


@pytest.mark.skipif(not is_model_dir(DEFAULT_MODEL_DIR), reason="needs the base model: make setup")
# three `arclight train` runs (two epochs, epoch 2 stopped, epoch 2 resumed) with their own limits of 1500, 900 and
# 900 s: the suite's 900 s per test cut it off in a fresh-clone make test (load 2-4), 6 s after the resumed run had
# ended well (services 1.5 min, epochs 0-1 8 min, epoch 2 stopped 2.5 min, resumed 2.7 min; 591 s the run before)
@pytest.mark.timeout(2400)
def test_two_epochs_of_calc_run_across_hosts_that_share_no_disk(tmp_path):
    """The loop across hosts, each role started with the command a user runs on a real machine: S3 and the MLflow
    server on ``store``, the Prefect server, the Ray head and ``arclight train`` on ``control``, the collector on
    ``ingest`` writing the span tables to S3, vLLM and the gateway on ``serve``, the rollouts on Ray workers on
    ``work-1`` and ``work-2``, and the training as two ranks on the Ray nodes ``train-1`` and ``train-2``
    (``trainer.executor: ray``, ``trainer.processes: 2``), which publish each version to S3 and log to the MLflow
    server."""
    names = ["store", "control", "ingest", "serve", "work-1", "work-2", "train-1", "train-2"]
    with Hosts(names, logs=tmp_path / "logs") as hosts:
        store, control, ingest, serve = (hosts[n] for n in names[:4])
        workers = [hosts["work-1"], hosts["work-2"]]
        took, lap = {}, [time.monotonic()]  # how long each part of the test took (seconds), printed at its end

        def took_(part: str) -> None:
            took[part], lap[0] = round(time.monotonic() - lap[0]), time.monotonic()
        s3 = f"http://{store.address}:5000"
        token, collector_token = uuid.uuid4().hex, uuid.uuid4().hex
        # tokens in the environment, never on a command line, which `ps` shows every user of the host
        tokens = {"ARCLIGHT_GATEWAY_TOKEN": token, "ARCLIGHT_COLLECTOR_TOKEN": collector_token}
        ray_auth = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": uuid.uuid4().hex,
                    "RAY_agent_register_timeout_ms": "300000"}
        prefect_api = f"http://{control.address}:4200/api"
        mlflow_uri = f"http://{store.address}:5001"

        mlflow = _store(store)
        # control: the Prefect server and the Ray head (no CPUs of its own: rollouts go to the workers)
        prefect = control.start([str(REPO / ".venv" / "bin" / "prefect"), "server", "start", "--host", control.address,
                                 "--port", "4200"], log="prefect",
                                env={"PREFECT_HOME": "/mnt/prefect", "PREFECT_UI_ENABLED": "0",
                                     "PREFECT_SERVER_ANALYTICS_ENABLED": "false"})
        head = _ray_start(control, "--head", "--port=6379", "--num-cpus=0", env=ray_auth)
        # ingest: the collector, its span tables on S3
        lake_options = json.dumps({"AWS_ENDPOINT_URL": s3, "AWS_ALLOW_HTTP": "true", "conditional_put": "etag"})
        lake = {"lake.spans_uri": "s3://arclight/spans", "lake.storage_options": lake_options}
        collector = ingest.start([ARCLIGHT, "collector", "--host", ingest.address, "--port", "4318", "--lake", "/mnt/lake",
                                  "--set", f"lake.spans_uri={lake['lake.spans_uri']}"], log="collector",
                                 env={**AWS, "ARCLIGHT_COLLECTOR_TOKEN": collector_token,
                                      "ARCLIGHT_LAKE_STORAGE_OPTIONS": lake_options})
        # serve: vLLM and the gateway, which records every call to the collector
        config = str(CALC / "config.yaml")
        common = {
            "project_dir": "/mnt/project",  # calc serves merged weights (serving.redeploy: merged) ...
            # ... from one vLLM: every call is the policy's (with agent_match a second one would serve frozen agents)
            "policies": json.dumps([{"name": "calc"}]),
            "serving.host": serve.address, "serving.port": "8000", "gateway.host": serve.address, "gateway.port": "8400",
            "collector.endpoint": f"http://{ingest.address}:4318", "serving.weights_uri": "s3://arclight/weights",
            "serving.weights_storage_options": json.dumps({"AWS_ENDPOINT_URL": s3}),
        }
        flags = [a for k, v in common.items() for a in ("--set", f"{k}={v}")]
        served = serve.start([ARCLIGHT, "serve", "-c", config, *flags], log="serve", env={**AWS, **tokens})
        _wait(control, f"http://{ingest.address}:4318/healthz", timeout_s=120, process=collector)
        _wait(control, f"http://{store.address}:5001/health", timeout_s=180, process=mlflow)
        _wait(control, f"{prefect_api}/health", timeout_s=180, process=prefect)
        # work-1, work-2: Ray workers; what runs there reports task runs to the Prefect server. One CPU each: a round's
        # two batches run one on each (with two, Ray put both on work-1 at times, and work-2 died holding none)
        nodes = [_ray_start(w, f"--address={control.address}:6379", "--num-cpus=1",
                            env={**ray_auth, "PREFECT_API_URL": prefect_api}) for w in workers]
        # train-1, train-2: Ray nodes with a train slot and no CPU for tasks, so that no rollout lands there; the
        # trainer's torch threads are set apart (ARCLIGHT_TRAIN_THREADS), as Ray would give a 0-CPU task one
        trainers = [hosts["train-1"], hosts["train-2"]]
        nodes += [_ray_start(t, f"--address={control.address}:6379", "--num-cpus=0", '--resources={"train": 1}',
                             env={**ray_auth, **AWS, "ARCLIGHT_TRAIN_THREADS": "1"}) for t in trainers]
        deadline = time.monotonic() + 300
        while not all(f" {want}" in (status := control.sh(f"{REPO}/.venv/bin/ray status --address={control.address}:6379",
                                                           env=ray_auth, check=False).stdout)
                      for want in ("0.0/2.0 CPU", "0.0/2.0 train")):
            for node in (head, *nodes):
                assert node.poll() is None, node.log_path.read_text()[-3000:]
            assert time.monotonic() < deadline, f"the Ray cluster did not reach 2 workers and 2 train hosts in 300 s:\n{status}"
            time.sleep(3)
        _wait(control, f"http://{serve.address}:8400/healthz", timeout_s=600, process=served)

        # control: two epochs of the calc example
        run = {
            **common, **lake, "gateway.endpoint": f"http://{serve.address}:8400",
            "serving.urls": json.dumps([f"http://{serve.address}:8000"]), "tracking.mlflow_uri": mlflow_uri,
            "rollouts.executor": "ray", "rollouts.address": f"{control.address}:6379",
            "rollouts.dataset": str(CALC / "train.jsonl"), "rollouts.eval_dataset": str(CALC / "test.jsonl"),
            "rollouts.agent_path": json.dumps([str(CALC)]),
            # one informative group is enough to train: with 2, the base model's (mostly all-zero) groups drew a
            # second round of rollouts in most epochs (40 s each here)
            "rollouts.tasks_per_epoch": "4", "rollouts.group_size": "4", "rollouts.informative_groups": "1",
            "rollouts.max_tasks_per_epoch": "16", "rollouts.concurrency": "16", "evaluation.every_epochs": "null",
            "trainer.executor": "ray", "trainer.processes": "2",
            "trainer.ray_resources": json.dumps({"train": 1, "CPU": 0}),
            # each train host keeps one version of those it made and one of the parents it fetched: over three
            # versions made on two hosts, pruning runs
            "serving.keep_versions": "1",
        }
        took_("hosts and services")
        counters, faults = _Counters(hosts), _Faults(hosts)
        trained = control.sh(shlex.join([ARCLIGHT, "train", config, "--epochs", "2",
                                         *[a for k, v in run.items() for a in ("--set", f"{k}={v}")]]),
                             env={**AWS, **ray_auth, **tokens, "PREFECT_API_URL": prefect_api}, timeout_s=1500, check=False)
        output = trained.stdout + trained.stderr
        (tmp_path / "logs" / "control-train.log").write_text(output)
        took_("epochs 0 and 1")
        counters.stop()
        faults.stop()
        assert trained.returncode == 0, output[-5000:]
        assert set(faults.seen) == {"ingest down", "ingest up", "work-2 killed"}, faults.seen
        # what each host sent in each epoch: the counters between the starts of the epochs' rollouts (control's log)
        log = control.sh("cat /mnt/project/.arclight/logs/arclight.log").stdout
        starts = [_log_time(log, rf"epoch {e}: \d+ rollouts planned") for e in (0, 1)] + [time.time()]
        per_epoch = [{name: counters.at(b)[name] - counters.at(a)[name] for name in names}
                     for a, b in zip(starts, starts[1:])]
        print(f"the hosts' processes held at most {counters.peak_rss / 2**30:.1f} GiB at once")
        for epoch, sent in enumerate(per_epoch):
            print(f"epoch {epoch}: MB sent by each host: " + ", ".join(f"{n} {v / 1e6:.1f}" for n, v in sent.items()))

        # each epoch trained on the train hosts, as 2 ranks, and nothing of the versions is on control's disk
        by_ip = {t.address: t for t in trainers}
        trained_on = [re.search(rf"epoch {e}: calc-v{e + 1} from \d+ triplets, \d+ steps on ([\d.]+)", log) for e in (0, 1)]
        assert all(m and m.group(1) in by_ip for m in trained_on), [m and m.group(0) for m in trained_on]
        for epoch, sent in enumerate(per_epoch):  # both ranks took part: each sent its gradients to the other (gloo)
            assert all(sent[t.name] > 1e6 for t in trainers), (epoch, sent)
        assert control.sh("find /mnt/project -name 'adapter_model.safetensors' -o -name '*.merged'").stdout == ""
        # the weights vLLM serves are the ones rank 0 merged on its train host, byte for byte, fetched to serve's disk
        rank0 = by_ip[trained_on[1].group(1)]
        merged = rank0.sh("find /mnt/project -type d -name calc-v2.merged").stdout.split()
        assert len(merged) == 1, merged
        fetched = "/mnt/project/.arclight/gateway/weights/calc/calc-v2.merged"
        sums = "cd {} && find . -type f -not -name manifest.json | sort | xargs sha256sum"
        assert serve.sh(sums.format(fetched)).stdout == rank0.sh(sums.format(merged[0])).stdout
        assert f"reloaded the weights of calc from {fetched}" in log  # "vLLM at <url> reloaded ..."
        assert serve.sh(f"ls {merged[0]}", check=False).returncode != 0  # a train host's disk is not serve's
        # each version's optimizer state is published apart from the lean copy vLLM's host fetches
        keys = _s3_keys(store, s3, "weights/")
        assert {"weights/calc/calc-v1.state/optimizer.pt", "weights/calc/calc-v2/adapter_model.safetensors",
                "weights/calc/calc-v2.merged/model.safetensors"} <= set(keys), keys
        assert not any(k.endswith("/optimizer.pt") and ".state/" not in k for k in keys), keys

        # every model call of the rollouts came from work-1 or work-2, and the spans are on S3, read from control
        query = ("SELECT json_extract_string(attributes, '$.\"client.address\"') AS client, count(*) AS calls "
                 "FROM spans WHERE span_kind = 'llm' GROUP BY 1 ORDER BY 1")
        rows = _json_lines(control.sh(shlex.join([ARCLIGHT, "query", query, "--format", "json", "-c", config,
                                                 *[a for k, v in run.items() for a in ("--set", f"{k}={v}")]]),
                                     env=AWS, timeout_s=300).stdout)
        assert {r["client"] for r in rows} == {w.address for w in workers}, rows
        # the faults: no rollout left out; those work-2 took down with it ran again as our failure, not the agent's
        query = ("SELECT epoch, status, coalesce(error_kind, '') AS kind, count(*) AS n, "
                 "sum(coalesce(infra_failures, 0))::INTEGER AS reruns FROM rollouts WHERE mode = 'train' GROUP BY ALL ORDER BY ALL")
        states = _json_lines(control.sh(shlex.join([ARCLIGHT, "query", query, "--format", "json", "-c", config,
                                                   *[a for k, v in run.items() for a in ("--set", f"{k}={v}")]]),
                                       env=AWS, timeout_s=300).stdout)
        print("rollouts by epoch and status:", states)
        assert all(r["status"] == "succeeded" for r in states), states
        assert sum(r["reruns"] for r in states if r["epoch"] == 1) > 0, states
        assert re.search(r"epoch 1: \d+ rollouts lost with their worker", log), "no batch was lost with work-2"
        # no span data file on the collector's disk (control's is looked at after the last epoch)
        assert ingest.sh("find /mnt/lake -path '*spans/*' -name '*.parquet'").stdout == ""
        assert int(store.sh(f"{PYTHON} -c \"import boto3; print(boto3.client('s3', endpoint_url='{s3}', "
                            "region_name='us-east-1').list_objects_v2(Bucket='arclight', Prefix='spans/')['KeyCount'])\"",
                            env=AWS).stdout) > 0

        # the MLflow server holds both epochs' metrics
        history = control.sh(f"{PYTHON} -c \"from mlflow import MlflowClient; c = MlflowClient('{mlflow_uri}'); "
                             "runs = c.search_runs([e.experiment_id for e in c.search_experiments()]); "
                             "print(sorted(m.step for r in runs for m in c.get_metric_history(r.info.run_id, "
                             "'reward/mean')))\"").stdout.strip()
        assert history == "[0, 1]", history
        # the train hosts logged every step and the checkpoints there; the registered versions point at them
        logged = _json_lines(control.sh(
            f"{PYTHON} -c \"import json; from mlflow import MlflowClient; c = MlflowClient('{mlflow_uri}'); "
            "runs = c.search_runs([e.experiment_id for e in c.search_experiments()]); "
            "print(json.dumps({'steps': sum(len(c.get_metric_history(r.info.run_id, 'loss')) for r in runs), "
            "'sources': sorted(v.source for v in c.search_model_versions())}))\"").stdout)[-1]
        assert logged["steps"] >= 2 and len(logged["sources"]) == 2, logged
        assert all(src.startswith("mlflow-artifacts:") and "/checkpoints/calc-v" in src for src in logged["sources"]), logged

        # epoch 2: ingest's link goes down for good as its rollouts start. The agents' exporters retry, then give up;
        # the run stops in one paragraph (from the worker whose outcome spans could not leave, or from the ingest
        # barrier after waiting serving.startup_timeout_s, 30 s here, for the collector), trains nothing on the spans
        # that did arrive, and makes no version. The workers' own output stays on their nodes
        took_("checks after epoch 1")
        down = _IngestDownForGood(hosts)
        third = {**run, "serving.startup_timeout_s": "30"}
        stopped = control.sh(shlex.join([ARCLIGHT, "train", config, "--epochs", "3",
                                         *[a for k, v in third.items() for a in ("--set", f"{k}={v}")]]),
                             env={**AWS, **ray_auth, **tokens, "PREFECT_API_URL": prefect_api}, timeout_s=900, check=False)
        said = stopped.stdout + stopped.stderr
        (tmp_path / "logs" / "control-train-epoch-2.log").write_text(said)
        took_("epoch 2 stopped")
        down.stop()
        assert "ingest down" in down.seen, "epoch 2's rollouts never started"
        assert stopped.returncode != 0, said[-5000:]
        collector_at = rf"the\s+collector\s+at\s+http://{re.escape(ingest.address)}:4318\S*"
        paragraph = re.search(rf"error:\s+(the\s+outcome\s+spans\s+of\s+epoch\s+2's\s+rollouts\s+could\s+not\s+be\s+"
                              rf"delivered\s+to\s+{collector_at}|{collector_at}\s+did\s+not\s+answer\s+for\s+30\s+s).*?"
                              r"run\s+the\s+same\s+command\s+again\s+to\s+resume", said, re.S)
        assert paragraph, said[-5000:]
        assert "Traceback" not in said and "opentelemetry" not in said, said[-5000:]
        print("ingest down for good in epoch 2:", " ".join(paragraph.group(0).split()))
        keys = _s3_keys(store, s3, "weights/")
        assert not any("calc-v3" in k for k in keys), keys
        versions = control.sh(f"{PYTHON} -c \"from mlflow import MlflowClient; "
                              f"print(len(MlflowClient('{mlflow_uri}').search_model_versions()))\"").stdout.strip()
        assert versions == "2", versions

        # ingest's link is back; the same command resumes epoch 2, which makes calc-v3. vLLM serves the weights of the
        # version the catalog recorded, byte for byte: its copy on serve's disk, the published one on S3 (manifest) and
        # the merged folder next to the recorded path on the train host that made it
        took_("checks after epoch 2")
        resumed = control.sh(shlex.join([ARCLIGHT, "train", config, "--epochs", "3",
                                         *[a for k, v in run.items() for a in ("--set", f"{k}={v}")]]),
                             env={**AWS, **ray_auth, **tokens, "PREFECT_API_URL": prefect_api}, timeout_s=900, check=False)
        said = resumed.stdout + resumed.stderr
        (tmp_path / "logs" / "control-train-resumed.log").write_text(said)
        took_("epoch 2 resumed")
        assert resumed.returncode == 0, said[-5000:]
        log = control.sh("cat /mnt/project/.arclight/logs/arclight.log").stdout
        made = re.search(r"epoch 2: calc-v3 from \d+ triplets, \d+ steps on ([\d.]+)", log)
        assert made and made.group(1) in by_ip, log[-3000:]
        recorded = {r["version"]: r for r in _json_lines(control.sh(shlex.join([
            ARCLIGHT, "query", "SELECT version, path, epoch FROM policy_versions ORDER BY version", "--format", "json",
            "-c", config, *[a for k, v in run.items() for a in ("--set", f"{k}={v}")]]), env=AWS, timeout_s=300).stdout)}
        assert sorted(recorded) == ["calc-v1", "calc-v2", "calc-v3"] and recorded["calc-v3"]["epoch"] == 2, recorded
        fetched = "/mnt/project/.arclight/gateway/weights/calc/calc-v3.merged"
        assert f"reloaded the weights of calc from {fetched}" in log
        manifest = json.loads(store.sh(f"{PYTHON} -c \"import boto3; print(boto3.client('s3', endpoint_url='{s3}', "
                                       "region_name='us-east-1').get_object(Bucket='arclight', "
                                       "Key='weights/calc/calc-v3.merged/manifest.json')['Body'].read().decode())\"",
                                       env=AWS).stdout)
        published = {name: entry["sha256"] for name, entry in manifest["files"].items()}
        served = _sha256s(serve, fetched)
        assert served == published == _sha256s(by_ip[made.group(1)], recorded["calc-v3"]["path"] + ".merged"), (
            served, published)
        print(f"resumed epoch 2 made calc-v3 on {made.group(1)}; vLLM serves it: {len(served)} files, "
              f"model.safetensors sha256 {served.get('model.safetensors', '?')[:16]}")

        # each train host keeps serving.keep_versions (1) of the versions it made, with their optimizer state and
        # merged weights, and of the parents it fetched; the one that made calc-v3 keeps that one
        keep = int(run["serving.keep_versions"])
        for trainer in trainers:
            held = [h.removeprefix("/mnt/project/.arclight/") for h in trainer.sh(
                "find /mnt/project/.arclight/checkpoints /mnt/project/.arclight/trainer/parents -mindepth 2 -maxdepth 2 "
                "-type d -not -name '.*' 2>/dev/null | sort").stdout.split()]
            print(f"{trainer.name} holds: {held}")
            for root in ("checkpoints/calc/", "trainer/parents/calc/"):
                folders = [h.removeprefix(root) for h in held if h.startswith(root)]
                assert len({re.sub(r"\.(state|merged)$", "", f) for f in folders}) <= keep, (trainer.name, held)
                assert len([f for f in folders if f.endswith(".merged")]) <= keep, (trainer.name, held)
        assert {h for h in by_ip[made.group(1)].sh("ls /mnt/project/.arclight/checkpoints/calc").stdout.split()
                if h != "latest"} == {"calc-v3", "calc-v3.state", "calc-v3.merged"}

        # nothing of the spans is on control's disk (its /mnt and /tmp): no file of the span tables, nor a read copy
        # (<lake>/_mirror); the state tables, the pipeline's outputs and the logs stay
        # (the repository is seen on every host, under /tmp too when CI clones it there: its virtualenvs hold packages
        # with folders named spans/, so it is left out, and only data files count)
        find_here = f"find /mnt /tmp -path {shlex.quote(str(REPO))} -prune -o"
        spans_here = control.sh(f"{find_here} -type f \\( -path '*/_mirror/*' "
                                "-o -name '*.parquet' \\( -path '*spans/*' -o -path '*/training/run_id=*' -o -path "
                                "'*/production/date=*' \\) \\) -not -name part-0-schema.parquet -print").stdout.split()
        print("span data files on control's disk:", spans_here or "none")
        print("parquet files on control's disk, by table:\n" + control.sh(
            f"{find_here} -name '*.parquet' -print | sed -E 's#/[^/]*$##; s#/[a-z_]+=[^/]*##g' | sort | uniq -c").stdout)
        assert spans_here == [], spans_here
        took_("checks after the resume")
        print("seconds taken:", took)


def test_two_ranks_on_two_train_hosts_train_what_one_process_does_and_a_dead_host_makes_no_version(tmp_path):
    """``trainer.processes: 2`` as Ray ranks on ``train-1`` and ``train-2`` (torch.distributed's TCP rendezvous at rank
    0, gloo over the hosts' link), driven from ``control`` as the flow's training stage does
    (tests/helpers/train_driver.py): the adapter equals one process's on the same samples. Then ``train-2`` dies during
    a step: the stage fails naming the rank, the other rank is stopped, and no version is recorded or published."""
    names = ["store", "control", "train-1", "train-2"]
    with Hosts(names, logs=tmp_path / "logs") as hosts:
        store, control = hosts["store"], hosts["control"]
        trainers = [hosts["train-1"], hosts["train-2"]]
        s3, mlflow_uri = f"http://{store.address}:5000", f"http://{store.address}:5001"
        ray_auth = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": uuid.uuid4().hex, "RAY_agent_register_timeout_ms": "300000"}
        mlflow = _store(store)
        head = _ray_start(control, "--head", "--port=6379", "--num-cpus=0", env=ray_auth)
        nodes = [_ray_start(t, f"--address={control.address}:6379", "--num-cpus=0", '--resources={"train": 1}',
                            env={**ray_auth, **AWS, "ARCLIGHT_TRAIN_THREADS": "1"}) for t in trainers]
        deadline = time.monotonic() + 300
        while " 0.0/2.0 train" not in (status := control.sh(f"{REPO}/.venv/bin/ray status --address={control.address}:6379",
                                                             env=ray_auth, check=False).stdout):
            for node in (head, *nodes):
                assert node.poll() is None, node.log_path.read_text()[-3000:]
            assert time.monotonic() < deadline, f"the two train hosts did not join in 300 s:\n{status}"
            time.sleep(3)
        _wait(control, f"{mlflow_uri}/health", timeout_s=180, process=mlflow)
        for host in (control, *trainers):  # the same tiny model (seeded) on each host's own disk, as one installs it
            host.sh(f"cd {REPO} && " + shlex.join([PYTHON, "-c", "import sys; from pathlib import Path; from "
                                                   "tests.tiny_llama import build_tiny_llama; "
                                                   "build_tiny_llama(Path(sys.argv[1]))", "/tmp/tiny"]), timeout_s=120)

        def drive(name: str, *extra: str, timeout_s: float = 600):
            argv = [PYTHON, "-m", "tests.helpers.train_driver", "--project", f"/tmp/{name}", "--model", "/tmp/tiny",
                    "--weights", f"s3://arclight/{name}", "--weights-options", json.dumps({"AWS_ENDPOINT_URL": s3}),
                    "--mlflow", mlflow_uri, "--resources", json.dumps({"train": 1, "CPU": 0}), *extra]
            done = control.sh(f"cd {REPO} && {shlex.join(argv)}", env={**AWS, **ray_auth}, timeout_s=timeout_s, check=False)
            events = {e["event"]: e for e in _json_lines("\n".join(line for line in done.stdout.splitlines()
                                                                   if line.startswith("{")))}
            assert "catalog" in events, done.stdout[-3000:] + done.stderr[-3000:]
            return events

        one = drive("one", "--local", "--processes", "1")
        two = drive("two", "--address", f"{control.address}:6379", "--processes", "2")
        assert "trained" in two and two["trained"]["version"] == "default-v1", two
        rank0 = re.search(r"steps on ([\d.]+)", two["trained"]["message"]).group(1)
        assert rank0 in {t.address for t in trainers}, two["trained"]["message"]
        assert two["trained"]["losses"] == pytest.approx(one["trained"]["losses"], rel=1e-4, abs=1e-6)
        # the published adapter (fetched from S3 on control) against the one process's
        compare = ("import json, sys; from pathlib import Path; from safetensors.torch import load_file; "
                   "from lightning_core.common import published; a = load_file(sys.argv[1]); "
                   "b = load_file(str(published.fetch('s3://arclight/two/default/default-v1', Path('/tmp/fetched'), "
                   "options=json.loads(sys.argv[2])) / 'adapter_model.safetensors')); "
                   "print(max(float((a[k] - b[k]).abs().max()) for k in a))")
        error = float(control.sh(f"cd {REPO} && " + shlex.join([
            PYTHON, "-c", compare, "/tmp/one/.arclight/checkpoints/default/default-v1/adapter_model.safetensors",
            json.dumps({"AWS_ENDPOINT_URL": s3})]), env=AWS, timeout_s=120).stdout.strip())
        print(f"two ranks on train-1/train-2 against one process: max abs difference {error:.2e}")
        assert error < 1e-5
        assert control.sh("ls /tmp/two/.arclight/checkpoints 2>/dev/null", check=False).stdout == ""  # not on control

        # train-2 dies (every process on it) a few seconds into a long training
        slow = ("--address", f"{control.address}:6379", "--processes", "2", "--groups", "8", "--tokens-per-step", "30",
                "--passes", "30")
        result: dict = {}
        driver = threading.Thread(target=lambda: result.update(drive("dies", *slow)), daemon=True)
        driver.start()
        deadline = time.monotonic() + 300
        while not any("ray::train_on_host" in _cmdline(pid) for pid in trainers[1].pids()):
            assert driver.is_alive() and time.monotonic() < deadline, f"no rank started on train-2: {result}"
            time.sleep(0.5)
        time.sleep(3)
        trainers[1].kill_all()
        driver.join(timeout=300)
        assert not driver.is_alive(), "the stage did not end after train-2 died"
        assert result["failed"]["type"] == "TrainHostError", result
        assert re.search(r"training default-v1 failed on rank [01] of 2 \(the other ranks were stopped\): .+; no version "
                         r"was made of it", result["failed"]["error"]), result["failed"]
        print("train-2 died:", result["failed"]["error"])
        assert result["catalog"]["versions"] == []
        deadline = time.monotonic() + 60  # the rank on train-1 is stopped, not left waiting in the all-reduce
        while any("ray::train_on_host" in _cmdline(pid) for pid in trainers[0].pids()):
            assert time.monotonic() < deadline, "the rank on train-1 outlived the stage"
            time.sleep(1)
        listed = store.sh(f"{PYTHON} -c \"import boto3; print(boto3.client('s3', endpoint_url='{s3}', "
                          "region_name='us-east-1').list_objects_v2(Bucket='arclight', Prefix='dies/')['KeyCount'])\"",
                          env=AWS).stdout.strip()
        assert listed == "0", listed  # nothing published


def _cmdline(pid: int) -> str:
    with contextlib.suppress(OSError):
        return Path(f"/proc/{pid}/cmdline").read_text().replace("\0", " ")
    return ""


def _sha256s(host, folder: str) -> dict[str, str]:
    """Every file under ``folder`` on ``host`` but a fetched copy's ``manifest.json``: its relative path -> sha256."""
    out = host.sh(f"cd {shlex.quote(folder)} && find . -type f -not -name manifest.json | sort | xargs sha256sum").stdout
    return {path.removeprefix("./"): digest for digest, path in (line.split(None, 1) for line in out.splitlines())}


def _runs_a_rollout_batch(cmdline: str) -> bool:
    """A Ray worker process running a batch of rollouts: Ray titles a worker ``ray::<task name>`` while it runs a task
    (prefect-ray names it after the Prefect task, ``rollouts``) and ``ray::IDLE`` once it is done."""
    return cmdline.startswith("ray::rollouts")
