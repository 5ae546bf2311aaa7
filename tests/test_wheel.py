"""Arclight as a real package: a wheel built from the tracked files, installed the usual way (not editable) into a
fresh virtualenv, imports from there and runs `arclight triplets` on a small lake, the SQL steps read from inside it
(the top-level sql/ folder ships as the package lightning_core.sql).

The virtualenv takes the project's dependencies from the project's environment through a path line (a ``.pth``
entry naming its site-packages: the .pth files there, the project's own editable install among them, are not read),
so the test installs nothing from the network and runs in seconds; Arclight itself comes only from the wheel.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

from tests.conftest import REPO, make_config
from tests.spans_factory import Rollout, write


def _tracked(prefixes: tuple[str, ...]) -> list[str]:
    files = subprocess.run(["git", "ls-files", *prefixes], cwd=REPO, capture_output=True, text=True, check=True).stdout
    return [f for f in files.splitlines() if (REPO / f).is_file()]


def test_a_wheel_installed_into_a_fresh_virtualenv_imports_and_runs_arclight_triplets(tmp_path):
    source = tmp_path / "src"  # what a fresh clone has: the tracked files only, built outside the checkout
    for name in _tracked(("arclight", "lightning_core", "flows", "tasks", "sql", "pyproject.toml", "README.md")):
        (source / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / name, source / name)
    dist = tmp_path / "dist"
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", str(source), "--no-deps", "--no-build-isolation",
                            "--disable-pip-version-check", "-w", str(dist)], capture_output=True, text=True, timeout=600)
    assert build.returncode == 0, build.stdout[-3000:] + build.stderr[-3000:]
    # setuptools' deprecations (`project.license` as a table was one) print a page into every fresh clone's setup
    assert "Warning" not in build.stdout + build.stderr, build.stdout[-3000:] + build.stderr[-3000:]
    [wheel] = dist.glob("arclight-*.whl")
    inside = set(zipfile.ZipFile(wheel).namelist())
    assert {"lightning_core/sql/credit.sql", "lightning_core/sql/triplets.sql", "lightning_core/sql/views.sql",
            "flows/train.py", "tasks/epoch.py", "arclight/__init__.py", "arclight/api.py"} <= inside
    # every tracked module and SQL file, so a package left off pyproject's list (packages are listed, not found) fails here
    modules = {name for name in _tracked(("arclight", "lightning_core", "flows", "tasks")) if name.endswith(".py")}
    sql = {"lightning_core/" + name for name in _tracked(("sql",)) if name.endswith((".sql", ".py"))}
    assert sorted(modules - inside) == [] and sorted(sql - inside) == []

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    python = venv / "bin" / "python"
    install = subprocess.run([str(python), "-m", "pip", "install", "--no-deps", "--no-index", "--disable-pip-version-check",
                              str(wheel)], capture_output=True, text=True, timeout=600)
    assert install.returncode == 0, install.stderr[-3000:]
    site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    Path(site, "arclight-test-dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")

    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    where = subprocess.run([str(python), "-c", "import arclight, lightning_core.pipeline.steps as s; print(s.__file__)"],
                           cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert where.returncode == 0, where.stderr[-3000:]
    assert where.stdout.strip().startswith(site) and str(REPO) not in where.stdout  # the wheel's copy, not the checkout

    cfg = make_config(tmp_path / "project")
    r = Rollout("w0", task_id="t0")
    agent = r.agent("solver", 0, 100)
    r.call(1, 10, parent=agent)
    r.reward(1.0, 50, parent=agent)
    write(cfg.lake.path, [r])
    ran = subprocess.run([str(venv / "bin" / "arclight"), "triplets", "--lake", str(cfg.lake.path), "--run", "r1",
                          "--epoch", "0"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert ran.returncode == 0, ran.stdout[-2000:] + ran.stderr[-3000:]
    assert "1 rollouts, 1 calls" in ran.stderr and "policy default" in ran.stderr and "1 triplets" in ran.stderr
    # `arclight init` writes its templates from inside the wheel (package data), for every agent choice
    for choice, agent_file in (("openai", "agent.py"), ("langgraph", "agent.py"), ("openai-agents", "agent.py"),
                               ("command", "agent.mjs")):
        made = subprocess.run([str(venv / "bin" / "arclight"), "init", str(tmp_path / choice), "--agent", choice],
                              cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
        assert made.returncode == 0, made.stdout[-2000:] + made.stderr[-3000:]
        assert sorted(p.name for p in (tmp_path / choice).iterdir()) == sorted(["README.md", "config.yaml", "tasks.jsonl",
                                                                               agent_file])
