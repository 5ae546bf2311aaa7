"""`make setup`'s step runner (scripts/steps.sh): one line per step with its time on the screen, the tools' own
output in .arclight/logs/setup.log, and a failed step's last lines with the log's path and a non-zero exit.

The steps here are small shell commands in a scratch folder: no install runs (a real setup takes minutes)."""

from __future__ import annotations

import subprocess
from pathlib import Path

from tests.conftest import REPO


def _setup(tmp_path: Path, body: str) -> subprocess.CompletedProcess:
    """Run ``body`` as a setup script that sources scripts/steps.sh, in ``tmp_path`` (where its log goes)."""
    script = tmp_path / "setup.sh"
    script.write_text(f"set -euo pipefail\nSTEP_TAG=setup\nsource {REPO / 'scripts' / 'steps.sh'}\n{body}\n")
    return subprocess.run(["bash", str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=60,
                          env={"PATH": "/usr/bin:/bin"})


def test_a_step_prints_one_line_with_its_time_and_its_output_goes_to_the_log(tmp_path):
    done = _setup(tmp_path, 'step "saying hello" sh -c "echo hello from pip; echo a warning >&2"\nsay "done"')
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.splitlines() == ["[setup] saying hello ... 0 s", "[setup] done"]
    assert done.stderr == ""
    log = (tmp_path / ".arclight" / "logs" / "setup.log").read_text()
    assert "hello from pip\na warning\n" in log and "saying hello" in log


def test_a_failed_step_prints_its_last_20_lines_and_the_logs_path_and_exits_with_its_status(tmp_path):
    failed = _setup(tmp_path, 'step "installing" sh -c \'for i in $(seq 1 30); do echo "pip line $i"; done; exit 3\'\n'
                              'say "never here"')
    assert failed.returncode == 3
    assert failed.stdout.splitlines() == ["[setup] installing ... failed after 0 s (exit status 3)"]
    shown = [line.strip() for line in failed.stderr.splitlines()]
    assert shown[0] == "[setup] the last lines of its output:"
    assert shown[1:21] == [f"pip line {i}" for i in range(11, 31)]
    assert shown[21] == f"[setup] all of it: {(tmp_path / '.arclight' / 'logs' / 'setup.log').resolve()}"
    assert "pip line 1\n" in (tmp_path / ".arclight" / "logs" / "setup.log").read_text()  # the whole output is kept


def test_a_step_that_is_a_function_stops_at_its_first_failing_command(tmp_path):
    """A shell function run as an `if` condition would ignore set -e and carry on past a failed pip install."""
    failed = _setup(tmp_path, 'install() { echo first; false; echo "after the failure" > marker; }\n'
                              'step "installing two things" install')
    assert failed.returncode == 1
    assert not (tmp_path / "marker").exists()
    assert "first" in failed.stderr and "after the failure" not in failed.stderr


def test_an_optional_step_that_fails_is_reported_and_setup_goes_on(tmp_path):
    went_on = _setup(tmp_path, 'step_optional "installing chromium" sh -c "echo no such package; exit 100"\n'
                               'step "the next step" true')
    assert went_on.returncode == 0
    lines = went_on.stdout.splitlines()
    assert lines[0] == "[setup] installing chromium ... failed after 0 s (exit status 100)"
    assert lines[1:] == ["[setup] going on without it", "[setup] the next step ... 0 s"]
    assert "no such package" in went_on.stderr


def test_a_script_setup_runs_appends_to_the_same_log(tmp_path):
    """setup.sh runs setup_agents.sh, which sources steps.sh again: it must not start the log afresh."""
    inner = tmp_path / "inner.sh"
    inner.write_text(f"set -euo pipefail\nSTEP_TAG=setup-agents\nsource {REPO / 'scripts' / 'steps.sh'}\n"
                     'step "inner" echo from the inner script\n')
    done = _setup(tmp_path, f'step "outer" echo from the outer script\nbash {inner}')
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == ["[setup] outer ... 0 s", "[setup-agents] inner ... 0 s"]
    log = (tmp_path / ".arclight" / "logs" / "setup.log").read_text()
    assert "from the outer script" in log and "from the inner script" in log


def test_step_durations_read_in_minutes_and_seconds(tmp_path):
    shown = _setup(tmp_path, "for s in 0 59 60 196 3600; do step_duration $s; echo; done")
    assert shown.stdout.splitlines() == ["0 s", "59 s", "1 min 0 s", "3 min 16 s", "60 min 0 s"]

