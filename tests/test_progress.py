"""What `arclight train`'s progress line says, read from the epochs table as a re-run would see it."""

from __future__ import annotations

import datetime as dt

from lightning_core.cli.progress import _snapshot
from lightning_core.epoch import bookkeeping as ep
from lightning_core.store.catalog import Catalog
from tests.conftest import make_config


def test_the_progress_line_shows_an_epoch_training_beside_the_next_epochs_rollouts(tmp_path):
    catalog = Catalog.from_config(make_config(tmp_path, "run_name=r"))
    catalog.ensure()
    assert _snapshot(catalog, "r")["stage"] == "starting services"
    now = dt.datetime.now(dt.timezone.utc)
    ep.set_epoch_status(catalog, run_id="r", epoch=0, status="completed")
    ep.set_epoch_status(catalog, run_id="r", epoch=1, status="triplets_done", train_started_at=now)
    ep.set_epoch_status(catalog, run_id="r", epoch=2, status="planned")
    snap = _snapshot(catalog, "r")
    assert snap["stage"] == "epoch 1: training · epoch 2: planned" and (snap["completed"], snap["epoch"]) == (1, 2)
    ep.set_epoch_status(catalog, run_id="r", epoch=1, status="completed", train_finished_at=now)
    ep.set_epoch_status(catalog, run_id="r", epoch=2, status="completed")
    assert _snapshot(catalog, "r")["stage"] == "epoch 2: completed"


def test_a_table_printed_off_a_terminal_is_whole_and_lands_on_the_console_it_was_given():
    """A pipe's console is 80 columns: the table is printed as wide as its content instead, on the same console,
    so that a recording console (the summary a caller asks for) holds it too."""
    import io

    from rich.console import Console
    from rich.table import Table

    from lightning_core.cli.output import print_table

    table = Table(title="run r")
    for column in ("agent", "policy", "note"):
        table.add_column(column)
    table.add_row("checker", "frozen (its calls train nothing)", "x" * 120)
    out = io.StringIO()
    console = Console(file=out, record=True, width=80, force_terminal=False)
    print_table(console, table)
    recorded = console.export_text()
    row = next(line for line in recorded.splitlines() if "checker" in line)
    assert [c.strip() for c in row.split("│")[1:4]] == ["checker", "frozen (its calls train nothing)", "x" * 120]
    assert out.getvalue() == recorded and console.width == 80  # printed there, and the console left as it was


def test_arclight_traces_points_at_a_tracking_servers_own_ui_instead_of_an_mlflow_ui_command(tmp_path):
    """A tracking server has its own UI: ``mlflow ui --backend-store-uri http://...`` would fail. `arclight traces`
    says where the traces are as the train summary does (one helper), here for a real MLflow server."""
    import subprocess
    import sys

    from lightning_core.common.services import free_port, start_process
    from tests.conftest import REPO

    url = f"http://127.0.0.1:{free_port()}"
    server = start_process("mlflow server", [sys.executable, "-m", "uvicorn", "mlflow.server.fastapi_app:app", "--port",
                                             url.rsplit(":", 1)[1], "--log-level", "warning"],
                           url=url, health_url=f"{url}/health", log_path=tmp_path / "mlflow.log", timeout_s=120,
                           env={"_MLFLOW_SERVER_FILE_STORE": f"sqlite:///{tmp_path / 'mlflow.db'}",
                                "_MLFLOW_SERVER_ARTIFACT_ROOT": str(tmp_path / "artifacts")})
    try:
        Catalog.from_config(make_config(tmp_path)).ensure()
        out = subprocess.run([sys.executable, "-m", "lightning_core", "traces", "--production", "--set",
                              f"project_dir={tmp_path}", "--set", f"tracking.mlflow_uri={url}"],
                             cwd=REPO, capture_output=True, text=True, timeout=120)
    finally:
        server.stop()
    assert out.returncode == 0, out.stderr
    assert "mlflow ui" not in out.stderr, out.stderr
    assert f"see them: {url}/#/experiments/" in out.stderr and "/traces" in out.stderr, out.stderr
