"""Asynchronous epochs (trainer.max_staleness >= 1) through the real train flow: the next epoch's rollouts run while
this one trains, no triplet trains more than k versions after the one that sampled it, a rollout's calls all carry
one version, and a run stopped in the middle resumes without losing or training twice any rollout."""

from __future__ import annotations

import json
import os
import signal
import time
import uuid

import pytest

from lightning_core.store.catalog import Catalog
from tests.conftest import make_config
from tests.test_flows import POLICY, _dataset, _overrides
from tests.test_main_job import _arclight, _kill_marked, _marked

pytestmark = pytest.mark.integration

QUESTIONS = [{"id": f"a{i}", "question": f"Say the word {w}.", "target": w, "turns": 2, "pause_s": 0.2}
             for i, w in enumerate(["xyzzy", "plugh", "qwfp", "zork"])]


def _async_overrides(tmp_path, fixtures, **extra):
    return _overrides(tmp_path, **fixtures, dataset=_dataset(tmp_path / "tasks.jsonl", QUESTIONS), **{
        "rollouts.agent": "tests.helpers.flow_agent:run_steady", "rollouts.tasks_per_epoch": "2",
        "rollouts.group_size": "3", "trainer.max_staleness": "1", **extra})


def _openmp_setting_of_a_child() -> str:
    """``OMP_WAIT_POLICY`` as a process started now from this one sees it (repr: None when unset)."""
    import subprocess
    import sys

    return subprocess.run([sys.executable, "-c", "import os; print(repr(os.environ.get('OMP_WAIT_POLICY')))"],
                          capture_output=True, text=True, check=True).stdout.strip()


def test_passive_openmp_holds_for_its_block_only_and_keeps_a_users_own_setting(monkeypatch):
    """Asynchronous epochs make OpenMP wait passively while they run; the setting used to stay in the process for good,
    so every server a later test started inherited it and the suite's speed depended on test order."""
    from lightning_core.common import hardware

    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    with hardware.passive_openmp():
        assert os.environ["OMP_WAIT_POLICY"] == "PASSIVE" and _openmp_setting_of_a_child() == "'PASSIVE'"
    assert "OMP_WAIT_POLICY" not in os.environ and _openmp_setting_of_a_child() == "None"
    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")
    with hardware.passive_openmp():
        assert os.environ["OMP_WAIT_POLICY"] == "ACTIVE"  # the user's own choice wins
    assert os.environ["OMP_WAIT_POLICY"] == "ACTIVE"


def _versions_per_attempt(con, run_id: str) -> list[tuple]:
    """(rollout, attempt, distinct versions, calls) of every rollout attempt's model calls (the gateway's spans)."""
    return con.execute(
        "SELECT rollout_id, attempt, count(DISTINCT json_extract_string(attributes, '$.\"arclight.policy.version\"')), "
        "count(*) FROM spans WHERE run_id = ? AND span_kind = 'llm' AND rollout_id IS NOT NULL GROUP BY ALL",
        [run_id]).fetchall()


def test_the_next_epoch_samples_while_this_one_trains_within_the_staleness_bound(
    prefect_harness, tmp_path, vllm_server, collector, collector_config, tiny_model_dir
):
    from flows.train import train

    fixtures = dict(vllm_server=vllm_server, collector=collector, collector_config=collector_config,
                    tiny_model_dir=tiny_model_dir)
    overrides = _async_overrides(tmp_path, fixtures, run_name="asyncrun")
    shell = os.environ.get("OMP_WAIT_POLICY")
    rows = train(overrides=overrides, epochs=3)
    assert [r["epoch"] for r in rows] == [0, 1, 2]
    # the run's passive OpenMP waits ended with it: a server the pytest process starts next gets the shell's setting
    assert os.environ.get("OMP_WAIT_POLICY") == shell
    assert _openmp_setting_of_a_child() == repr(shell)
    cfg = make_config(tmp_path, *overrides)
    with Catalog.from_config(cfg).read() as con:
        epochs = con.execute(
            "SELECT epoch, status, policy_version, new_version, started_at, train_started_at, train_finished_at, "
            "staleness_max FROM epochs WHERE run_id = 'asyncrun' ORDER BY epoch").fetchall()
        versions = con.execute("SELECT version, parent_version, epoch, metrics FROM policy_versions WHERE policy = ? "
                               "ORDER BY epoch", [POLICY]).fetchall()
        sampled = dict(con.execute(
            "SELECT epoch, list(DISTINCT policy_version ORDER BY policy_version) FROM triplets WHERE run_id = 'asyncrun' "
            "GROUP BY epoch").fetchall())
        per_attempt = _versions_per_attempt(con, "asyncrun")
        logprobs = con.execute("SELECT count(*) FILTER (WHERE response_logprobs IS NULL), count(*) FROM triplets "
                               "WHERE run_id = 'asyncrun'").fetchall()[0]
    assert [e[1] for e in epochs] == ["completed"] * 3
    assert [e[3] for e in epochs] == [f"{POLICY}-v1", f"{POLICY}-v2", f"{POLICY}-v3"]
    # epoch 1 was sampled from the base model while epoch 0 trained, epoch 2 from v1 while epoch 1 trained
    assert [e[2] for e in epochs] == ["base", "base", f"{POLICY}-v1"]
    assert sampled == {0: ["0"], 1: ["0"], 2: ["1"]}
    for earlier, later in zip(epochs, epochs[1:]):  # the epochs table shows the overlap as it ran
        assert later[4] < earlier[6], f"epoch {later[0]} started after epoch {earlier[0]} finished training"
    # staleness: epoch 0 trains on its own version's samples, later epochs one version behind, never more
    assert [e[7] for e in epochs] == [0, 1, 1]
    assert [(v[0], v[1], v[2]) for v in versions] == [(f"{POLICY}-v1", None, 0), (f"{POLICY}-v2", f"{POLICY}-v1", 1),
                                                     (f"{POLICY}-v3", f"{POLICY}-v2", 2)]
    assert [json.loads(v[3])["staleness/max"] for v in versions] == [0, 1, 1]
    # every rollout attempt's calls went to one version, though versions changed while rollouts ran
    assert per_attempt and all(distinct == 1 for _, _, distinct, _ in per_attempt)
    assert sum(calls for *_, calls in per_attempt) >= 3 * 2 * 3 * 2
    assert logprobs[0] == 0 and logprobs[1] > 0  # the ratio has the behaviour policy's logprobs to work with


def test_ctrl_c_while_an_epoch_trains_beside_the_next_rollouts_stops_both_and_the_run_resumes_losing_nothing(
    tmp_path, vllm_server, collector, collector_config, tiny_model_dir
):
    fixtures = dict(vllm_server=vllm_server, collector=collector, collector_config=collector_config,
                    tiny_model_dir=tiny_model_dir)
    overrides = _async_overrides(tmp_path, fixtures, run_name="asyncstop", **{"trainer.passes": "400"})
    config = tmp_path / "config.yaml"
    config.write_text("name: flowtest\n")
    args = ["train", str(config), "--epochs", "2", *[a for o in overrides for a in ("--set", o)]]
    cfg = make_config(tmp_path, *overrides)
    catalog = Catalog.from_config(cfg)
    log, mark = tmp_path / "train.log", f"async-{uuid.uuid4().hex[:8]}"
    proc = _arclight(*args, log=log, mark=mark)
    try:
        deadline, states = time.monotonic() + 400, {}
        while time.monotonic() < deadline:
            assert proc.poll() is None, log.read_text(errors="replace")[-4000:]
            with catalog.read(spans=False) as con:
                states = dict(con.execute("SELECT epoch, status FROM epochs WHERE run_id = 'asyncstop'").fetchall())
                done = con.execute("SELECT count(*) FROM rollouts WHERE run_id = 'asyncstop' AND epoch = 1 "
                                   "AND status = 'succeeded'").fetchall()[0][0]
            if states.get(0) == "triplets_done" and done >= 1:  # epoch 0 trains (400 passes), epoch 1 samples
                break
            time.sleep(0.2)
        assert states.get(0) == "triplets_done", f"never overlapped: {states}"
        os.killpg(proc.pid, signal.SIGINT)  # a terminal's Ctrl-C
        sent = time.monotonic()
        code = proc.wait(timeout=90)
        took = time.monotonic() - sent
        time.sleep(2)
        left = _marked(mark)
    finally:
        _kill_marked(mark)
    output = log.read_text(errors="replace")
    assert code == 130 and took < 30, (code, took, output[-3000:])
    assert left == [], f"left running after Ctrl-C: {left}"
    with catalog.read(spans=False) as con:
        before = con.execute("SELECT rollout_id, epoch, status, finished_at FROM rollouts WHERE run_id = 'asyncstop' "
                             "AND status = 'succeeded' ORDER BY 1").fetchall()
        assert con.execute("SELECT count(*) FROM policy_versions WHERE run_id = 'asyncstop'").fetchall() == [(0,)]
    assert any(r[1] == 1 for r in before)

    resumed = [a if a != "trainer.passes=400" else "trainer.passes=1" for a in args]
    again = _arclight(*resumed, log=tmp_path / "resume.log", mark=mark)
    try:
        assert again.wait(timeout=600) == 0, (tmp_path / "resume.log").read_text(errors="replace")[-4000:]
    finally:
        _kill_marked(mark)
    with catalog.read() as con:
        after = {r[0]: r for r in con.execute("SELECT rollout_id, epoch, status, finished_at FROM rollouts "
                                               "WHERE run_id = 'asyncstop' ORDER BY 1").fetchall()}
        versions = con.execute("SELECT version, epoch FROM policy_versions WHERE run_id = 'asyncstop' ORDER BY epoch").fetchall()
        trained = con.execute("SELECT epoch, count(DISTINCT rollout_id) FROM triplets WHERE run_id = 'asyncstop' "
                              "GROUP BY epoch ORDER BY epoch").fetchall()
        per_attempt = _versions_per_attempt(con, "asyncstop")
        epochs = con.execute("SELECT epoch, status FROM epochs WHERE run_id = 'asyncstop' ORDER BY epoch").fetchall()
    assert epochs == [(0, "completed"), (1, "completed")]
    assert versions == [(f"{POLICY}-v1", 0), (f"{POLICY}-v2", 1)]  # each epoch trained once
    assert all(after[r[0]] == r for r in before)  # what finished before Ctrl-C was kept, not run again
    assert all(r[2] == "succeeded" for r in after.values()) and len(after) == 2 * 2 * 3
    assert [n for _, n in trained] == [6, 6]  # every rollout of each epoch in its triplets, none in another's
    assert all(distinct == 1 for _, _, distinct, _ in per_attempt)
