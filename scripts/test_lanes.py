"""``make test``: the integration tests in one pytest process, the unit tests in a second one beside it.

    .venv/bin/python scripts/test_lanes.py [extra pytest arguments for both lanes]

No two heavy tests ever run at once: every integration test runs in the first lane, one after the other (the hosts
test first). The unit tests (``-m "not integration"``: no vLLM, no Prefect API, no Ray; a session fixture fails any
that starts vLLM) run meanwhile in the second lane; their output goes to ``test-results/unit-lane.log`` and is
printed when both lanes have ended: in full when a unit test failed, else its summary line. JUnit goes to
``test-results/junit-integration.xml`` and ``test-results/junit-unit.xml`` (``scripts/test_times.py`` reads both).

pytest-xdist's ``--dist loadgroup`` was meant to do this, but on pytest 9.2 it groups nothing (pytest-xdist#1386), so
two lanes are two pytest processes here. Ctrl-C stops both (the terminal sends it to both; this script waits for them
and then exits 130). SIGTERM (CI's time limit) stops both the same way: each pytest unwinds (tests/helpers/sigterm.py),
its fixtures stop their servers, and it prints its summary. The exit status is the first lane's if it failed, else the
second's.

A deadline ends a run that has taken too long before CI's own limit does: both lanes stop as on Ctrl-C, the run fails
and says so, and the tests that ran are listed with their times (killed from outside at 90 min, a run showed neither
which test was running nor how long the others took). ``.ci/run`` sets ``ARCLIGHT_TEST_DEADLINE`` (Unix time: its own
start plus 90 min, less 4 for the summaries); ``ARCLIGHT_TEST_BUDGET_MIN`` sets a budget in minutes from the lanes'
start; the earlier counts. Without either, a run has none.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = Path(os.environ.get("ARCLIGHT_TEST_RESULTS", ROOT / "test-results")).resolve()  # a test's runs write elsewhere


def _from_the_terminal() -> bool:
    """Whether this process runs in a terminal's foreground process group, where Ctrl-C reaches every lane."""
    try:
        return os.getpgrp() == os.tcgetpgrp(sys.stdin.fileno())
    except OSError:
        return False


def _signal_lanes(signum: int, *lanes: subprocess.Popen) -> None:
    for lane in lanes:
        if lane.poll() is None:
            lane.send_signal(signum)


def _deadline(started: float) -> tuple[float, str]:
    """The run's deadline (time.monotonic) and how to name it: the earlier of ``ARCLIGHT_TEST_DEADLINE`` (Unix time)
    and ``ARCLIGHT_TEST_BUDGET_MIN`` from ``started``; none (inf) without either."""
    found = [(float("inf"), "")]
    if os.environ.get("ARCLIGHT_TEST_DEADLINE"):
        at = float(os.environ["ARCLIGHT_TEST_DEADLINE"])
        found.append((time.monotonic() + (at - time.time()), f"its deadline, {time.strftime('%H:%M:%S', time.localtime(at))} "
                      "(ARCLIGHT_TEST_DEADLINE: CI's 90 min, less 4 for the summaries)"))
    if os.environ.get("ARCLIGHT_TEST_BUDGET_MIN"):
        budget = float(os.environ["ARCLIGHT_TEST_BUDGET_MIN"])
        found.append((started + budget * 60, f"its budget of {budget:g} min (ARCLIGHT_TEST_BUDGET_MIN)"))
    return min(found, key=lambda item: item[0])


def _wait(lane: subprocess.Popen, deadline: float) -> int | None:
    """The lane's exit status, or None when ``deadline`` (time.monotonic) passes first."""
    try:
        return lane.wait(timeout=max(0.0, deadline - time.monotonic()) if deadline != float("inf") else None)
    except subprocess.TimeoutExpired:
        return None


def main(argv: list[str]) -> int:
    RESULTS.mkdir(exist_ok=True)
    for stale in ("junit.xml", "junit-integration.xml", "junit-unit.xml"):
        (RESULTS / stale).unlink(missing_ok=True)
    pytest = [sys.executable, "-m", "pytest", "-q", "-ra"]  # in the current folder (make: the repository's root)
    unit_log = RESULTS / "unit-lane.log"
    started = time.monotonic()
    with open(unit_log, "w") as log:
        unit = subprocess.Popen([*pytest, "-m", "not integration", "-p", "no:cacheprovider",
                                 f"--junitxml={RESULTS / 'junit-unit.xml'}", *argv],
                                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    print(f"unit tests: a second pytest process beside this one (pid {unit.pid}), output in {unit_log}", flush=True)
    interrupted = over_budget = False
    deadline, why = _deadline(started)
    integration = subprocess.Popen([*pytest, "--durations=25", "-m", "integration",
                                    f"--junitxml={RESULTS / 'junit-integration.xml'}", *argv])
    # a stop from outside (CI's timeout, `kill`) stops both lanes the way it would stop one pytest
    signal.signal(signal.SIGTERM, lambda signum, frame: _signal_lanes(signal.SIGTERM, integration, unit))
    while True:
        try:
            first = _wait(integration, deadline)
            second = _wait(unit, deadline)
            if first is None or second is None:  # over budget: stop both as Ctrl-C would, and wait for their summaries
                print(f"\nerror: make test ran past {why}: both lanes stop as on Ctrl-C; the tests that ran, and their "
                      "times, follow", flush=True)
                over_budget = True
                _signal_lanes(signal.SIGINT, integration, unit)
                deadline = float("inf")
                continue
            break
        except KeyboardInterrupt:  # wait for both lanes to stop their servers
            interrupted = True
            if not _from_the_terminal():  # a terminal's Ctrl-C reached both lanes already: a second one would be a hard stop
                _signal_lanes(signal.SIGINT, integration, unit)
    took = time.monotonic() - started
    text = unit_log.read_text(errors="replace")
    if second != 0:
        print(f"\n==== the unit-test lane (exit {second}), from {unit_log} ====\n{text}", flush=True)
    else:
        summary = next((line for line in reversed(text.splitlines()) if line.strip()), "")
        print(f"\nunit-test lane: {summary}", flush=True)
    print(f"both lanes ended after {took / 60:.1f} min: integration exit {first}, unit exit {second}", flush=True)
    if over_budget:
        junits = sorted(map(str, RESULTS.glob("junit-*.xml")))
        if junits:
            subprocess.run([sys.executable, str(ROOT / "scripts" / "test_times.py"), *junits, "--tests", "15"], check=False)
        return first or second or 1
    if interrupted:
        return 130
    return first if first != 0 else second


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
