"""Rollouts of a real training epoch on a real local Dask cluster (a scheduler and 2 worker processes)
and on a real Ray head node started by the test.

The flow's process keeps the catalog; the workers get only the gateway's and collector's URLs and
tokens. A hung agent on a worker is killed at its timeout, and retries get a new attempt number.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time

import httpx
import psutil
import pytest

from lightning_core.store.catalog import Catalog
from tests.conftest import make_config
from tests.test_flows import POLICY, _dataset, _overrides

pytestmark = pytest.mark.integration

TIMEOUT_S = 20  # 10 s was too short for a first request to a freshly started CPU vLLM on a loaded machine


def where_tasks_ran():
    """A scheduler plugin that records the worker each finished task ran on."""
    from distributed.diagnostics.plugin import SchedulerPlugin

    class WhereTasksRan(SchedulerPlugin):
        name = "arclight-where-tasks-ran"

        def __init__(self):
            self.workers: dict[str, str] = {}

        def transition(self, key, start, finish, *args, **kwargs):
            if finish == "memory" and kwargs.get("worker"):
                self.workers[str(key)] = kwargs["worker"]

    return WhereTasksRan()


@pytest.fixture(scope="module")
def dask_cluster():
    import dask
    from distributed import LocalCluster

    # Rollouts run in child processes (so a hung agent can be killed); daemonic workers may not have children.
    with dask.config.set({"distributed.worker.daemon": False}):
        cluster = LocalCluster(n_workers=2, threads_per_worker=2, processes=True, dashboard_address=None,
                               memory_limit="2GiB")
        try:
            yield cluster
        finally:
            cluster.close()


def rollout_children(dask_worker=None) -> dict[str, list[int]]:
    """Run on a worker: its fork server(s) and the rollout processes still alive under them."""
    me = psutil.Process()
    servers = [c for c in me.children() if "forkserver" in " ".join(c.cmdline())]
    return {"servers": [s.pid for s in servers], "alive": [g.pid for s in servers for g in s.children(recursive=True)]}


QUESTIONS = [{"id": f"d{i}", "question": f"Say the word {w}.", "target": w}
             for i, w in enumerate(["xyzzy", "plugh", "qwfp", "zork"])]
ODD = [{"id": "stuck", "behavior": "hang", "question": "", "target": ""},
       {"id": "flaky", "behavior": "flaky", "question": "Say the word frob.", "target": "frob"}]


def _running(pid: int) -> bool:
    """The process exists and is not a zombie waiting to be reaped."""
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def run_epoch_on(executor: str, address: str, *, run_name: str, tmp_path, vllm_server, collector, collector_config,
                 tiny_model_dir) -> dict[int, tuple[str, int]]:
    """Run one training epoch with rollouts on the cluster, check what every executor must do; return the
    processes that ran rollouts, as the agents' spans saw them while they ran: pid -> (title, parent's pid)."""
    from flows.train import train_epoch

    hung = tmp_path / "hung"  # the hung agent writes its pid and its child's there
    hung.mkdir()
    dataset = _dataset(tmp_path / "tasks.jsonl", QUESTIONS + [{**t, "pid_dir": str(hung)} if t["behavior"] == "hang" else t
                                                              for t in ODD])
    overrides = _overrides(tmp_path, vllm_server=vllm_server, collector=collector, collector_config=collector_config,
                           tiny_model_dir=tiny_model_dir, dataset=dataset,
                           **{"run_name": run_name, "rollouts.group_size": "2", "rollouts.timeout_s": str(TIMEOUT_S),
                              "rollouts.retries": "1", "rollouts.executor": executor, "rollouts.address": address})
    result = train_epoch(overrides=overrides)

    cfg = make_config(tmp_path, *overrides)
    with Catalog.from_config(cfg).read() as con:
        rows = con.execute("SELECT task_id, status, attempt, error, epoch(finished_at) - epoch(started_at) FROM rollouts "
                           "WHERE run_id = ? AND epoch = 0 ORDER BY rollout_id", [run_name]).fetchall()
        flaky_llm_attempts = con.execute(
            "SELECT DISTINCT attempt FROM spans WHERE run_id = ? AND epoch = 0 AND span_kind = 'llm' "
            "AND task_id = 'flaky'", [run_name]).fetchall()
        versions = con.execute("SELECT version FROM policy_versions WHERE run_id = ?", [run_name]).fetchall()
        # the model-call spans the gateway recorded for each rollout's attempt, which the worker sent back: all stored
        unstored = con.execute(
            "SELECT r.rollout_id, r.gateway_spans, count(s.span_id) FROM rollouts r LEFT JOIN spans s ON s.run_id = r.run_id "
            "AND s.rollout_id = r.rollout_id AND s.attempt = r.attempt AND s.span_kind = 'llm' "
            "WHERE r.run_id = ? AND r.epoch = 0 AND r.status = 'succeeded' GROUP BY ALL "
            "HAVING count(s.span_id) IS DISTINCT FROM r.gateway_spans", [run_name]).fetchall()
        runners = con.execute(
            "SELECT DISTINCT task_id, CAST(json_extract(attributes, '$.\"test.runner_pid\"') AS BIGINT), "
            "json_extract_string(attributes, '$.\"test.runner\"'), "
            "CAST(json_extract(attributes, '$.\"test.runner_parent_pid\"') AS BIGINT) FROM spans "
            "WHERE run_id = ? AND epoch = 0 AND name = 'agent responder'", [run_name]).fetchall()
    by_task: dict[str, list[tuple]] = {}
    for task_id, *rest in rows:
        by_task.setdefault(task_id, []).append(tuple(rest))

    assert result["status"] == "completed" and versions == [(f"{POLICY}-v1",)]
    assert all(status == "succeeded" and attempt == 0 for q in QUESTIONS for status, attempt, _, _ in by_task[q["id"]])
    assert unstored == [], f"(rollout, the gateway's count, model-call spans in the lake) that differ: {unstored}"
    # The hung agent was stopped at the timeout on each of its two attempts (retries=1), the second numbered 1:
    # given its full time, then killed with the child it started (what happened, not how fast: a loaded machine is slow)
    for status, attempt, error, seconds in by_task["stuck"]:
        assert status == "timed_out" and attempt == 1 and f"within {TIMEOUT_S} s" in error
        assert seconds >= TIMEOUT_S
    started = {f.name: [int(pid) for pid in f.read_text().split()] for f in hung.iterdir()}
    assert len(started) == 4, started  # 2 samples x 2 attempts
    assert {name: pids for name, pids in started.items() if any(map(_running, pids))} == {}, "hung agents left running"
    # The flaky agent failed attempt 0 and succeeded on attempt 1, which the worker registered with the gateway.
    assert [(s, a) for s, a, _, _ in by_task["flaky"]] == [("succeeded", 1), ("succeeded", 1)]
    assert flaky_llm_attempts == [(1,)]
    assert {task for task, *_ in runners} == {*(q["id"] for q in QUESTIONS), "flaky"}  # a killed agent exports no span
    assert psutil.Process().pid not in {pid for _, pid, _, _ in runners}  # no rollout ran in the flow's process
    return {pid: (title, parent) for _, pid, title, parent in runners}


def test_epoch_rollouts_run_on_two_dask_workers_and_a_hung_one_is_killed_at_its_timeout(
    prefect_harness, dask_cluster, tmp_path, vllm_server, collector, collector_config, tiny_model_dir
):
    from distributed import Client

    plugin = where_tasks_ran()
    dask_cluster.scheduler.add_plugin(plugin)
    pids = run_epoch_on("dask", dask_cluster.scheduler_address, run_name="daskrun", tmp_path=tmp_path,
                        vllm_server=vllm_server, collector=collector, collector_config=collector_config,
                        tiny_model_dir=tiny_model_dir)

    # Every rollout task ran on a Dask worker, both workers took some, and nothing of a rollout outlived it.
    rollout_keys = [k for k in plugin.workers if k.startswith("rollouts")]
    assert len(rollout_keys) == 2, plugin.workers  # 12 rollouts in batches of whole groups up to 8: d0-d3, stuck + flaky
    assert set(plugin.workers[k] for k in rollout_keys) == set(dask_cluster.scheduler.workers)
    with Client(dask_cluster) as client:
        children = client.run(rollout_children)
        worker_pids = client.run(lambda: psutil.Process().pid)
    assert set(children) == set(dask_cluster.scheduler.workers)
    for worker, procs in children.items():
        assert procs["servers"], f"worker {worker} started no rollout process"
        assert procs["alive"] == [], f"rollout processes still alive on {worker}: {procs['alive']}"
    assert set(pids) == set(worker_pids.values())


STEADY = {"id": "steady", "question": "Say the word frob.", "target": "frob", "turns": 6, "pause_s": 0.5}


def kill_the_worker_that_runs_rollouts(worker_pids: set[int], *, gateway_url: str, calls: int,
                                       stop: threading.Event) -> dict:
    """In a thread: once the gateway has answered ``calls`` model calls, kill the worker under which rollout processes
    run (a fork server's children) and every process under it, as when its node dies. Dask's nanny starts a fresh
    worker in its place. Returns what it killed, filled in when it did."""
    killed: dict = {}

    def answered() -> float:
        with contextlib.suppress(httpx.HTTPError):
            lines = httpx.get(f"{gateway_url}/metrics", timeout=5).text.splitlines()
            return sum(float(line.rsplit(" ", 1)[1]) for line in lines
                       if line.startswith("arclight_gateway_requests_total{") and 'status="200"' in line)
        return 0.0

    def watch():
        while not stop.wait(0.1):
            if answered() < calls:
                continue
            for pid in worker_pids:
                with contextlib.suppress(psutil.NoSuchProcess):
                    worker = psutil.Process(pid)
                    if any("forkserver" in " ".join(p.cmdline()) and p.children() for p in worker.children(recursive=True)):
                        for process in [worker, *worker.children(recursive=True)]:
                            with contextlib.suppress(psutil.NoSuchProcess):
                                process.kill()
                        killed.update(pid=pid, at=time.time())
                        return

    threading.Thread(target=watch, daemon=True).start()
    return killed


def test_a_batch_lost_with_its_dask_worker_runs_again_under_new_attempt_numbers(
    prefect_harness, dask_cluster, tmp_path, vllm_server, collector, collector_config, tiny_model_dir
):
    """A Dask worker killed in the middle of a batch, with its rollout processes. Dask runs a task again on another
    worker when the one running it dies (``distributed.scheduler.allowed-failures``): under the same attempt numbers,
    the two executions' spans shared (rollout id, attempt), and the triplets took the calls of both under one reward.
    The engine's second start is refused; the flow records the batch as our failure and runs it again under new
    attempt numbers, as for Ray. Uses the module's cluster (its nanny starts a fresh worker in the killed one's place)."""
    from distributed import Client

    from flows.train import train_epoch

    with Client(dask_cluster) as client:
        worker_pids = set(client.run(os.getpid).values())
    overrides = _overrides(tmp_path, vllm_server=vllm_server, collector=collector, collector_config=collector_config,
                           tiny_model_dir=tiny_model_dir, dataset=_dataset(tmp_path / "tasks.jsonl", [STEADY]),
                           **{"run_name": "dasklost", "rollouts.group_size": "2", "rollouts.timeout_s": str(TIMEOUT_S),
                              "rollouts.agent": "tests.helpers.flow_agent:run_steady", "rollouts.executor": "dask",
                              "rollouts.address": dask_cluster.scheduler_address})
    stop = threading.Event()  # killed once each of the two rollouts made about two of its six calls
    killed = kill_the_worker_that_runs_rollouts(worker_pids, gateway_url=make_config(tmp_path, *overrides).gateway.url,
                                                calls=4, stop=stop)
    try:
        result = train_epoch(overrides=overrides)
    finally:
        stop.set()
    assert killed, "no worker was seen running the batch's rollouts"

    with Catalog.from_config(make_config(tmp_path, *overrides)).read() as con:
        rows = con.execute("SELECT rollout_id, status, attempt, coalesce(infra_failures, 0) FROM rollouts "
                           "WHERE run_id = 'dasklost' AND epoch = 0 ORDER BY rollout_id").fetchall()
        calls = con.execute("SELECT rollout_id, attempt, count(*) FROM spans "
                            "WHERE run_id = 'dasklost' AND epoch = 0 AND span_kind = 'llm' GROUP BY ALL ORDER BY ALL").fetchall()
    assert result["status"] == "completed"
    # each (rollout, attempt) holds the calls of one execution (at most 6): the lost run's first ones under attempt 0,
    # a whole run under 1
    for rollout_id, attempt, n in calls:
        assert n <= STEADY["turns"], (f"rollout {rollout_id} attempt {attempt}: {n} model calls, from more than one "
                                      f"execution (calls {calls}, rollouts {rows})")
    # the lost batch ran again as our failure, under attempt 1
    assert [(status, attempt, reruns) for _, status, attempt, reruns in rows] == [("succeeded", 1, 1)] * 2, rows
    assert [(r, a, n) for r, a, n in calls if a == 1] == [(rollout_id, 1, STEADY["turns"]) for rollout_id, *_ in rows]


@pytest.fixture(scope="module")
def ray_cluster(tmp_path_factory):
    """A Ray head node (``ray start --head``) in its own process group, stopped by killing that group."""
    from tests.helpers.ray_head import ray_head

    with ray_head(tmp_path_factory.mktemp("ray")) as address:
        yield address


def test_epoch_rollouts_run_on_a_ray_cluster_and_a_hung_one_is_killed_at_its_timeout(
    prefect_harness, ray_cluster, tmp_path, vllm_server, collector, collector_config, tiny_model_dir
):
    runners = run_epoch_on("ray", ray_cluster, run_name="rayrun", tmp_path=tmp_path, vllm_server=vllm_server,
                           collector=collector, collector_config=collector_config, tiny_model_dir=tiny_model_dir)
    # Both batches ran in Ray worker processes started by the raylet of the test's head node (as the agents saw them
    # while they ran: a worker may be gone by now), not in this process, nor in a Ray instance started locally.
    gcs_port = ray_cluster.rsplit(":", 1)[1]
    raylets = [p.pid for p in psutil.process_iter(["name", "cmdline"]) if p.info["name"] == "raylet" and any(
        a.startswith("--gcs-address=") and a.endswith(f":{gcs_port}") for a in p.info["cmdline"] or [])]
    assert len(raylets) == 1, f"expected one raylet of the head node at {ray_cluster}, found {raylets}"
    raylet = raylets[0]
    assert runners and {pid: (title[:40], parent) for pid, (title, parent) in runners.items()
                        if not title.startswith("ray::") or parent != raylet} == {}, (
        f"rollouts ran outside the Ray workers of the head node's raylet (pid {raylet}): {runners}")
