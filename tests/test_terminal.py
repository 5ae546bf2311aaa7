"""What a user sees in the terminal (issue 52), as a user runs it: `arclight train` of a small project whose
command starts every part itself (Prefect's API, the collector, vLLM, the gateway), on a tiny model.

Under a 120x40 pseudo-terminal, read by a real terminal emulator (pyte), the live display updates in place with only
our messages above it, and no line of Prefect, MLflow, transformers or Python's warnings reaches the screen (they go
to the log file); the run ends with its summary table whole on the screen. Piped to a file, the same run writes a
plain line per stage event and tables as wide as their content. A run that stops on the agent's failures ends with
our one paragraph: no traceback above it, and no DuckDB "leaked instance" lines below it (reliability finding 10).
"""

from __future__ import annotations

import fcntl
import json
import os
import pty
import re
import struct
import subprocess
import sys
import termios
import threading
import time
from pathlib import Path

import pyte
import pytest

from lightning_core.common.logs import log_path
from lightning_core.common.services import free_port
from lightning_core.config import load_config
from lightning_core.store.catalog import Catalog
from tests.conftest import REPO
from tests.test_main_job import _kill_marked

pytestmark = pytest.mark.integration

ARCLIGHT = Path(sys.executable).with_name("arclight")
COLUMNS, LINES = 120, 40
# what the issue found on the screen: transformers' bars and FutureWarning, Prefect's task-run lines and tracebacks,
# MLflow's migrations, DuckDB's nanobind report at exit
NOISE = ("Loading weights", "Writing model shards", "FutureWarning", "warnings.warn", "nanobind", "leaked instance",
         "Traceback", "Task run", "Flow run", "Finished in state", "MLflow database tables")
COLUMN_NAMES = ("epoch", "served", "reward (mean)", "succeeded", "failed", "timed out", "groups (informative/drawn)",
                "trained", "held-out after", "status")


class Terminal:
    """One command on a pseudo-terminal of COLUMNS x LINES, drawn by pyte; keeps the lines that scroll off the top."""

    def __init__(self, argv: list[str], *, env: dict[str, str]) -> None:
        self.screen = pyte.HistoryScreen(COLUMNS, LINES, history=100_000)
        self.stream = pyte.ByteStream(self.screen)
        self.lock = threading.Lock()
        master, slave = pty.openpty()
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", LINES, COLUMNS, 0, 0))
        self.proc = subprocess.Popen(argv, stdin=slave, stdout=slave, stderr=slave, env=env, cwd=REPO,
                                     start_new_session=True)
        os.close(slave)
        self.master = master
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        while True:
            try:
                data = os.read(self.master, 65536)
            except OSError:  # EIO: the last process holding the terminal exited
                return
            if not data:
                return
            with self.lock:
                self.stream.feed(data)

    def display(self) -> list[str]:
        with self.lock:
            return [line.rstrip() for line in self.screen.display]

    def scrolled_off(self) -> list[str]:
        with self.lock:
            return ["".join(line[x].data for x in range(COLUMNS)).rstrip() for line in self.screen.history.top]

    def close(self) -> None:
        self.reader.join(timeout=10)
        os.close(self.master)


def _project(folder: Path, tiny_model_dir: Path, tasks: list[dict]) -> Path:
    """A project the command starts everything for: its own collector, vLLM (the tiny model, merged redeploy, so each
    version is saved as full weights) and gateway on free ports."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "tasks.jsonl").write_text("".join(json.dumps(t) + "\n" for t in tasks))
    config = {
        "name": "screen", "run_name": "screen-1", "epochs": 1,
        "model": {"path": str(tiny_model_dir), "served_name": "tiny"},
        "serving": {"port": free_port(), "dtype": "float32", "max_model_len": 1024, "redeploy": "merged"},
        "collector": {"port": free_port()}, "gateway": {"port": free_port()},
        "policies": [{"name": "screen"}], "evaluation": {"every_epochs": None},
        "rollouts": {"agent": "tests.helpers.flow_agent:run", "agent_path": [str(REPO)], "dataset": "tasks.jsonl",
                     "tasks_per_epoch": 4, "group_size": 4, "concurrency": 16, "timeout_s": 60},
        "trainer": {"micro_batch_size": 8, "lora_r": 4, "lora_alpha": 8, "learning_rate": 0.01},
    }
    path = folder / "config.yaml"
    path.write_text(json.dumps(config))  # JSON is YAML
    return path


QUESTIONS = [{"id": f"q{i}", "question": f"Say the word {w}.", "target": w} for i, w in enumerate(["xyzzy", "plugh", "qwfp", "zork"])]


def _env(folder: Path, mark: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "FORCE_COLOR", "NO_COLOR"))
           and k not in ("COLUMNS", "LINES")}
    env.update({"TERM": "xterm-256color", "PREFECT_HOME": str(folder / "prefect-home"), "ARCLIGHT_TEST_MARK": mark,
                "PYTHONUNBUFFERED": "1"})
    return env


def _bars(screen: list[str]) -> tuple[list[str], list[str]]:
    return ([line for line in screen if line.startswith("epochs ") and "━" in line],
            [line for line in screen if line.startswith("rollouts ") and "━" in line])


def _cells(line: str) -> list[str]:
    return [cell.strip() for cell in line.strip("│┃").split("│")]


@pytest.fixture(scope="module")
def project(tmp_path_factory, tiny_model_dir) -> Path:
    return _project(tmp_path_factory.mktemp("screen"), tiny_model_dir, QUESTIONS)


def test_on_a_terminal_one_live_display_updates_in_place_with_no_library_noise_and_the_summary_ends_whole(project):
    mark = f"screen-{os.getpid()}-{time.monotonic_ns()}"
    term = Terminal([str(ARCLIGHT), "train", str(project), "--epochs", "1"], env=_env(project.parent, mark))
    screens: list[list[str]] = []
    try:
        deadline = time.monotonic() + 900
        while term.proc.poll() is None:
            assert time.monotonic() < deadline, "\n".join(term.display())
            screens.append(term.display())
            time.sleep(0.5)
        code = term.proc.wait()
    finally:
        _kill_marked(mark)
        term.close()
    final, scrolled = term.display(), term.scrolled_off()
    assert code == 0, "\n".join(scrolled + final)

    # the display, each time it showed, as one copy of the two bars, whatever stage the run was at
    stages: dict[str, list[str]] = {}
    for screen in screens:
        epochs, rollouts = _bars(screen)
        if epochs and rollouts:  # (a screen read in the middle of a redraw may hold one bar, never two copies)
            stage = epochs[0].split("/1", 1)[1].strip().rsplit(" ", 1)[0].strip()
            stages[stage] = screen  # the last screen of each stage: the most a stage could have piled up
    assert len(stages) >= 3, f"the display showed fewer than three stages: {list(stages)}"
    for stage, screen in stages.items():
        epochs, rollouts = _bars(screen)
        assert (len(epochs), len(rollouts)) == (1, 1), f"at {stage!r} the screen held:\n" + "\n".join(screen)
    assert any("starting services" in s for s in stages) and any("epoch 0:" in s for s in stages), list(stages)

    # nothing of the libraries ever reached the screen: it went to the log file, whose path the command printed
    everything = "\n".join(scrolled + final + [line for screen in screens for line in screen])
    for noise in NOISE:
        assert noise not in everything, f"{noise!r} reached the screen:\n{everything[-6000:]}"
    cfg = load_config(project)
    log = log_path(cfg.project_dir)
    assert f"log: {log}" in everything
    logged = log.read_text()
    assert "Finished in state Completed()" in logged and "FutureWarning" in logged
    assert "MLflow database tables" in logged

    # above the display only our own messages: the epoch's stages and the version it trained
    assert any("epoch 0: 16 rollouts planned" in line for line in scrolled + final)
    assert any("screen-v1 from 16 triplets" in line for line in scrolled + final)

    # the final screen holds the summary table whole, with the epoch's row as the catalog has it
    top = next(i for i, line in enumerate(final) if line.startswith("┏"))
    bottom = next(i for i, line in enumerate(final) if line.startswith("└"))
    assert final[top - 1].strip() == "run screen-1" and top < bottom
    rows = [_cells(line) for line in final[top:bottom] if line.startswith("│")]
    with Catalog.from_config(cfg).read(spans=False) as con:
        succeeded = con.execute("SELECT count(*) FROM rollouts WHERE run_id = 'screen-1' AND status = 'succeeded'"
                                ).fetchall()[0][0]
    assert [(r[0], r[1], r[3], r[4], r[5], r[7], r[9]) for r in rows] == [
        ("0", "base", str(succeeded), "0", "0", "screen-v1", "completed")]
    assert "…" not in "\n".join(final)
    assert not any(line.startswith(("epochs ", "rollouts ")) for line in final[top:])


def test_piped_to_a_file_a_plain_line_per_stage_event_and_tables_as_wide_as_their_content(project):
    mark = f"pipe-{os.getpid()}-{time.monotonic_ns()}"
    out = project.parent / "train-2.out"
    with open(out, "wb") as fh:
        proc = subprocess.Popen([str(ARCLIGHT), "train", str(project), "--epochs", "2"], stdout=fh, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, env=_env(project.parent, mark), cwd=REPO, start_new_session=True)
        try:
            code = proc.wait(timeout=900)
        finally:
            _kill_marked(mark)
    text = out.read_text()
    assert code == 0, text[-4000:]
    lines = text.splitlines()
    summary = lines.index(next(line for line in lines if line.strip() == "run screen-1"))
    assert summary < 30, "\n".join(lines[:summary])  # one epoch ran: its lines before the summary
    assert "━" not in "\n".join(lines[:summary])  # no progress bars in a file
    for noise in NOISE:
        assert noise not in text, f"{noise!r} in the output:\n{text[-6000:]}"
    assert any("epoch 1: 16 rollouts planned" in line for line in lines[:summary])
    # each stage's counts in words, never a Python dict (`epoch 1 rollouts: {'succeeded': 16}`; issue 72)
    assert not re.search(r"\{'\w+': ", text), text[-6000:]
    assert any(re.search(r"epoch 1 rollouts: \d+ succeeded", line) for line in lines[:summary]), text[-6000:]
    assert any(re.search(r"epoch 1 sampling: \d+ tasks drawn in \d+ rounds?: \d+ groups informative", line)
               for line in lines[:summary]), text[-6000:]
    header = next(line for line in lines if line.startswith("┃"))
    assert _cells(header.replace("┃", "│")) == list(COLUMN_NAMES)  # every column's name whole, on one line
    assert len(header) > 80 and "…" not in text
    rows = [_cells(line) for line in lines[summary:] if line.startswith("│")]
    assert [(r[0], r[7], r[9]) for r in rows[:2]] == [("0", "screen-v1", "completed"), ("1", "screen-v2", "completed")]
    # served and trained in fp32: no gap to speak of, and decoupled (auto)
    [gap] = [line for line in lines if line.startswith("vLLM against the trainer, at each epoch's first step")]
    assert float(gap.split("logprob gap mean ")[1].split(",")[0].split("-")[-1]) < 1e-3, gap
    # decoupled's ratio is 1 at the first micro-batch by construction: the line shows the behaviour weight instead,
    # at 1 with both in fp32, and what ppo would have clipped (nothing)
    assert ("behaviour correction decoupled; behaviour weight at importance_cap: 0.0% of tokens (mean 1.000); "
            "ppo would have clipped 0.0%") in gap, gap


def test_asking_for_fewer_epochs_than_the_run_has_says_so_and_starts_nothing(tmp_path, tiny_model_dir):
    """A run with 2 completed epochs; `--epochs 1` once showed `epochs 2/1` while services started."""
    from lightning_core.epoch import bookkeeping as ep

    project = _project(tmp_path / "fewer", tiny_model_dir, QUESTIONS)
    catalog = Catalog.from_config(load_config(project))
    catalog.ensure()
    for epoch in (0, 1):
        ep.set_epoch_status(catalog, run_id="screen-1", epoch=epoch, status="completed")
    proc = subprocess.run([str(ARCLIGHT), "train", str(project), "--epochs", "1"], capture_output=True, text=True,
                          env=_env(project.parent, "fewer"), cwd=REPO, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "run screen-1 already has 2 completed epochs, and --epochs is the run's total: 1 trains none (--epochs 3 " \
           "trains one more)" in proc.stderr
    assert "2/1" not in proc.stderr and "run screen-1" in proc.stderr
    # no service was started: each one (Prefect, collector, vLLM, gateway) writes its log in the project's logs
    logs = load_config(project).project_dir / ".arclight" / "logs"
    assert sorted(p.name for p in logs.glob("*.log")) in ([], ["arclight.log"]), sorted(logs.glob("*"))


def test_a_run_that_stops_on_the_agents_failures_ends_with_our_paragraph_and_no_traceback_or_leak_report(
        tmp_path, tiny_model_dir):
    failing = [{"id": f"q{i}", "behavior": "raise", "question": "", "target": ""} for i in range(4)]
    config = _project(tmp_path / "failing", tiny_model_dir, failing)
    mark = f"stop-{os.getpid()}-{time.monotonic_ns()}"
    term = Terminal([str(ARCLIGHT), "train", str(config), "--epochs", "1"], env=_env(tmp_path, mark))
    try:
        code = term.proc.wait(timeout=900)
    finally:
        _kill_marked(mark)
        term.close()
    shown = [line for line in term.scrolled_off() + term.display() if line.strip()]
    text = "\n".join(shown)
    assert code == 1, text
    log = log_path(tmp_path / "failing")
    # the paragraph, wrapped by the terminal: what stopped the run, then what to do and where the full log is; it is
    # the last thing on the screen
    start = max(i for i, line in enumerate(shown) if line.startswith("error: "))
    paragraph = "".join("".join(shown[start:]).split())  # the terminal's wrapping undone
    assert paragraph.startswith("error:16of16rolloutsofsamplinground0ofepoch0(runscreen-1)failed"), text
    assert paragraph.endswith("".join(f"completed stages are kept; fix the problem and run the same command again to "
                                      f"resume (the full log: {log})".split())), text
    for noise in NOISE:
        assert noise not in text, f"{noise!r} reached the screen:\n{text[-6000:]}"
    # the 16 rollouts failed the same way: one line names the first, one more counts the rest
    warned = [line for line in shown if "warning: rollout " in line]
    assert len(warned) == 1 and "failed: ValueError" in warned[0], text
    assert "epoch0:15moretrainrolloutsfailedwithValueError" in "".join(text.split()), text
    logged = log.read_text()
    assert "Traceback" in logged and "RunStopped" in logged  # the tracebacks went to the file
