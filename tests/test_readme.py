"""The README's snippets run as written: the tour's Python blocks and its queries on the lake they make, and
`arclight init`, in a fresh folder, in the order a reader meets them.

The Python API's block trains, so here it runs with ``arclight.config`` in place of ``arclight.train`` (the same
arguments, checked, nothing started) in the folder `arclight init` made; tests/test_python_api.py trains through the
API. The commands that start servers are left to their tests: `arclight train` after `init` (tests/test_init.py),
make train (tests/test_main_job.py).
"""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

from tests.conftest import REPO

ARCLIGHT = Path(sys.executable).parent / "arclight"


def _blocks(language: str) -> list[str]:
    return re.findall(rf"^```{language}\n(.*?)^```", (REPO / "README.md").read_text(), flags=re.S | re.M)


def _commands(prefix: str) -> list[list[str]]:
    """Each README bash line that starts with ``prefix``, as arguments (its comment dropped)."""
    lines = [line for block in _blocks("bash") for line in block.splitlines() if line.startswith(prefix)]
    return [[str(ARCLIGHT), *shlex.split(line, comments=True)[1:]] for line in lines]


def _run(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    ran = subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=300)
    assert ran.returncode == 0, f"{args}: {ran.stdout[-2000:]}{ran.stderr[-3000:]}"
    return ran


def test_the_readmes_tour_traces_into_a_lake_then_its_queries_read_the_rollout_back(tmp_path):
    python = [b for b in _blocks("python") if "import arclight\n" not in b]
    assert len(python) == 2 and "tracing.init_tracing(lake=" in python[0]  # the tour's: trace, then read
    _run([sys.executable, "-c", python[0]], tmp_path)

    queries = _commands("arclight query --lake .arclight/lake")
    assert len(queries) == 2
    table = _run(queries[0], tmp_path).stdout
    assert all(name in table for name in ("agent planner", "tool calculator", "reward primary"))
    rows = [json.loads(line) for line in _run(queries[1], tmp_path).stdout.splitlines()]
    assert rows == [{"name": "reward primary", "reward_value": 1.0}]

    # as written, then one line more to see what Polars read
    read = _run([sys.executable, "-c", python[1] + "\nprint(spans.filter(pl.col('run_id') == 'demo').collect().height)"],
                tmp_path).stdout
    assert "r1" in read and read.strip().endswith("3")  # DuckDB's table of the rollout, then Polars' 3 spans


def test_the_readmes_arclight_init_makes_the_project_its_train_line_names(tmp_path):
    [init] = _commands("arclight init ")
    _run(init, tmp_path)
    trains = [line for block in _blocks("bash") for line in block.splitlines() if line.startswith("arclight train my")]
    assert trains and {tmp_path / shlex.split(line, comments=True)[2] for line in trains} == {tmp_path / "my-agent" / "config.yaml"}
    assert (tmp_path / "my-agent" / "config.yaml").is_file() and (tmp_path / "my-agent" / "agent.py").is_file()

    [api] = [b for b in _blocks("python") if "import arclight\n" in b]
    assert "arclight.train(" in api and api.splitlines()[-1].startswith("print(result.")
    checked = "\n".join(api.splitlines()[:-1]).replace("arclight.train(", "arclight.config(")
    ran = _run([sys.executable, "-c", checked + "\nprint(result.rollouts.agent, result.rollouts.dataset, result.epochs)"],
               tmp_path / "my-agent").stdout.split()
    assert ran == ["agent:run", str(tmp_path / "my-agent" / "tasks.jsonl"), "1"]
