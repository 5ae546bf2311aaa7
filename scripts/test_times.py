"""Each test file's time in a pytest run, from its JUnit XML (``pytest --junitxml``), longest first.

    python scripts/test_times.py test-results/junit-*.xml            # per file
    python scripts/test_times.py test-results/junit-*.xml --tests 20 # and the 20 longest tests

With several files (``make test``'s two lanes: integration, unit), the table adds them up and first says how long
each lane took from end to end (its test suite's time): the lanes ran side by side, so the run took the longest.

Setup and teardown of fixtures count with the test that ran them (pytest puts them in its ``time``), so a file that
starts the session's vLLM first is charged for it. Used by ``.ci/run`` to print the table after ``make test``.
"""

from __future__ import annotations

import argparse
import collections
import sys
import xml.etree.ElementTree as ET


def file_of(case: ET.Element) -> str:
    """The test file of a ``testcase`` (``classname`` is ``tests.test_x`` or ``tests.test_x.Class``)."""
    parts = case.get("classname", "").split(".")
    module = [p for p in parts if p.startswith("test_")]
    return f"tests/{module[0]}.py" if module else case.get("classname", "?")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("junit", nargs="+")
    parser.add_argument("--tests", type=int, default=0, help="also list the N longest tests")
    args = parser.parse_args(argv)
    cases = []
    for path in args.junit:
        root = ET.parse(path).getroot()
        suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
        found = list(root.iter("testcase"))
        wall = sum(float(suite.get("time") or 0) for suite in suites)
        if len(args.junit) > 1:
            print(f"{path}: {len(found)} tests, {wall:.1f} s ({wall / 60:.1f} min) from end to end")
        cases += found
    per_file: dict[str, list[float]] = collections.defaultdict(list)
    outcome: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    for case in cases:
        name = file_of(case)
        per_file[name].append(float(case.get("time") or 0))
        kind = next((child.tag for child in case if child.tag in ("failure", "error", "skipped")), "passed")
        outcome[name][kind] += 1
    total = sum(sum(times) for times in per_file.values())
    if not cases:
        print(f"{' '.join(args.junit)}: no test ran (a collection error stops pytest before any test: see its output above)")
        return 0
    print(f"| file | tests | seconds | share | not passed |\n|---|---|---|---|---|")
    for name, times in sorted(per_file.items(), key=lambda kv: -sum(kv[1])):
        bad = ", ".join(f"{n} {k}" for k, n in outcome[name].items() if k != "passed")
        print(f"| {name} | {len(times)} | {sum(times):.1f} | {sum(times) / total:.1%} | {bad} |")
    print(f"| total | {len(cases)} | {total:.1f} ({total / 60:.1f} min) | | |")
    if args.tests:
        print(f"\n| test | seconds |\n|---|---|")
        for case in sorted(cases, key=lambda c: -float(c.get("time") or 0))[:args.tests]:
            print(f"| {file_of(case)}::{case.get('name')} | {float(case.get('time') or 0):.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
