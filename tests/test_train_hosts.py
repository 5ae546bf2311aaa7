"""The training stage on train hosts (``trainer.executor: ray``, issue 53 steps 2 and 3): a Ray head with two ``train``
slots on this machine, the tiny Llama, the weights store a folder. Across hosts that share no disk:
tests/test_hosts.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from lightning_core.common import published
from lightning_core.config import ConfigError, load_config
from lightning_core.epoch.failures import TrainHostError
from lightning_core.epoch.train_hosts import _with_parent_here
from lightning_core.trainer.train import TrainJob
from tests.conftest import REPO
from tests.tiny_llama import build_tiny_llama

SERVER = ["tracking.mlflow_uri=http://10.0.0.9:5000", "serving.weights_uri=s3://weights/calc"]


def test_training_on_a_train_host_is_refused_without_a_cluster_a_weights_store_or_an_mlflow_server():
    with pytest.raises(ConfigError) as refused:
        load_config(None, overrides=["trainer.executor=ray"])
    text = str(refused.value)
    assert "trainer.address" in text and "serving.weights_uri" in text and "tracking.mlflow_uri: http" in text
    with pytest.raises(ConfigError, match=r"tracking.mlflow_uri: http"):
        load_config(None, overrides=["trainer.executor=ray", "trainer.address=10.0.0.2:6379",
                                     "serving.weights_uri=s3://weights/calc", "tracking.mlflow_uri=sqlite:///m.db"])
    cfg = load_config(None, overrides=["trainer.executor=ray", "rollouts.executor=ray", "rollouts.address=10.0.0.2:6379",
                                       *SERVER])
    assert cfg.trainer.ray_resources == {"train": 1.0}  # rollouts.address serves as the trainer's cluster too
    with pytest.raises(ConfigError, match=r"where training runs is the whole run's"):
        load_config(None, values={"policies": [{"name": "a", "trainer": {"executor": "ray"}}]})


def test_async_epochs_with_ray_rollouts_and_ray_training_are_refused_at_load():
    both = ["trainer.executor=ray", "rollouts.executor=ray", "rollouts.address=10.0.0.2:6379", *SERVER]
    with pytest.raises(ConfigError) as refused:
        load_config(None, overrides=[*both, "trainer.max_staleness=1"])
    text = str(refused.value)
    assert "trainer.max_staleness = 1" in text and "ray.shutdown()" in text  # what was found, and why
    assert "trainer.max_staleness: 0" in text and "rollouts.executor" in text  # the settings that fix it
    assert load_config(None, overrides=both).trainer.max_staleness == 0  # the epochs one after another
    assert load_config(None, overrides=[*both[:1], *both[2:], "trainer.max_staleness=1"]).rollouts.executor == "local"


def test_rollouts_and_training_on_two_ray_clusters_are_refused_naming_the_one_cluster_setup():
    """The flow's process holds one Ray connection and prefect-ray's runner reuses an open one, so with two addresses
    the second epoch's rollouts went to the trainer's cluster, silently."""
    both = ["trainer.executor=ray", "rollouts.executor=ray", "rollouts.address=10.0.0.2:6379", *SERVER]
    with pytest.raises(ConfigError) as refused:
        load_config(None, overrides=[*both, "trainer.address=10.0.0.3:6379"])
    text = str(refused.value)
    assert "trainer.address (10.0.0.3:6379)" in text and "rollouts.address (10.0.0.2:6379)" in text
    assert "ray start --address=10.0.0.2:6379" in text and "leave trainer.address unset" in text
    assert load_config(None, overrides=[*both, "trainer.address=10.0.0.2:6379"]).trainer.address == "10.0.0.2:6379"
    local = ["trainer.executor=ray", "rollouts.executor=ray", "rollouts.address=127.0.0.1:6379", *SERVER]
    assert load_config(None, overrides=[*local, "trainer.address=localhost:6379"]).trainer.address == "localhost:6379"
    # rollouts elsewhere (dask, or this machine) and training on a Ray cluster: one Ray connection, accepted
    assert load_config(None, overrides=["trainer.executor=ray", "trainer.address=10.0.0.3:6379", *SERVER]).trainer.address


def _job(tmp_path: Path, **kw) -> TrainJob:
    config = load_config(None, overrides=[f"project_dir={tmp_path / 'host'}", f"serving.weights_uri=file://{tmp_path}/store"]).resolved()
    fields = dict(config=config, policy="calc", version="calc-v3", run_id="r1", epoch=2, cfg=config.trainer, samples=[],
                  base_model_dir=str(tmp_path), parent_version="calc-v2",
                  parent_adapter_dir=str(tmp_path / "control-only" / "calc-v2"), parent_state_dir=None,
                  mlflow_run_id="m", first_step=0)
    return TrainJob(**{**fields, **kw})


def test_a_train_host_fetches_the_parent_it_did_not_train_with_its_optimizer_state(tmp_path):
    made = tmp_path / "made" / "calc-v2"
    made.mkdir(parents=True)
    (made / "adapter_model.safetensors").write_bytes(b"weights")
    state = tmp_path / "made" / "calc-v2.state"
    state.mkdir()
    (state / "optimizer.pt").write_bytes(b"moments")
    for folder in (made, state):
        published.publish(folder, published.join(f"file://{tmp_path}/store", "calc", folder.name))
    job = _with_parent_here(_job(tmp_path))
    assert Path(job.parent_adapter_dir, "adapter_model.safetensors").read_bytes() == b"weights"
    assert Path(job.parent_state_dir, "optimizer.pt").read_bytes() == b"moments"
    assert Path(job.parent_adapter_dir).is_relative_to(tmp_path / "host")  # the host's own disk
    here = _job(tmp_path, parent_adapter_dir=str(made))  # a parent this host trained: its own folder, nothing fetched
    assert _with_parent_here(here).parent_adapter_dir == str(made)


def test_a_parent_never_published_fails_the_stage_naming_it(tmp_path):
    with pytest.raises(TrainHostError, match=r"training calc-v3 needs its parent calc-v2, which this train host did not "
                                             r"train and could not fetch: nothing is published at"):
        _with_parent_here(_job(tmp_path))


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """A Ray head with 2 CPUs and two ``train`` slots: two ranks fit, as on two train hosts."""
    from tests.helpers.ray_head import ray_head

    with ray_head(tmp_path_factory.mktemp("ray"), num_cpus=2, resources={"train": 2}) as address:
        yield address


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return build_tiny_llama(tmp_path_factory.mktemp("tiny") / "model")


def _drive(tmp_path: Path, name: str, tiny: Path, *, address: str | None, **options):
    args = [sys.executable, "-m", "tests.helpers.train_driver", "--project", str(tmp_path / name), "--model", str(tiny),
            "--weights", f"file://{tmp_path}/store-{name}", "--mlflow", f"sqlite:///{tmp_path}/mlflow-{name}.db",
            *(["--address", address] if address else ["--local"]),
            *[a for k, v in options.items() for a in (f"--{k.replace('_', '-')}", str(v))]]
    done = subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=600)
    return _events(done.stdout, done.stderr)


def _events(stdout: str, stderr: str = "") -> dict[str, dict]:
    events = {}
    for line in stdout.splitlines():  # Ray's raylet writes lines of its own there too
        if line.startswith("{"):
            event = json.loads(line)
            events[event["event"]] = event
    assert "catalog" in events, stdout[-3000:] + stderr[-3000:]
    return events


@pytest.mark.integration
def test_two_ranks_on_train_slots_make_the_one_process_version_and_the_next_from_the_store(cluster, tiny, tmp_path):
    from mlflow.tracking import MlflowClient
    from safetensors.torch import load_file

    for epoch in (0, 1):
        local = _drive(tmp_path, "local", tiny, address=None, processes=1, epoch=epoch)
        if epoch == 1:  # the ranks' host lost its disk: the parent and its optimizer state come from the store
            import shutil

            shutil.rmtree(tmp_path / "ranks" / ".arclight" / "checkpoints")
        ranks = _drive(tmp_path, "ranks", tiny, address=cluster, processes=2, epoch=epoch)
        version = f"default-v{epoch + 1}"
        assert local["trained"]["version"] == ranks["trained"]["version"] == version, ranks
        assert " on " in ranks["trained"]["message"]  # says where it trained
        assert ranks["trained"]["losses"] == pytest.approx(local["trained"]["losses"], rel=1e-4, abs=1e-6)
        # as the trainer counted them: two ranks ran the step's micro-batches between them, rank 0 only its share
        steps = len(local["trained"]["losses"])
        assert local["trained"]["world_sizes"] == [1] * steps and ranks["trained"]["world_sizes"] == [2] * steps, ranks
        assert ranks["trained"]["micro_batches"] == local["trained"]["micro_batches"], ranks
        assert all(0 < mine < every for mine, every in zip(ranks["trained"]["rank0_micro_batches"],
                                                            ranks["trained"]["micro_batches"])), ranks
        one = load_file(str(Path(local["trained"]["path"]) / "adapter_model.safetensors"))
        two = load_file(str(Path(ranks["trained"]["path"]) / "adapter_model.safetensors"))
        assert max(float((one[k] - two[k]).abs().max()) for k in one) < 1e-5 < max(float(v.abs().max()) for v in one.values())
        store = tmp_path / "store-ranks" / "default"
        assert (store / version / "adapter_model.safetensors").is_file()
        assert not (store / version / "optimizer.pt").exists()  # vLLM's hosts fetch the lean copy ...
        assert (store / f"{version}.state" / "optimizer.pt").is_file()  # ... the next train host the moments
        client = MlflowClient(f"sqlite:///{tmp_path}/mlflow-ranks.db")
        run_id = ranks["trained"]["mlflow_run_id"]
        assert len(client.get_metric_history(run_id, "loss")) == len(ranks["trained"]["losses"]) * (epoch + 1)
        assert [a.path for a in client.list_artifacts(run_id, f"checkpoints/{version}")]
    assert (tmp_path / "ranks" / ".arclight" / "trainer" / "parents" / "default" / "default-v1.state").is_dir()


@pytest.mark.integration
def test_a_cluster_without_the_trainers_resources_says_how_to_start_a_train_host(cluster, tiny, tmp_path):
    events = _drive(tmp_path, "nohost", tiny, address=cluster, resources=json.dumps({"gpu-train": 1}))
    assert events["failed"]["type"] == "TrainHostError"
    assert f"ray start --address {cluster} --resources '{{\"gpu-train\": 1.0}}'" in events["failed"]["error"]


_CTRL_C_SCENARIO = """
import _thread, signal, sys, threading
from pathlib import Path

signal.signal(signal.SIGINT, signal.default_int_handler)  # as a terminal's Ctrl-C finds it (an ignored SIGINT is inherited)

import ray
from ray.exceptions import RayError

from lightning_core.epoch.train_hosts import _wait_for
from tests.test_train_hosts import _job

tmp, marker = Path(sys.argv[1]), Path(sys.argv[1]) / "published"


def rank_that_publishes(marker):  # a rank in little
    import time

    time.sleep(30)  # trains (cancelled, it never publishes; not cancelled, ray.get below returns)...
    Path(marker).write_text("published")  # ... and publishes


ray.init(address="local", num_cpus=1, resources={"train": 1}, include_dashboard=False, logging_level="WARNING",
         log_to_driver=False)
try:
    ref = ray.remote(max_retries=0)(rank_that_publishes).options(num_cpus=0, resources={"train": 1}).remote(str(marker))
    threading.Timer(1.5, _thread.interrupt_main).start()  # the first Ctrl-C: KeyboardInterrupt in the main thread
    try:
        _wait_for([ref], job=_job(tmp), should_stop=None)
        sys.exit("_wait_for returned: the Ctrl-C did not reach it")
    except KeyboardInterrupt:
        pass
    try:
        ray.get(ref, timeout=90)
        sys.exit("the rank was not cancelled: it trained on and returned")
    except RayError as exc:
        print("cancelled:", type(exc).__name__)
    assert not marker.exists(), "the cancelled rank published"
finally:
    ray.shutdown()
"""


@pytest.mark.integration
def test_ctrl_c_while_one_rank_trains_cancels_its_ray_task(tmp_path):
    """``trainer.processes: 1`` has no placement group whose removal stops the rank: a Ctrl-C (KeyboardInterrupt in the
    flow's wait) must cancel the task, or it trains on and publishes a version that nobody records. In a fresh
    interpreter with a local Ray of its own: in CI's pytest process the module's namespaced head was not reachable
    (c19d98c), Ray kept the token of an earlier test's head (f728853: InvalidAuthToken), and an earlier test's SIGINT
    handler swallowed the simulated Ctrl-C (eb1064d: "DID NOT RAISE KeyboardInterrupt")."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env["PYTHONPATH"] = str(REPO)
    done = subprocess.run([sys.executable, "-c", _CTRL_C_SCENARIO, str(tmp_path)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    assert "cancelled: " in done.stdout, done.stdout
    assert not (tmp_path / "published").exists()
