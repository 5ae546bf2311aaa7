"""``make test``'s two lanes (scripts/test_lanes.py): the integration tests in one pytest process, the unit tests in
another beside it; a failure in either fails the run and is printed."""

from __future__ import annotations

import os
import subprocess
import sys
import xml.etree.ElementTree as ET

from tests.conftest import REPO


def test_the_unit_lane_runs_beside_the_integration_lane_and_its_failure_fails_the_run(tmp_path):
    project = tmp_path / "project"
    project.mkdir()
    (project / "pytest.ini").write_text("[pytest]\nmarkers =\n    integration: starts servers\n")
    seen = tmp_path / "unit-ran"
    (project / "test_heavy.py").write_text(
        "import pathlib, time, pytest\n"
        "@pytest.mark.integration\n"
        "def test_heavy_sees_the_unit_lane_run_meanwhile():\n"
        f"    flag = pathlib.Path({str(seen)!r})\n"
        "    deadline = time.monotonic() + 60\n"
        "    while not flag.exists() and time.monotonic() < deadline:\n"
        "        time.sleep(0.05)\n"
        "    assert flag.exists(), 'the unit lane did not run while the integration lane ran'\n"
        "@pytest.mark.integration\n"
        "def test_heavy_second():\n"
        "    pass\n")
    (project / "test_light.py").write_text(
        "import pathlib\n"
        "def test_light_passes():\n"
        f"    pathlib.Path({str(seen)!r}).write_text('yes')\n"
        "def test_light_fails_with_a_message():\n"
        "    assert 1 == 2, 'a unit test failed on purpose'\n")
    results = tmp_path / "results"
    run = subprocess.run([sys.executable, str(REPO / "scripts" / "test_lanes.py"), "-p", "no:cacheprovider"],
                         cwd=project, capture_output=True, text=True, timeout=180,
                         env={**os.environ, "ARCLIGHT_TEST_RESULTS": str(results)})
    assert run.returncode == 1, run.stdout + run.stderr
    assert "2 passed" in run.stdout  # the integration lane, printed as it ran
    assert "the unit-test lane (exit 1)" in run.stdout and "a unit test failed on purpose" in run.stdout
    assert "integration exit 0, unit exit 1" in run.stdout
    lanes = {name: ET.parse(results / f"junit-{name}.xml").getroot() for name in ("integration", "unit")}
    names = {lane: sorted(case.get("name") for case in root.iter("testcase")) for lane, root in lanes.items()}
    assert names == {"integration": ["test_heavy_second", "test_heavy_sees_the_unit_lane_run_meanwhile"],
                     "unit": ["test_light_fails_with_a_message", "test_light_passes"]}
    times = subprocess.run([sys.executable, str(REPO / "scripts" / "test_times.py"), *sorted(map(str, results.glob("junit-*.xml")))],
                           capture_output=True, text=True, timeout=60)
    assert times.returncode == 0 and "| total | 4 |" in times.stdout and "from end to end" in times.stdout, times.stdout


def _server_fixture(pid_file) -> str:
    """A test file's opening: a fixture that starts a process in its own session (as a training run's servers are),
    records its pid in ``pid_file`` and stops it when the fixture ends."""
    return ("import pathlib, signal, os, subprocess, time, pytest\n"
            "@pytest.fixture\n"
            "def server():\n"
            "    proc = subprocess.Popen(['sleep', '600'], start_new_session=True)\n"
            f"    pathlib.Path({str(pid_file)!r}).write_text(str(proc.pid))\n"
            "    try:\n"
            "        yield proc\n"
            "    finally:\n"
            "        os.killpg(proc.pid, signal.SIGTERM)\n"
            "        proc.wait()\n")


def _started_group_alive(pid_file, deadline_s: float = 60) -> int:
    import time

    deadline = time.monotonic() + deadline_s
    while not pid_file.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert pid_file.exists(), "the test's fixture did not start its process"
    return int(pid_file.read_text())


def _gone(pid: int, within_s: float = 10) -> bool:
    import time

    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.05)
    return False


def test_sigterm_to_pytest_stops_what_a_fixture_started_and_writes_the_summary(tmp_path):
    """CI's time limit and `timeout` send SIGTERM: a fixture's own process group (a training run: collector, gateway,
    vLLMs) must stop with pytest, not go on under init. Before tests/helpers/sigterm.py it went on."""
    import signal
    import time

    pid_file = tmp_path / "server.pid"
    (tmp_path / "test_server.py").write_text(
        _server_fixture(pid_file) +
        "def test_waits_on_its_server(server):\n"
        "    time.sleep(120)\n")
    pytest_run = subprocess.Popen([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "tests.helpers.sigterm",
                                   f"--junitxml={tmp_path / 'junit.xml'}", str(tmp_path / "test_server.py")],
                                  cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                  env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        server = _started_group_alive(pid_file)
        time.sleep(0.5)
        pytest_run.send_signal(signal.SIGTERM)
        output, _ = pytest_run.communicate(timeout=60)
        outlived = not _gone(server)
    finally:
        if pytest_run.poll() is None:
            pytest_run.kill()
        try:
            os.killpg(int(pid_file.read_text()), signal.SIGKILL)
        except (OSError, ValueError):
            pass
    assert not outlived, f"the fixture's process {server} outlived pytest's SIGTERM:\n{output}"
    assert "KeyboardInterrupt" in output and "stopped by signal SIGTERM" in output, output
    assert (tmp_path / "junit.xml").exists(), output


def test_a_run_past_its_budget_stops_both_lanes_as_ctrl_c_would_and_lists_what_ran(tmp_path):
    """CI stops the job at 90 min and printed neither the test that was running nor the others' times (stop 77): the
    lanes' own budget ends the run first, each pytest unwinds its fixtures, and the times are printed. 30 s: with 9 s,
    on a loaded machine, the budget ran out before pytest had reached the hanging test."""
    pid_file = tmp_path / "server.pid"
    project = tmp_path / "project"
    project.mkdir()
    (project / "pytest.ini").write_text("[pytest]\nmarkers =\n    integration: starts servers\n")
    (project / "test_heavy.py").write_text(
        _server_fixture(pid_file) +
        "@pytest.mark.integration\n"
        "def test_quick():\n"
        "    pass\n"
        "@pytest.mark.integration\n"
        "def test_hangs_on_its_server(server):\n"
        "    time.sleep(300)\n")
    (project / "test_light.py").write_text("def test_light_passes():\n    pass\n")
    results = tmp_path / "results"
    try:
        run = subprocess.run([sys.executable, str(REPO / "scripts" / "test_lanes.py"), "-p", "no:cacheprovider",
                              "-p", "tests.helpers.sigterm"],
                             cwd=project, capture_output=True, text=True, timeout=120,
                             env={**os.environ, "ARCLIGHT_TEST_RESULTS": str(results), "ARCLIGHT_TEST_BUDGET_MIN": "0.5",
                                  "PYTHONPATH": str(REPO)})
        server = int(pid_file.read_text())
        outlived = not _gone(server)
    finally:
        import signal

        try:
            os.killpg(int(pid_file.read_text()), signal.SIGKILL)
        except (OSError, ValueError):
            pass
    output = run.stdout + run.stderr
    assert run.returncode != 0 and "ran past its budget of 0.5 min (ARCLIGHT_TEST_BUDGET_MIN)" in output, output
    assert not outlived, f"the integration lane's fixture process outlived the budget's stop:\n{output}"
    assert "stopped during test_heavy.py::test_hangs_on_its_server, " in output, output  # where it stopped
    assert "| tests/test_heavy.py |" in output and "| total |" in output, output  # the times, from the JUnit files


def test_the_suites_conftest_registers_every_hook_of_the_sigterm_plugin():
    """The fresh-clone run stopped by SIGTERM printed no "stopped during": conftest imported pytest_configure alone,
    so the hooks that name the running test were never registered in the suite itself."""
    import tests.conftest as conftest
    from tests.helpers import sigterm

    hooks = [name for name in vars(sigterm) if name.startswith("pytest_")]
    assert hooks and all(getattr(conftest, name, None) is getattr(sigterm, name) for name in hooks), hooks
