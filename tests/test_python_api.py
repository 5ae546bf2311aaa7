"""The Python API, ``arclight.train``: the config keys it takes, the agents it refuses, and, as a notebook runs it,
one epoch in-process twice, with the caller's logging left as it was found (docs/python-api.md)."""

from __future__ import annotations

import io
import logging
import warnings

import pytest

import arclight
from arclight.api import agent_reference
from lightning_core.common import logs
from lightning_core.common.services import free_port
from lightning_core.config import ConfigError
from tests.conftest import REPO
from tests.helpers.api_agent import solve


def _doc_block(name: str) -> str:
    """The python block of docs/python-api.md whose first line is ``# pattern: <name>``."""
    blocks = (REPO / "docs" / "python-api.md").read_text().split("```python\n")[1:]
    [block] = [b.split("```")[0] for b in blocks if b.startswith(f"# pattern: {name}\n")]
    return block


def _logging_state() -> dict:
    """What a caller's logging is: every logger's level, handlers, filters, propagation and disabled flag (the root's
    and transformers' among them), Python's warnings captured or not, and transformers' own switches."""
    import transformers.utils.logging as hf

    root = logging.getLogger()
    loggers = {"": root, **{n: lg for n, lg in root.manager.loggerDict.items() if isinstance(lg, logging.Logger)}}
    return {
        "loggers": {n: (lg.level, list(lg.handlers), list(lg.filters), lg.propagate, lg.disabled)
                    for n, lg in loggers.items()},
        "captured": logging._warnings_showwarning is not None, "showwarning": warnings.showwarning,
        "transformers": (hf.get_verbosity(), hf.is_progress_bar_enabled(), hf._get_library_root_logger().propagate,
                         list(hf._get_library_root_logger().handlers)),
    }


def _changed(before: dict, after: dict) -> dict:
    """What differs from ``before`` in ``after``: among the loggers that existed before (those made since, by the
    libraries a run imports, are theirs), and in the rest of the state."""
    loggers = {n: (v, after["loggers"].get(n)) for n, v in before["loggers"].items() if after["loggers"].get(n) != v}
    return {**loggers, **{k: (v, after[k]) for k, v in before.items() if k != "loggers" and after[k] != v}}


def test_settings_become_the_overrides_the_command_line_would_pass_and_read_back_as_the_same_values(tmp_path):
    cfg = arclight.config(
        agent=solve, dataset=[{"question": "Say hi.", "target": "hi"}], agent_match="^solver$", project_dir=tmp_path,
        name="no", rollouts={"group_size": 2, "resources": {"rate": 1e-5, "code": "007", "when": "2026-11-28"}},
        **{"trainer.learning_rate": 1e-5, "serving.extra_args": ["--enforce-eager"]})
    assert cfg.name == "no"  # YAML 1.1 would read a bare no as False
    assert cfg.rollouts.agent == "tests.helpers.api_agent:solve" and cfg.rollouts.group_size == 2
    assert cfg.rollouts.resources == {"rate": 1e-5, "code": "007", "when": "2026-11-28"}
    assert cfg.trainer.learning_rate == 1e-5 and cfg.serving.extra_args == ["--enforce-eager"]
    assert [(p.name, p.agent_match) for p in cfg.policies] == [("default", "^solver$")]
    assert cfg.rollouts.dataset.parent == tmp_path / ".arclight" / "datasets"
    assert cfg.rollouts.dataset.read_text() == '{"question": "Say hi.", "target": "hi"}\n'
    # the same tasks are the same file (and so the same held-out evaluation)
    again = arclight.config(eval_dataset=[{"question": "Say hi.", "target": "hi"}], project_dir=tmp_path)
    assert again.rollouts.eval_dataset == cfg.rollouts.dataset
    # a key on top of a config file sets that key only, as --set does
    (tmp_path / "config.yaml").write_text("rollouts:\n  group_size: 8\n  resources: {a: 1, b: 2}\n")
    layered = arclight.config(config=tmp_path / "config.yaml", rollouts={"resources": {"b": 3}})
    assert layered.rollouts.group_size == 8 and layered.rollouts.resources == {"a": 1, "b": 3}
    assert layered.project_dir == tmp_path


def test_an_unknown_setting_is_refused_with_the_key_it_meant():
    with pytest.raises(ConfigError, match=r"unknown key 'rollouts.group_sise' \(did you mean 'group_size'\?\)"):
        arclight.config(rollouts={"group_sise": 2})
    with pytest.raises(ConfigError, match="agent_match is the one policy's"):
        arclight.config(agent_match="a", policies=[{"name": "p"}])


def test_the_docs_patterns_two_policies_and_a_cohort_make_the_configs_they_describe(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no config file: the project is the current folder
    for name in ("two policies", "cohort"):
        exec(_doc_block(name), {"arclight": arclight})  # each block asserts what it describes


def _nested():
    def inner(task, ctx):
        return 1.0

    return inner


def test_an_agent_the_rollouts_cannot_import_by_name_is_refused_with_what_to_do():
    assert agent_reference(solve) == "tests.helpers.api_agent:solve"
    assert agent_reference("calc_agent:run") == "calc_agent:run"
    with pytest.raises(ConfigError, match="a lambda, a nested function or a method"):
        agent_reference(lambda task, ctx: 1.0)
    with pytest.raises(ConfigError, match="a lambda, a nested function or a method"):
        agent_reference(_nested())
    main = type(solve)(solve.__code__, {}, "run")
    main.__module__, main.__qualname__ = "__main__", "run"
    with pytest.raises(ConfigError, match=r"defined in __main__ .*%%writefile my_agent.py"):
        agent_reference(main)
    import functools

    with pytest.raises(ConfigError, match="functools.partial"):
        agent_reference(functools.partial(solve))


def test_logging_is_put_back_as_found_after_a_block_that_took_it_over_and_failed(tmp_path):
    mine = logging.StreamHandler(io.StringIO())
    root = logging.getLogger()
    root.addHandler(mine)
    try:
        before = _logging_state()
        with pytest.raises(RuntimeError, match="stage failed"), logs.as_found():
            logs.to_project_log(tmp_path)  # what a flow called from Python does: the process's logging, for good
            logging.getLogger("transformers").propagate = True
            logging.getLogger("notebook").setLevel(logging.DEBUG)
            raise RuntimeError("stage failed")
        after = _logging_state()
        assert _changed(before, after) == {}
        assert after["loggers"]["notebook"] == (logging.DEBUG, [], [], True, False)  # made in the block: its own
        # the loggers whose levels a run sets, as they were (unset, if the block made them)
        assert [n for n in ("lightning_core", "flows", "mlflow")
                if after["loggers"][n][0] != before["loggers"].get(n, (logging.NOTSET,))[0]] == []
    finally:
        root.removeHandler(mine)
        logs._flow_log = None  # to_project_log's, undone by as_found


def _session_settings(tmp_path, *, run_name, vllm_server, collector, collector_config, tiny_model_dir) -> dict:
    """Config keys of a small run on the session's services: two rollouts a task, a held-out evaluation each epoch."""
    return dict(
        project_dir=tmp_path, name="apitest", run_name=run_name,
        lake={"path": collector_config.lake.path, "catalog": tmp_path / "catalog.duckdb"},
        collector={"endpoint": collector.url}, gateway={"port": free_port()},
        serving={"urls": [vllm_server.url], "redeploy": "lora"},  # the session's vLLM: its base weights stay
        model={"path": tiny_model_dir, "served_name": "tiny"}, tracking={"traces": "off"},
        rollouts={"group_size": 2, "concurrency": 4, "timeout_s": 20},
        trainer={"micro_batch_size": 4, "lora_r": 4, "lora_alpha": 8, "learning_rate": 0.01},
        evaluation={"every_epochs": 1, "at_start": False})


@pytest.mark.integration
def test_the_python_api_trains_an_epoch_in_process_then_another_and_leaves_the_callers_logging_as_found(
        prefect_harness, tmp_path, vllm_server, collector, collector_config, tiny_model_dir):
    """The notebook's cells: set up logging, train one epoch of a solver judged by a frozen critic, train the next with
    the pattern computed from the agents the first discovered. Each call's services start and stop within it."""
    from lightning_core import analyst

    root = logging.getLogger()
    mine = logging.StreamHandler(io.StringIO())  # the notebook's own handler and levels
    root.addHandler(mine)
    level = root.level
    root.setLevel(logging.INFO)
    logging.getLogger("notebook").setLevel(logging.DEBUG)
    questions = [{"id": f"q{i}", "question": f"Say the word {w}.", "target": w} for i, w in enumerate(["xyzzy", "plugh"])]
    settings = _session_settings(tmp_path, run_name="api", vllm_server=vllm_server, collector=collector,
                                 collector_config=collector_config, tiny_model_dir=tiny_model_dir)
    try:
        before = _logging_state()
        first = arclight.train(agent=solve, dataset=questions, eval_dataset=questions, agent_match="^solver$", epochs=1,
                               **settings)
        assert _changed(before, _logging_state()) == {}
        assert [(r["epoch"], r["status"], r["new_version"]) for r in first.epochs] == [(0, "completed", "default-v1")]
        assert first.versions == ["default-v1"]
        assert [(e["after_epochs"], e["tasks"]) for e in first.evaluations] == [(1, 2)]
        assert 0.0 <= first.evaluations[0]["reward_mean"] <= 1.0
        # the critic's calls are recorded and frozen: its score trained the solver
        assert [(a["agent_name"], a["policy"], a["calls"], a["triplets"] > 0) for a in first.agents] == [
            ("critic", None, 4, False), ("solver", "default", 4, True)]
        assert first.lake == collector_config.lake.path and first.mlflow_uri == f"sqlite:///{tmp_path / 'mlflow.db'}"
        assert "arclight.train with" in first.log_file.read_text()

        # the pattern computed before the epoch from the agents the run discovered
        with analyst.connect(first.config) as con:
            discovered = [n for (n,) in con.execute("SELECT DISTINCT agent_name FROM agent_epochs WHERE run_id = 'api' "
                                                    "ORDER BY 1").fetchall()]
        assert discovered == ["critic", "solver"]
        pattern = "^(" + "|".join(n for n in discovered if n != "critic") + ")$"
        second = arclight.train(agent=solve, dataset=questions, eval_dataset=questions, agent_match=pattern, epochs=2,
                                **settings)
        assert _changed(before, _logging_state()) == {}
        assert second.versions == ["default-v1", "default-v2"]
        assert [(e["after_epochs"], e["tasks"]) for e in second.evaluations] == [(1, 2), (2, 2)]
        assert [(a["epoch"], a["agent_name"], a["policy"]) for a in second.agents if a["epoch"] == 1] == [
            (1, "critic", None), (1, "solver", "default")]
        assert not (tmp_path / ".arclight" / "logs" / "prefect.log").exists()  # the session's Prefect API served both
        # the docs' fan-out of the metrics, on this result
        from prometheus_client import CollectorRegistry

        scope: dict = {}
        exec(_doc_block("metrics"), scope)
        text = scope["fan_out"](second, CollectorRegistry())
        labels = sorted(",".join(sorted(line.split("{")[1].split("}")[0].split(",")))  # in any order the client writes
                        for line in text.splitlines() if line.startswith("arclight_"))
        assert labels == ['after_epochs="1",run="api"', 'after_epochs="2",run="api"', 'epoch="0",run="api"',
                          'epoch="1",run="api"']
    finally:
        root.removeHandler(mine)
        root.setLevel(level)


@pytest.mark.integration
def test_ctrl_c_stops_the_python_api_as_it_stops_the_command_and_comes_out_as_keyboard_interrupt(
        prefect_harness, tmp_path, vllm_server, collector, collector_config, tiny_model_dir):
    """A SIGINT while an agent hangs: its process group is killed, its rollout stays planned (the next call runs it),
    the call's gateway stops, and the caller gets KeyboardInterrupt with its signal handler and logging as before."""
    import os
    import signal
    import threading
    import time

    import psutil

    from lightning_core.common import stopping
    from lightning_core.store.catalog import Catalog

    pids = tmp_path / "pids"
    pids.mkdir()
    settings = _session_settings(tmp_path, run_name="stop", vllm_server=vllm_server, collector=collector,
                                 collector_config=collector_config, tiny_model_dir=tiny_model_dir)
    settings["rollouts"] = {"group_size": 1, "timeout_s": 120}

    returned = threading.Event()

    def interrupt_once_the_agent_hangs() -> None:
        while not returned.is_set():  # never once the call is over: the signal would stop the test session
            if any(pids.iterdir()):
                os.kill(os.getpid(), signal.SIGINT)  # as a terminal's Ctrl-C, or a notebook's "interrupt the kernel"
                return
            time.sleep(0.1)

    handler, before = signal.getsignal(signal.SIGINT), _logging_state()
    sender = threading.Thread(target=interrupt_once_the_agent_hangs, daemon=True)
    sender.start()
    started = time.monotonic()
    try:
        with pytest.raises(KeyboardInterrupt):
            arclight.train(agent="tests.helpers.flow_agent:run", agent_match=".*", epochs=1, **settings, dataset=[
                {"id": "stuck", "behavior": "hang", "question": "", "target": "", "pid_dir": str(pids)}])
    finally:
        returned.set()
        sender.join(timeout=5)
    assert time.monotonic() - started < 150
    [written] = list(pids.iterdir())
    agent_pids = [int(p) for p in written.read_text().split()]

    def alive(pid: int) -> bool:
        try:
            return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return False

    deadline = time.monotonic() + 10
    while any(map(alive, agent_pids)) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert [p for p in agent_pids if alive(p)] == []  # the agent and the child it started
    cfg = arclight.config(**settings)
    with Catalog.from_config(cfg).read(spans=False) as con:
        assert con.execute("SELECT task_id, status FROM rollouts WHERE run_id = 'stop'").fetchall() == [("stuck", "planned")]
    with pytest.raises(OSError):  # the call's gateway stopped with it
        import socket

        socket.create_connection(("127.0.0.1", cfg.gateway.port), timeout=1).close()
    assert signal.getsignal(signal.SIGINT) is handler and not stopping.stopping()
    assert _changed(before, _logging_state()) == {}
