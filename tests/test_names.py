"""Names that become lake folders (issue 15, items 1 and 3): checked in one place, with full matches."""

from __future__ import annotations

import math
import subprocess
import sys

import pytest

from lightning_core import names
from lightning_core.store.catalog import Catalog
from lightning_core.config import ConfigError, load_config
from lightning_core.store.spans import Lake, span_scope_filter
from lightning_core.ingest.span_rows import SpanDataError, request_to_rows
from lightning_core.ingest.tables import request_to_tables
from lightning_core.store.outputs import output_dir
from tests.conftest import REPO
from tests.otlp_factory import export_request


@pytest.mark.parametrize("value", ["ok\n", "", ".", "..", "a/b", "../x", "_schema", "-a", "a b", "x" * 129, None, 5])
def test_names_that_cannot_be_a_folder_are_refused(value):
    with pytest.raises(names.InvalidName, match="letters, digits"):
        names.check_run_id(value)


@pytest.mark.parametrize("value", ["a", "calc.eval", "run_2-b", "9" * 128])
def test_plain_names_pass(value):
    assert names.check_run_id(value) == value


@pytest.mark.parametrize("value", [-1, 1.5, True, " 7 ", "7\n", "+7", "007", math.inf, "9223372036854775808", 2**63, "1e3", None])
def test_epochs_are_plain_integers_in_int64(value):
    with pytest.raises(names.InvalidName, match="whole number from 0 to 2"):
        names.check_epoch(value)


def test_epochs_as_int_or_decimal_text_pass():
    assert [names.check_epoch(v) for v in (0, 7, "7", 2**63 - 1, "9223372036854775807")] == [0, 7, 7, 2**63 - 1, 2**63 - 1]


def test_inside_refuses_paths_that_leave_the_root(tmp_path):
    assert names.inside(tmp_path, tmp_path / "a" / "b") == tmp_path / "a" / "b"
    for bad in (tmp_path / "a" / ".." / "..", tmp_path, tmp_path.parent / "x"):
        with pytest.raises(names.InvalidName, match="not inside"):
            names.inside(tmp_path, bad)


def test_config_refuses_run_and_policy_names_with_a_trailing_newline(tmp_path):
    # fails before: ^...$ let "ok\n" through the config, then every query on the lake failed
    with pytest.raises(ConfigError, match="run_name"):
        load_config(None, overrides=[f"project_dir={tmp_path}", 'run_name="ok\\n"'])
    with pytest.raises(ConfigError, match="policies"):
        load_config(None, overrides=[f"project_dir={tmp_path}", 'policies=[{name: "p\\n"}]'])


@pytest.mark.parametrize("resource", [
    {"arclight.run_id": "ok\n"},
    {"arclight.run_id": "ok", "arclight.epoch": "9223372036854775808"},
    {"arclight.run_id": "ok", "arclight.epoch": -1},
    {"arclight.run_id": "ok", "arclight.epoch": 1.5},
    {"arclight.run_id": "ok", "arclight.epoch": True},
    {"arclight.run_id": "ok", "arclight.epoch": " 7 "},
    {"arclight.run_id": "ok", "arclight.epoch": math.inf},
    {"arclight.run_id": "ok", "arclight.epoch": "9" * 300},
    {"arclight.run_id": "ok", "arclight.attempt": "9223372036854775808"},
])
def test_ingest_refuses_resources_that_would_poison_the_lake(resource):
    # fails before: stored as folder run_id=ok\n or epoch=9223372036854775808, after which every
    # query on the spans view failed for every run (hive binder error, BIGINT cast)
    with pytest.raises(SpanDataError):
        request_to_rows(export_request(resource))


def test_a_lake_fed_only_through_ingest_stays_queryable(tmp_path):
    lake = Lake(tmp_path / "lake")
    lake.write(request_to_tables(export_request({"arclight.run_id": "ok", "arclight.epoch": "7"})))
    for bad in ({"arclight.run_id": "ok\n"}, {"arclight.run_id": "ok", "arclight.epoch": "9223372036854775808"}):
        with pytest.raises(SpanDataError):
            lake.write(request_to_tables(export_request(bad)))
    catalog = Catalog(tmp_path / "lake")
    catalog.ensure()
    with catalog.read() as con:
        assert con.execute("SELECT run_id, epoch, count(*) FROM spans GROUP BY ALL").fetchall() == [("ok", 7, 1)]


@pytest.mark.parametrize("run_id", ["..", "../../spans/training/run_id=other", "ok\n"])
def test_output_and_span_folders_refuse_names_that_leave_their_folder(tmp_path, run_id):
    with pytest.raises(names.InvalidName):
        output_dir(tmp_path, "llm_calls", run_id=run_id, epoch=0)
    with pytest.raises(names.InvalidName):
        span_scope_filter(run_id, None)
    with pytest.raises(names.InvalidName):
        output_dir(tmp_path, "triplets", run_id="ok", epoch=0, policy="../p")


def test_triplets_command_refuses_a_run_id_with_dots_and_leaves_other_runs_alone(tmp_path):
    # fails before: --run ../../../spans/training/run_id=other --epoch 0 returned 0, wrote Parquet
    # outside the outputs and replaced (deleted) the raw spans of run 'other'
    lake = Lake(tmp_path / "lake")
    lake.write(request_to_tables(export_request({"arclight.run_id": "other", "arclight.epoch": 0}, 20)))
    Catalog(tmp_path / "lake").ensure()
    spans = sorted((tmp_path / "lake" / "spans" / "training" / "run_id=other" / "epoch=0").glob("part-*.parquet"))
    for run in ("..", "../../../spans/training/run_id=other"):
        out = subprocess.run([sys.executable, "-m", "lightning_core", "triplets", "--lake", str(tmp_path / "lake"), "--run", run,
                              "--epoch", "0"],
                             cwd=REPO, capture_output=True, text=True, timeout=120)
        assert out.returncode == 2, out.stderr
        assert "is not valid" in out.stderr and "Traceback" not in out.stderr
    assert sorted((tmp_path / "lake" / "spans" / "training" / "run_id=other" / "epoch=0").glob("part-*.parquet")) == spans
    out = subprocess.run([sys.executable, "-m", "lightning_core", "triplets", "--lake", str(tmp_path / "lake"), "--run", "other",
                          "--epoch", "-1"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "whole number" in out.stderr
