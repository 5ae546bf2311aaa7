"""Rollouts of a real training epoch on a real local Dask cluster (a scheduler and 2 worker processes).

The flow's process keeps the catalog; the workers get only the gateway's and collector's URLs and
tokens. A hung agent on a worker is killed at its timeout, and retries get a new attempt number.
"""

from __future__ import annotations

import psutil
import pytest

from lightning_core.catalog import Catalog
from tests.conftest import make_config
from tests.test_flows import POLICY, _dataset, _overrides

pytestmark = pytest.mark.integration

TIMEOUT_S = 20  # 10 s was too short for a first request to a freshly started CPU vLLM on a loaded machine


@pytest.fixture(scope="module")
def prefect_harness():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=90):
        yield


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


def test_epoch_rollouts_run_on_two_dask_workers_and_a_hung_one_is_killed_at_its_timeout(
    prefect_harness, dask_cluster, tmp_path, vllm_server, collector, collector_config, tiny_model_dir
):
    from distributed import Client

    from flows.train import train_epoch

    plugin = where_tasks_ran()
    dask_cluster.scheduler.add_plugin(plugin)
    questions = [{"id": f"d{i}", "question": f"Say the word {w}.", "target": w}
                 for i, w in enumerate(["xyzzy", "plugh", "qwfp", "zork"])]
    odd = [{"id": "stuck", "behavior": "hang", "question": "", "target": ""},
           {"id": "flaky", "behavior": "flaky", "question": "Say the word frob.", "target": "frob"}]
    dataset = _dataset(tmp_path / "tasks.jsonl", questions + odd)
    overrides = _overrides(tmp_path, vllm_server=vllm_server, collector=collector, collector_config=collector_config,
                           tiny_model_dir=tiny_model_dir, dataset=dataset,
                           **{"run_name": "daskrun", "rollouts.group_size": "2", "rollouts.timeout_s": str(TIMEOUT_S),
                              "rollouts.retries": "1", "rollouts.executor": "dask",
                              "rollouts.address": dask_cluster.scheduler_address})
    result = train_epoch(overrides=overrides)

    cfg = make_config(tmp_path, *overrides)
    with Catalog.from_config(cfg).read() as con:
        rows = con.execute("SELECT task_id, status, attempt, error, epoch(finished_at) - epoch(started_at) FROM rollouts "
                           "WHERE run_id = 'daskrun' AND epoch = 0 ORDER BY rollout_id").fetchall()
        flaky_llm_attempts = con.execute(
            "SELECT DISTINCT attempt FROM spans WHERE run_id = 'daskrun' AND epoch = 0 AND span_kind = 'llm' "
            "AND task_id = 'flaky'").fetchall()
        versions = con.execute("SELECT version FROM policy_versions WHERE run_id = 'daskrun'").fetchall()
    by_task: dict[str, list[tuple]] = {}
    for task_id, *rest in rows:
        by_task.setdefault(task_id, []).append(tuple(rest))

    assert result["status"] == "completed" and versions == [(f"{POLICY}-v1",)]
    assert all(status == "succeeded" and attempt == 0 for q in questions for status, attempt, _, _ in by_task[q["id"]])
    # The hung agent was killed at the timeout on each of its two attempts (retries=1), the second numbered 1.
    for status, attempt, error, seconds in by_task["stuck"]:
        assert status == "timed_out" and attempt == 1 and f"within {TIMEOUT_S} s" in error
        assert TIMEOUT_S <= seconds < TIMEOUT_S + 5
    # The flaky agent failed attempt 0 and succeeded on attempt 1, which the worker registered with the gateway.
    assert [(s, a) for s, a, _, _ in by_task["flaky"]] == [("succeeded", 1), ("succeeded", 1)]
    assert flaky_llm_attempts == [(1,)]

    # Every rollout task ran on a Dask worker, both workers took some, and nothing of a rollout outlived it.
    rollout_keys = [k for k in plugin.workers if k.startswith("rollouts")]
    assert len(rollout_keys) == 2, plugin.workers  # 12 rollouts in batches of whole groups up to 8: d0-d3, stuck + flaky
    assert set(plugin.workers[k] for k in rollout_keys) == set(dask_cluster.scheduler.workers)
    with Client(dask_cluster) as client:
        children = client.run(rollout_children)
    assert set(children) == set(dask_cluster.scheduler.workers)
    for worker, procs in children.items():
        assert procs["servers"], f"worker {worker} started no rollout process"
        assert procs["alive"] == [], f"rollout processes still alive on {worker}: {procs['alive']}"
