"""The rollout runner with real worker processes and a real collector."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest

from lightning_core.store.catalog import Catalog
from lightning_core.rollouts.runner import (FAILED, SUCCEEDED, TIMED_OUT, RolloutSpec, RunnerSettings,
                                            flush_outcome_spans, load_agent, rollout_seed, run_rollout)
from tests.conftest import REPO


def _settings(collector, agent: str, **kw) -> RunnerSettings:
    return RunnerSettings(
        agent=f"tests.helpers.agents:{agent}", collector_url=collector.url, gateway_url="http://127.0.0.1:8400",
        model="default", agent_path=(str(REPO),), timeout_s=kw.pop("timeout_s", 30), **kw,
    )


def _spec(rollout_id: str, task=None) -> RolloutSpec:
    return RolloutSpec("runner", 0, rollout_id, "t1", "t1", 0, task or {"a": 6, "b": 7, "answer": 42})


def _spans(cfg, rollout_id: str) -> list[tuple]:
    assert flush_outcome_spans(run_id="runner", epoch=0)  # outcome spans go out in the background (the barrier flushes)
    with Catalog.from_config(cfg).read() as con:
        return con.execute(
            "SELECT name, span_kind, attempt, json_extract_string(attributes, '$.\"arclight.rollout.status\"'), reward_value "
            "FROM spans WHERE run_id = 'runner' AND rollout_id = ? ORDER BY span_kind = 'rollout_outcome', start_ns", [rollout_id]
        ).fetchall()


def test_a_returned_reward_is_recorded_with_the_agents_spans(collector, collector_config):
    outcome = run_rollout(_settings(collector, "returns_reward"), _spec("ok-1"))
    assert (outcome.status, outcome.reward, outcome.error) == (SUCCEEDED, 1.0, None)
    spans = _spans(collector_config, "ok-1")
    names = [s[0] for s in spans]
    assert names == ["rollout", "agent solver", "tool calc", "reward primary", "rollout outcome"]
    assert spans[3][4] == 1.0 and spans[-1][3] == SUCCEEDED


def test_async_agents_and_self_emitted_rewards(collector, collector_config):
    outcome = run_rollout(_settings(collector, "async_emits_rewards"), _spec("async-1"))
    assert outcome.status == SUCCEEDED and outcome.reward is None
    rewards = [s[4] for s in _spans(collector_config, "async-1") if s[1] == "reward"]
    assert rewards == [0.25, 0.75]


def test_a_raising_agent_is_a_recorded_failure_with_the_exception(collector, collector_config):
    outcome = run_rollout(_settings(collector, "raises"), _spec("boom-1"))
    assert outcome.status == FAILED
    assert "RuntimeError: agent broke on t1" in outcome.error
    spans = _spans(collector_config, "boom-1")
    assert spans[-1][0] == "rollout outcome" and spans[-1][3] == FAILED
    assert "agent crasher" in [s[0] for s in spans]  # spans before the crash are kept


def _gone(pid: int) -> bool:
    """The process has exited (a zombie waiting for its parent to reap it counts as gone)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


def test_a_hung_agent_is_stopped_at_the_timeout(collector, collector_config, tmp_path):
    pids = tmp_path / "pids"
    outcome = run_rollout(_settings(collector, "hangs", timeout_s=3), _spec("hang-1", {"pids": str(pids)}))
    assert outcome.status == TIMED_OUT and "did not finish within 3 s" in outcome.error
    worker, child = map(int, pids.read_text().split())
    # the agent and the process it started are killed when the outcome comes back, not only given up on: a SIGKILLed
    # process exits when the kernel next schedules it, which under load came after the outcome (CI at eb1064d)
    deadline = time.monotonic() + 5  # the hung agent's child sleeps far longer: one left running still fails
    while not (_gone(worker) and _gone(child)) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _gone(worker) and _gone(child), f"still running: {[p for p in (worker, child) if not _gone(p)]}"
    assert _spans(collector_config, "hang-1")[-1][2:4] == (0, TIMED_OUT)


def test_retries_make_new_attempts_and_record_each(collector, collector_config):
    outcome = run_rollout(_settings(collector, "raises", retries=2), _spec("retry-1"))
    assert outcome.status == FAILED and outcome.attempt == 2
    outcomes = [(s[2], s[3]) for s in _spans(collector_config, "retry-1") if s[0] == "rollout outcome"]
    assert outcomes == [(0, FAILED), (1, FAILED), (2, FAILED)]


def test_the_agent_gets_its_rollout_url_model_and_resources(collector, collector_config):
    settings = _settings(collector, "reports_context", resources={"prompt": "Solve: {q}"})
    assert run_rollout(settings, _spec("ctx-1")).status == SUCCEEDED
    with Catalog.from_config(collector_config).read() as con:
        content = con.execute(
            "SELECT json_extract_string(attributes, '$.\"arclight.message.content\"') FROM spans "
            "WHERE rollout_id = 'ctx-1' AND span_kind = 'message'"
        ).fetchall()[0][0]
    assert content == "http://127.0.0.1:8400/rollout/ctx-1/v1|default|0|Solve: {q}"


def test_a_silent_agent_succeeds_with_only_runner_spans(collector, collector_config):
    outcome = run_rollout(_settings(collector, "silent"), _spec("silent-1"))
    assert outcome.status == SUCCEEDED and outcome.reward is None
    assert [s[0] for s in _spans(collector_config, "silent-1")] == ["rollout", "rollout outcome"]


def test_bad_agent_references_fail_before_anything_runs():
    with pytest.raises(ValueError, match="'module:function'"):
        load_agent("no_colon")
    with pytest.raises(ValueError, match="could not be imported"):
        load_agent("no_such_module_xyz:run")
    with pytest.raises(ValueError, match="has no function 'nope'"):
        load_agent("tests.helpers.agents:nope", paths=(str(REPO),))


def test_an_agent_module_of_the_same_name_from_another_path_is_refused_not_run(tmp_path):
    # fails before: the import cache handed the second project the first project's module, and its rollouts ran
    # (and were trained as) the other agent
    from lightning_core.rollouts.runner import load_agent

    first, second = tmp_path / "first", tmp_path / "second"
    for folder, answer in ((first, 1.0), (second, 2.0)):
        folder.mkdir()
        (folder / "same_name_agent.py").write_text(f"def run(task, ctx):\n    return {answer}\n")
    try:
        assert load_agent("same_name_agent:run", paths=(str(first),))(None, None) == 1.0
        with pytest.raises(ValueError, match="already loaded in this process from .*first.*rename one"):
            load_agent("same_name_agent:run", paths=(str(second),))
        assert load_agent("same_name_agent:run", paths=(str(first),))(None, None) == 1.0  # its own path: fine
    finally:
        sys.modules.pop("same_name_agent", None)


_WORKER = """
import os, sys, threading
sys.path.insert(0, {repo!r})
from lightning_core.epoch.stages import run_rollout_batch
from lightning_core.rollouts.runner import RolloutSpec, RunnerSettings
settings = RunnerSettings(agent="tests.helpers.agents:returns_reward", collector_url={collector!r}, gateway_url={gateway!r},
                          model="tiny", agent_path=({repo!r},), timeout_s=30, gateway_token={token!r})
specs = [RolloutSpec("runner-remote", 0, f"remote-{{i}}", "t1", "t1", i, {{"a": 6, "b": 7, "answer": 42}}) for i in range(3)]
outcomes = run_rollout_batch(settings, specs, first_attempts={{}}, slot=threading.Semaphore(3))
print(sorted(o.status for o in outcomes), flush=True)
os._exit(0)  # a Dask or Ray worker may be recycled as soon as its task returns
"""


@pytest.mark.integration
def test_a_batch_on_a_remote_worker_delivers_its_outcome_spans_before_it_returns(collector, collector_config, gateway):
    # issue 51, finding 10: the flow flushed only its own process's outcome spans; on Dask or Ray workers nobody did
    import subprocess

    script = _WORKER.format(repo=str(REPO), collector=collector.url, gateway=gateway.url, token=gateway.token)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert done.returncode == 0 and "['succeeded', 'succeeded', 'succeeded']" in done.stdout, done.stderr[-3000:]
    with Catalog.from_config(collector_config).read() as con:  # nothing flushed here: the worker did it
        outcomes = con.execute("SELECT count(*) FROM spans WHERE run_id = 'runner-remote' AND span_kind = 'rollout_outcome'"
                               ).fetchall()
    assert outcomes == [(3,)]


@pytest.mark.integration
def test_a_batch_whose_outcome_spans_cannot_be_delivered_says_so_instead_of_returning(gateway, monkeypatch):
    import threading

    from lightning_core.common.services import ServiceError, free_port
    from lightning_core.epoch.stages import run_rollout_batch
    from lightning_core.rollouts import runner

    monkeypatch.setattr(runner, "OUTCOME_EXPORT_TIMEOUT_S", 3.0)  # the exporter's retries against nothing: 3 s, not 30

    nowhere = f"http://127.0.0.1:{free_port()}"  # a collector that is gone
    settings = RunnerSettings(agent="tests.helpers.agents:returns_reward", collector_url=nowhere, gateway_url=gateway.url,
                              model="tiny", agent_path=(str(REPO),), timeout_s=30, gateway_token=gateway.token)
    spec = RolloutSpec("runner-nowhere", 0, "nowhere-0", "t1", "t1", 0, {"a": 6, "b": 7, "answer": 42})
    with pytest.raises(ServiceError, match="outcome spans .* could not be delivered to the collector"):
        run_rollout_batch(settings, [spec], first_attempts={}, slot=threading.Semaphore(1))


def test_a_rollouts_sampling_seed_is_the_same_in_a_rerun_and_new_for_each_sample_epoch_and_attempt():
    settings = RunnerSettings(agent="m:f", collector_url="", gateway_url="", model="default", sampling_seed=0)
    spec = RolloutSpec("run-a", 2, "r-1", "t1", "g1", 3, {})
    seed = rollout_seed(settings, spec, 0)
    assert 0 <= seed < 2**63
    # another run, another rollout id, the same task and sample: the same seed, so a repeated run samples alike
    assert rollout_seed(settings, RolloutSpec("run-b", 2, "r-9", "t1", "g7", 3, {}), 0) == seed
    others = {rollout_seed(settings, spec, 1), rollout_seed(settings, RolloutSpec("run-a", 3, "r-1", "t1", "g1", 3, {}), 0),
              rollout_seed(settings, RolloutSpec("run-a", 2, "r-1", "t1", "g1", 4, {}), 0),
              rollout_seed(settings, RolloutSpec("run-a", 2, "r-1", "t2", "g1", 3, {}), 0),
              rollout_seed(RunnerSettings(agent="m:f", collector_url="", gateway_url="", model="default", sampling_seed=1), spec, 0)}
    assert seed not in others and len(others) == 5
    assert rollout_seed(RunnerSettings(agent="m:f", collector_url="", gateway_url="", model="default"), spec, 0) is None
