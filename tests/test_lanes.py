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
