"""Our own failures are never training data (issue 40): whose failure a rollout's was, the ingest barrier's
verdicts, the SQL rule that leaves out a group our services failed, and a collector that says it cannot
store spans."""

from __future__ import annotations

import json
import os
import threading
import time
import uuid
from pathlib import Path

import httpx
import openai
import pytest
from typer.testing import CliRunner

from lightning_core.epoch.context import RunContext
from lightning_core.epoch import bookkeeping as ep
from lightning_core.store.catalog import Catalog
from lightning_core.pipeline.triplets import materialize_triplets
from lightning_core.rollouts.runner import (AGENT, FAILED, INFRASTRUCTURE, INTERRUPTED, SUCCEEDED, TIMED_OUT,
                                            RolloutOutcome, failure_kind)
from lightning_core.ingest.service import start_collector
from lightning_core.epoch.stack import Outage, Stack, state_path
from lightning_core.common.services import ServiceError, free_port
from lightning_core.epoch.failures import RunStopped, blame_outages, check_collector, check_round
from lightning_core.epoch.stages import ingest_barrier
from lightning_core.tracking import agent_metric_name
from lightning_core.store.outputs import load_triplets
from tests.conftest import make_config
from tests.otlp_factory import export_request
from tests.spans_factory import Rollout, write

GATEWAY = "http://127.0.0.1:8400"


def _rollout(rollout_id: str, task_id: str, reward: float, *, failed_call: bool = False) -> Rollout:
    r = Rollout(rollout_id, task_id=task_id)
    root = r.span("rollout", 0, 200, attrs={"arclight.span.kind": "rollout"})
    a = r.agent("solver", 1, 100, parent=root)
    r.call(2, 10, parent=a, prompt=(1, 2), response=(3,))
    if failed_call:
        r.call(11, 12, parent=a, prompt=(1, 2), response=None, logprobs=None, status="ERROR",
               attrs={"arclight.llm.upstream_failed": True, "error.type": "vLLM at http://x could not be reached"})
    r.reward(reward, 90, parent=a)
    return r


def _plan(cfg, run_id: str, rows: list[tuple[str, str, str, str | None]]) -> None:
    """Record rollouts (id, task, status, error kind) as the flow would."""
    with Catalog.from_config(cfg).write() as con:
        con.executemany(
            "INSERT INTO rollouts (run_id, epoch, rollout_id, task_id, group_id, sample_index, attempt, status, error_kind, "
            "mode) VALUES (?, 0, ?, ?, ?, 0, 0, ?, ?, 'train')",
            [(run_id, rid, task, task, status, kind) for rid, task, status, kind in rows])


def test_a_group_whose_rollout_our_services_failed_trains_nothing_and_the_agents_own_failures_train(tmp_path):
    cfg = make_config(tmp_path)
    Catalog.from_config(cfg).ensure()
    write(cfg.lake.path, [_rollout("a0", "ta", 1.0), _rollout("a1", "ta", 0.0),
                          _rollout("b0", "tb", 1.0), _rollout("b1", "tb", 0.0, failed_call=True),
                          _rollout("c0", "tc", 1.0), _rollout("c1", "tc", 0.0)])
    _plan(cfg, "r1", [("a0", "ta", SUCCEEDED, None), ("a1", "ta", SUCCEEDED, None),
                      ("b0", "tb", SUCCEEDED, None), ("b1", "tb", FAILED, INFRASTRUCTURE),
                      ("c0", "tc", SUCCEEDED, None), ("c1", "tc", FAILED, AGENT)])
    report = materialize_triplets(cfg, run_id="r1", epoch=0)
    triplets = load_triplets(cfg, run_id="r1", epoch=0, policy="default").to_pylist()
    assert sorted({t["group_id"] for t in triplets}) == ["ta", "tc"]  # tb: b1 was ours, so b0 is not scored alone
    assert sorted({t["rollout_id"] for t in triplets}) == ["a0", "a1", "c0", "c1"]  # c1 failed itself: it trains
    assert report.policies[0].infra_dropped_groups == 1
    assert all(t["advantage"] != 0 for t in triplets)


def test_spans_of_agents_arclight_did_not_run_are_not_filtered(tmp_path):
    cfg = make_config(tmp_path)
    write(cfg.lake.path, [_rollout("x0", "tx", 1.0), _rollout("x1", "tx", 0.0)])  # no rollouts rows at all
    materialize_triplets(cfg, run_id="r1", epoch=0)
    assert len(load_triplets(cfg, run_id="r1", epoch=0, policy="default")) == 2


def test_the_ingest_barrier_fails_lost_spans_and_calls_our_side_failed_as_ours_and_silence_as_the_agents(
        collector, collector_config):
    run_id = f"barrier-{uuid.uuid4().hex[:6]}"
    cfg = collector_config
    quiet = Rollout("q0", task_id="tq")
    quiet.span("rollout", 0, 10, attrs={"arclight.span.kind": "rollout"})
    # exit0: a program agent (rollouts.command) that exited non-zero after a call our side failed: its status
    # cannot say whose failure it was, the gateway's span can
    # hung0: timed out while its call hung on our vLLM (the call failed once the replica was restarted); slow0 ran
    # out of time by itself
    write(cfg.lake.path, [_rollout("ok0", "t1", 1.0), _rollout("up0", "t1", 0.0, failed_call=True), quiet,
                          _rollout("exit0", "t3", 0.0, failed_call=True), _rollout("hung0", "t4", 0.0, failed_call=True),
                          _rollout("slow0", "t4", 0.0)], run_id=run_id)
    _plan(cfg, run_id, [("ok0", "t1", SUCCEEDED, None), ("up0", "t1", SUCCEEDED, None), ("q0", "tq", SUCCEEDED, None),
                        ("lost0", "t2", SUCCEEDED, None), ("boom0", "t2", FAILED, AGENT), ("exit0", "t3", FAILED, AGENT),
                        ("hung0", "t4", TIMED_OUT, "timeout"), ("slow0", "t4", TIMED_OUT, "timeout")])
    counts = ingest_barrier(RunContext.of(cfg, Stack(collector=collector)), run_id=run_id, epoch=0)
    with Catalog.from_config(cfg).read(spans=False) as con:
        got = {r[0]: r[1:] for r in con.execute(
            "SELECT rollout_id, status, error_kind, error FROM rollouts WHERE run_id = ?", [run_id]).fetchall()}
    assert got["ok0"][:2] == (SUCCEEDED, None)
    assert got["up0"][:2] == (FAILED, INFRASTRUCTURE) and "could not be reached" in got["up0"][2]
    assert got["lost0"][:2] == (FAILED, INFRASTRUCTURE) and "never reached the lake" in got["lost0"][2]
    assert got["q0"][:2] == (FAILED, AGENT) and "produced no spans" in got["q0"][2]
    assert got["boom0"][:2] == (FAILED, AGENT)  # no spans at all, but it failed by itself: still the agent's
    assert got["exit0"][:2] == (FAILED, INFRASTRUCTURE) and "could not be reached" in got["exit0"][2]
    assert got["hung0"][:2] == (FAILED, INFRASTRUCTURE) and "could not be reached" in got["hung0"][2]
    assert got["slow0"][:2] == (TIMED_OUT, "timeout")
    assert counts == {SUCCEEDED: 1, FAILED: 6, TIMED_OUT: 1}


def _request(url: str) -> httpx.Request:
    return httpx.Request("POST", url)


@pytest.mark.parametrize("exc, kind", [
    (openai.APIConnectionError(request=_request(f"{GATEWAY}/rollout/r/v1/chat/completions")), INFRASTRUCTURE),
    (openai.APITimeoutError(request=_request(f"{GATEWAY}/rollout/r/v1/chat/completions")), INFRASTRUCTURE),
    (openai.InternalServerError("vLLM at http://127.0.0.1:8000 could not be reached", body=None,
                                response=httpx.Response(502, request=_request(f"{GATEWAY}/rollout/r/v1/chat/completions"))),
     INFRASTRUCTURE),
    (openai.NotFoundError("rollout 'r' is not registered: POST /admin/rollouts first", body=None,
                          response=httpx.Response(404, request=_request(f"{GATEWAY}/rollout/r/v1/chat/completions"))),
     INFRASTRUCTURE),
    (openai.BadRequestError("context too long", body=None,
                            response=httpx.Response(400, request=_request(f"{GATEWAY}/rollout/r/v1/chat/completions"))),
     AGENT),
    # an OpenAI-compatible API of the agent's own (a hosted judge) that fails is the agent's environment
    (openai.InternalServerError("down", body=None,
                                response=httpx.Response(503, request=_request("https://judge.example/v1/chat"))), AGENT),
    (ValueError("could not parse the answer"), AGENT),
])
def test_a_failure_is_ours_only_when_a_model_call_through_the_gateway_failed_on_our_side(exc, kind):
    assert failure_kind(exc, GATEWAY) == kind


def test_an_exception_raised_from_a_failed_gateway_call_is_ours():
    try:
        try:
            raise openai.APIConnectionError(request=_request(f"{GATEWAY}/rollout/r/v1/chat/completions"))
        except openai.APIConnectionError as inner:
            raise RuntimeError("the framework wrapped it") from inner
    except RuntimeError as outer:
        assert failure_kind(outer, GATEWAY) == INFRASTRUCTURE


def test_an_attempt_that_ran_while_a_service_was_down_is_ours_even_when_the_agent_reported_success(tmp_path):
    stack = Stack(collector=None)
    stack.outages.append(Outage("vllm0", started=100.0, reason="exited with status -9", ended=160.0, restarted=True))
    outcomes = [
        RolloutOutcome("during", SUCCEEDED, 0, 0.0, None, 90.0, 120.0),  # the agent caught the 502 and returned 0
        RolloutOutcome("before", SUCCEEDED, 0, 1.0, None, 10.0, 99.0),
        RolloutOutcome("after", FAILED, 0, None, "ValueError: bad answer", 161.0, 170.0, AGENT),
        RolloutOutcome("cut", INTERRUPTED, 0, None, "stopped", 110.0, 111.0),
    ]
    blamed = {o.rollout_id: o for o in blame_outages(outcomes, stack)}
    assert (blamed["during"].status, blamed["during"].error_kind) == (FAILED, INFRASTRUCTURE)
    assert "vllm0 exited with status -9" in blamed["during"].error and "restarted" in blamed["during"].error
    assert blamed["before"] == outcomes[1] and blamed["after"] == outcomes[2] and blamed["cut"] == outcomes[3]


def test_an_outage_seen_after_its_rollouts_were_recorded_still_blames_them_before_the_round_is_judged(tmp_path):
    # issue 51, finding 3: an attached server counts as down only after ~3 s (18 s when it hangs); an agent that
    # caught the error and returned 0 had finished its group by then, and its rollout trained
    from lightning_core.epoch.failures import settle_blame

    cfg = make_config(tmp_path)
    catalog = Catalog.from_config(cfg)
    catalog.ensure()
    _plan(cfg, "r1", [(f"r{i}", "t", "planned", None) for i in range(4)])
    ep.record_outcomes(catalog, [
        RolloutOutcome("r0", SUCCEEDED, 0, 0.0, None, 100.0, 103.0),  # caught the gateway's error, returned 0
        RolloutOutcome("r1", TIMED_OUT, 0, None, "did not finish", 95.0, 115.0, "timeout"),
        RolloutOutcome("r2", SUCCEEDED, 0, 1.0, None, 50.0, 99.0),  # before: stays
        RolloutOutcome("r3", FAILED, 0, None, "ValueError: no", 130.0, 131.0, AGENT)])  # after: stays
    stack = Stack(collector=None)
    stack.outages.append(Outage("gateway", started=100.5, reason="not answering", ended=120.0))  # seen late
    assert settle_blame(RunContext.of(cfg, stack), run_id="r1", epoch=0, mode="train", sampling_round=0) == 2
    with catalog.read(spans=False) as con:
        got = dict(con.execute("SELECT rollout_id, status || '/' || coalesce(error_kind, '') FROM rollouts").fetchall())
    assert got == {"r0": "failed/infrastructure", "r1": "failed/infrastructure", "r2": "succeeded/", "r3": "failed/agent"}
    stack.failure = RuntimeError("vllm0 could not be started again")
    with pytest.raises(RuntimeError, match="could not be started again"):  # the round is never judged past that
        settle_blame(RunContext.of(cfg, stack), run_id="r1", epoch=0, mode="train", sampling_round=0)


def test_retries_of_our_failures_stay_in_their_sampling_round(tmp_path):
    from lightning_core.epoch.failures import retry_infrastructure_failures

    cfg = make_config(tmp_path)
    Catalog.from_config(cfg).ensure()
    _plan(cfg, "r1", [("a0", "ta", FAILED, INFRASTRUCTURE), ("b0", "tb", FAILED, INFRASTRUCTURE)])
    with Catalog.from_config(cfg).write() as con:  # a0: left out by round 0 after its retries; b0: round 1's
        con.execute("UPDATE rollouts SET sampling_round = 1, infra_failures = 0 WHERE rollout_id = 'b0'")
        con.execute("UPDATE rollouts SET infra_failures = 2 WHERE rollout_id = 'a0'")
    ctx = RunContext.of(cfg)
    assert retry_infrastructure_failures(ctx, run_id="r1", epoch=0, mode="train", sampling_round=1) == ["b0"]
    assert [s.rollout_id for s in ep.pending_rollouts(ctx.catalog, run_id="r1", epoch=0)] == ["b0"]


def test_interrupted_rollouts_are_not_recorded_so_they_run_again(tmp_path):
    cfg = make_config(tmp_path)
    catalog = Catalog.from_config(cfg)
    catalog.ensure()
    _plan(cfg, "r1", [("i0", "t", "planned", None), ("i1", "t", "planned", None)])
    ep.record_outcomes(catalog, [RolloutOutcome("i0", INTERRUPTED, 0, None, "stopped", 1.0, 2.0),
                                 RolloutOutcome("i1", SUCCEEDED, 0, 1.0, None, 1.0, 2.0)])
    assert [s.rollout_id for s in ep.pending_rollouts(catalog, run_id="r1", epoch=0)] == ["i0"]


def test_a_round_that_mostly_failed_stops_the_run_with_its_most_common_errors(tmp_path):
    cfg = make_config(tmp_path, "rollouts.stop_at_failed_share=0.75")
    Catalog.from_config(cfg).ensure()
    _plan(cfg, "r1", [("f0", "t", FAILED, INFRASTRUCTURE), ("f1", "t", FAILED, INFRASTRUCTURE),
                      ("f2", "t", TIMED_OUT, "timeout"), ("s0", "t", SUCCEEDED, None)])
    with Catalog.from_config(cfg).write() as con:
        con.execute("UPDATE rollouts SET error = 'the gateway at http://127.0.0.1:8400 could not register the rollout' "
                    "WHERE rollout_id IN ('f0', 'f1')")
    with pytest.raises(RunStopped) as err:
        check_round(RunContext.of(cfg), run_id="r1", epoch=0, mode="train", sampling_round=0, logs=["/x/collector.log"])
    message = str(err.value)
    assert "3 of 4 rollouts" in message and "2 infrastructure, 1 timeout" in message
    assert "could not register the rollout (x2)" in message and "/x/collector.log" in message
    assert "rollouts.stop_at_failed_share = 0.75" in message and "run the same command again" in message
    # issue 51, finding 8: the agent's own failures run again on resume (ours are retried anyway); before, the same
    # command stopped again on the same rows, whatever the user had fixed
    assert "this round's 1 failed rollouts run again" in message
    assert [s.rollout_id for s in ep.pending_rollouts(Catalog.from_config(cfg), run_id="r1", epoch=0)] == ["f2"]
    cfg = make_config(tmp_path, "rollouts.stop_at_failed_share=0.8")
    assert check_round(RunContext.of(cfg), run_id="r1", epoch=0, mode="train", sampling_round=0, logs=[])["failed"] == 2


def test_a_collector_whose_lake_refuses_commits_says_why_on_healthz_and_in_arclight_status(tmp_path):
    from lightning_core.cli.main import app

    cfg = make_config(tmp_path)
    Catalog.from_config(cfg).ensure()
    collector = start_collector(cfg, timeout_s=60)
    log = Path(cfg.lake.path) / "spans" / "training" / "_delta_log"

    def send() -> int:
        body = export_request({"arclight.run_id": "h", "arclight.epoch": 0},
                              [{"trace_id": uuid.uuid4().bytes, "span_id": uuid.uuid4().bytes[:8]}]).SerializeToString()
        return httpx.post(f"{collector.url}/v1/traces", content=body, headers={"Content-Type": "application/x-protobuf"},
                          timeout=30).status_code

    try:
        assert send() == 200 and httpx.get(collector.health_url).json()["status"] == "ok"
        os.rename(log, log.with_name("_delta_log.aside"))  # the table's log folder replaced by a file (as root, a chmod
        log.write_text("not a folder")                    # would not stop a commit)
        assert send() == 503
        health = httpx.get(collector.health_url)
        assert health.status_code == 503 and health.json()["status"] == "unhealthy"
        assert "refused every commit since" in health.json()["reason"] and "Not a directory" in health.json()["reason"]
        started = time.monotonic()  # the ingest barrier does not wait on a collector that says what is wrong
        with pytest.raises(ServiceError, match=r"cannot store spans: .*refused every commit since.* fix the lake"):
            check_collector(Stack(collector=collector), wait_s=60)
        assert time.monotonic() - started < 10
        state_path(cfg).parent.mkdir(parents=True, exist_ok=True)
        state_path(cfg).write_text(json.dumps({"collector": {"url": collector.url, "health_url": collector.health_url,
                                                             "pid": collector.process.pid, "log": str(collector.log_path)}}))
        config_file = tmp_path / "config.yaml"
        config_file.write_text(f"project_dir: {tmp_path}\nlake:\n  path: {cfg.lake.path}\n")
        result = CliRunner().invoke(app, ["status", str(config_file)])
        assert result.exit_code == 1
        assert "unhealthy" in result.output and "Not a directory" in result.output and str(collector.log_path) in result.output
        log.unlink()
        os.rename(log.with_name("_delta_log.aside"), log)
        deadline = time.monotonic() + 10
        while send() != 200:
            assert time.monotonic() < deadline
        assert httpx.get(collector.health_url).json()["status"] == "ok"
    finally:
        state_path(cfg).unlink(missing_ok=True)
        collector.stop()


def test_a_collector_that_does_not_answer_is_waited_for_and_one_still_down_stops_the_run_saying_so(tmp_path):
    """The ingest barrier's look at the collector (``check_collector``): an outage shorter than the wait (the network
    to it cut for a while, a restart) is waited out; one that outlasts it stops the run, saying what to do."""
    cfg = make_config(tmp_path, f"collector.port={free_port()}")
    Catalog.from_config(cfg).ensure()
    collector = start_collector(cfg, timeout_s=60)
    collector.stop()
    stack = Stack(collector=collector)
    started = time.monotonic()
    with pytest.raises(ServiceError) as stopped:
        check_collector(stack, wait_s=3)
    assert time.monotonic() - started >= 3
    assert f"the collector at {collector.url} did not answer for 3 s (" in str(stopped.value)
    assert "could not be reached" in str(stopped.value) and "run the same command again to resume" in str(stopped.value)

    back: dict = {}
    starter = threading.Timer(2.0, lambda: back.update(service=start_collector(cfg, timeout_s=60)))
    starter.start()  # the same collector again, on its port, while the barrier waits
    try:
        started = time.monotonic()
        check_collector(stack, wait_s=60)
        assert 2.0 <= time.monotonic() - started < 60
    finally:
        starter.join()
        back["service"].stop()


def test_calls_owned_by_no_agent_get_a_metric_name_mlflow_accepts():
    from mlflow.utils.validation import _validate_metric_name

    for agent in (None, "calc", "solver.on_messages_stream", "Arithmetic solver", "a/b (x)"):
        _validate_metric_name(agent_metric_name(agent, "calls"))
    assert agent_metric_name(None, "calls") == "agent/no_agent/calls"
