"""MLflow is not the lake's alone (issue 68, findings 4 and 8): a store shared by two lakes (``rm -rf .arclight`` beside
a kept ``mlflow.db``, or one tracking server for two users) keeps each lake's runs, model versions and traces apart,
and publishing traces is bounded by ``tracking.traces_timeout_s``, stops with the stop flag, and never fails an
epoch when MLflow's SQLite file is locked. One real MLflow SQLite store for the module; each test its own project."""

from __future__ import annotations

import shutil
import sqlite3
import threading
import time

import pytest
from mlflow.tracking import MlflowClient

from lightning_core import tracking
from lightning_core.common import stopping
from lightning_core.epoch.traces import publish_epoch
from lightning_core.store.catalog import Catalog
from tests.conftest import make_config
from tests.spans_factory import Rollout, write


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> str:
    """One MLflow SQLite store, its schema made once (its migrations are most of a fresh store's cost)."""
    uri = f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"
    MlflowClient(tracking_uri=uri).search_experiments()
    return uri


def _config(tmp_path, store: str, name: str, *overrides: str):
    return make_config(tmp_path, f"name={name}", f"tracking.mlflow_uri={store}", "run_name=r1", *overrides)


def _rollouts(count: int = 2) -> list[Rollout]:
    made = []
    for i in range(count):
        r = Rollout(f"ro-{i}", task_id=f"t{i}")
        agent = r.agent("planner", 0, 100)
        r.call(10, 20, parent=agent, text=f"ANSWER: {i}")
        r.reward(float(i % 2), 90, parent=agent)
        made.append(r)
    return made


def _new_lake(cfg) -> Catalog:
    """The project's lake and catalog made afresh, as after ``rm -rf .arclight`` (``mlflow.db`` is outside it)."""
    shutil.rmtree(cfg.project_dir / ".arclight", ignore_errors=True)
    catalog = Catalog.from_config(cfg)
    catalog.ensure()
    return catalog


def test_a_lake_keeps_the_id_it_was_made_with_and_a_lake_made_before_ids_gets_one(tmp_path):
    cfg = make_config(tmp_path)
    catalog = Catalog.from_config(cfg)
    catalog.ensure()
    made = catalog.lake_id()
    assert len(made) == 32 and Catalog.from_config(cfg).lake_id() == made  # read back, not made again
    (catalog.state_root / "lake_id").unlink()  # a lake from before lake ids
    older = Catalog.from_config(cfg).lake_id()
    assert older != made and Catalog.from_config(cfg).lake_id() == older
    assert _new_lake(cfg).lake_id() not in (made, older)


def test_a_second_lake_registering_the_same_version_keeps_the_first_lakes_run_and_model_version(tmp_path, store):
    cfg = _config(tmp_path, store, "ident-reg")
    registered = {}
    for lake in (_new_lake(cfg).lake_id(), _new_lake(cfg).lake_id()):
        with tracking.start_run(cfg, run_id="r1", policy="default", params={}, lake=lake) as run:
            mlflow_run = run.info.run_id
        for _ in range(2):  # the second from the same lake replaces its own (an interrupted training's)
            number = tracking.register_version(cfg, policy="default", source=str(tmp_path / "w"), version="default-v1",
                                               mlflow_run_id=mlflow_run, alias="serving", lake=lake)
        registered[lake] = (number, mlflow_run)
    first, second = registered
    assert registered[first][1] != registered[second][1], "the new lake's run r1 resumed the old lake's MLflow run"
    versions = MlflowClient(tracking_uri=store).search_model_versions("name = 'ident-reg-default'")
    kept = sorted((v.tags.get("arclight.lake"), str(v.version), v.run_id) for v in versions)
    assert kept == sorted((lake, *registered[lake]) for lake in registered), kept
    assert tracking.runs_of(cfg, run_id="r1", lake=second) == [registered[second][1]]


def test_a_second_lake_publishes_its_own_traces_of_rollout_ids_another_lake_published(tmp_path, store):
    import mlflow

    # two users of one project on one tracking server: the same run, epoch, rollout ids and attempts
    mine, theirs = (_config(tmp_path / who, store, "ident-traces") for who in ("mine", "theirs"))
    for cfg in (mine, theirs):
        write(cfg.lake.path, _rollouts())
    first = publish_epoch(theirs, run_id="r1", epoch=0)
    assert (first.published, first.already, first.error) == (2, 0, None), first.summary()
    second = publish_epoch(mine, run_id="r1", epoch=0)
    assert (second.published, second.already, second.error) == (2, 0, None), second.summary()
    again = publish_epoch(mine, run_id="r1", epoch=0)
    assert (again.published, again.already) == (0, 2), again.summary()
    found = mlflow.search_traces(locations=[tracking.experiment_id(mine)], return_type="list")
    lakes = sorted(t.info.tags.get("arclight.lake") for t in found)
    assert lakes == sorted([Catalog.from_config(mine).lake_id()] * 2 + [Catalog.from_config(theirs).lake_id()] * 2)


@pytest.fixture
def locked(store):
    """MLflow's SQLite file under an exclusive lock (another writer in the middle of a long transaction)."""
    holder = sqlite3.connect(store.removeprefix("sqlite:///"), isolation_level=None)
    holder.execute("BEGIN EXCLUSIVE")
    yield
    holder.execute("ROLLBACK")
    holder.close()


def test_publishing_ends_within_its_time_budget_while_mlflow_is_locked(tmp_path, store, locked):
    cfg = _config(tmp_path, store, "bound-timeout", "tracking.traces_timeout_s=1")
    write(cfg.lake.path, _rollouts())
    started = time.monotonic()
    report = publish_epoch(cfg, run_id="r1", epoch=0)
    took = time.monotonic() - started
    assert took < 2.5, f"publishing took {took:.1f} s with tracking.traces_timeout_s=1 ({report.summary()})"
    assert report.published == 0 and "traces_timeout_s" in (report.error or ""), report.summary()


def test_publishing_ends_within_a_second_of_the_stop_flag(tmp_path, store, locked):
    cfg = _config(tmp_path, store, "bound-stop")
    write(cfg.lake.path, _rollouts())
    timer = threading.Timer(0.5, stopping.STOP.set)
    started = time.monotonic()
    timer.start()
    try:
        report = publish_epoch(cfg, run_id="r1", epoch=0)
        took = time.monotonic() - started
    finally:
        timer.cancel()
        stopping.STOP.clear()
    assert took < 2.0, f"publishing went on {took - 0.5:.1f} s after the stop flag was set ({report.summary()})"
    assert report.published == 0 and "stop" in (report.error or ""), report.summary()


def test_mlflow_locked_by_another_writer_is_a_line_in_the_epochs_summary_not_a_failed_epoch(tmp_path, store, locked):
    """MLflow waits 20 s on a locked SQLite file before it raises "database is locked" (``PRAGMA busy_timeout`` of its
    sessions); the epoch's publishing task returns at its budget, whichever comes first, and never raises."""
    import json

    from lightning_core.epoch.context import RunContext
    from tasks.epoch import publish_traces

    # 5 s: rebuilding two rollouts' trees took over 1 s on a loaded CI machine (the budget ran out before MLflow's lock
    # was reached); MLflow's own wait on the lock is 20 s, so the budget still ends it
    cfg = _config(tmp_path, store, "locked", "tracking.traces_timeout_s=5")
    write(cfg.lake.path, _rollouts())
    ctx = RunContext.of(cfg)
    with ctx.catalog.write() as con:
        con.execute("INSERT INTO epochs (run_id, epoch, status) VALUES ('r1', 0, 'triplets_done')")
    result = publish_traces.fn(ctx, run_id="r1", epoch=0)
    assert result["published"] == 0 and result["left"] == 2 and result["seconds"] < 6.5, result
    assert "while reading the traces already in MLflow" in result["error"] and "stopped: " in result["summary"], result
    with ctx.catalog.read(spans=False) as con:
        (recorded,) = con.execute("SELECT traces FROM epochs WHERE run_id = 'r1' AND epoch = 0").fetchone()
    assert json.loads(recorded)["error"] == result["error"]


def test_publishing_cut_off_before_the_rollouts_are_counted_says_so_not_zero_of_zero(tmp_path, store):
    """Cut off while rebuilding the trees, the report knows no count: its line said "0 of 0 rollouts chosen" and
    "0 left" of an epoch with two rollouts, none published."""
    cfg = _config(tmp_path, store, "cut-early", "tracking.traces_timeout_s=0.001")
    write(cfg.lake.path, _rollouts())
    report = publish_epoch(cfg, run_id="r1", epoch=0)
    assert report.published == 0 and "traces_timeout_s" in (report.error or ""), report.summary()
    assert "0 of 0 rollouts" not in report.summary(), report.summary()
    assert "every one is left for `arclight traces`" in report.summary(), report.summary()
