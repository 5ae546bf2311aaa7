"""`arclight init DIR`: a project to edit, for each agent choice, that trains one epoch before any edit.

The unit tests run the real command (Typer, in process) and read what it wrote. The integration test inits a project
with each choice and runs `arclight train DIR/config.yaml --epochs 1` on it, pointed at the session's tiny model,
collector, vLLM and Prefect API by --set only: the project's files stay as init wrote them. Each epoch runs in a
process of its own, as a user's does: the four agents' modules are all named `agent`, and a process holds one
module of a name (the rollout fork server preloads the first).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from lightning_core.cli.main import app
from lightning_core.common.services import free_port
from lightning_core.config import load_config
from lightning_core.store.catalog import Catalog
from lightning_core.store.outputs import load_triplets

ARCLIGHT = Path(sys.executable).parent / "arclight"
CHOICES = ["openai", "langgraph", "openai-agents", "command"]
AGENT_FILE = {"openai": "agent.py", "langgraph": "agent.py", "openai-agents": "agent.py", "command": "agent.mjs"}


def _init(*args: str):
    return CliRunner().invoke(app, ["init", *args])


@pytest.mark.parametrize("choice", CHOICES)
def test_init_writes_a_config_with_only_the_keys_a_user_chooses_an_agent_five_tasks_and_a_readme(tmp_path, choice):
    folder = tmp_path / f"my-{choice}"
    result = _init(str(folder), "--agent", choice)
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in folder.iterdir()) == sorted(["README.md", "config.yaml", "tasks.jsonl", AGENT_FILE[choice]])
    raw = yaml.safe_load((folder / "config.yaml").read_text())
    agent_key = "command" if choice == "command" else "agent"
    assert raw == {"name": f"my-{choice}", "epochs": 4,
                   "rollouts": {agent_key: ["node", "agent.mjs"] if choice == "command" else "agent:run",
                                "dataset": "tasks.jsonl", "group_size": 4, "resources": {"max_tokens": 16}},
                   "policies": [{"name": f"my-{choice}", "agent_match": None}]}
    cfg = load_config(folder / "config.yaml")  # everything else is a default: the bundled model, local servers
    assert cfg.model.path is None and cfg.rollouts.dataset == folder / "tasks.jsonl"
    tasks = [json.loads(line) for line in (folder / "tasks.jsonl").read_text().splitlines()]
    assert len(tasks) == 5 and all(set(t) == {"id", "question", "answer"} for t in tasks)
    agent = (folder / AGENT_FILE[choice]).read_text()
    assert "The model call" in agent and "The reward" in agent
    assert f"`{AGENT_FILE[choice]}`" in (folder / "README.md").read_text()


def test_init_refuses_a_folder_that_is_not_empty_and_names_what_is_there_unless_forced(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    refused = _init(str(tmp_path))
    assert refused.exit_code == 2
    assert "is not empty (it holds notes.txt)" in refused.output and "--force" in refused.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]
    forced = _init(str(tmp_path), "--force")
    assert forced.exit_code == 0, forced.output
    assert (tmp_path / "notes.txt").read_text() == "mine"  # what was there stays
    assert sorted(p.name for p in tmp_path.iterdir()) == ["README.md", "agent.py", "config.yaml", "notes.txt", "tasks.jsonl"]


def test_init_names_the_project_after_its_folder_in_a_form_that_names_lake_folders(tmp_path):
    assert _init(str(tmp_path / "My Agent (v2)")).exit_code == 0
    assert load_config(tmp_path / "My Agent (v2)" / "config.yaml").name == "My-Agent-v2"


@pytest.mark.integration
@pytest.mark.parametrize("choice", CHOICES)
def test_init_then_one_epoch_of_its_own_config_trains_on_the_sessions_model(
    choice, prefect_harness, tmp_path, vllm_server, collector, collector_config, tiny_model_dir
):
    from prefect.settings import PREFECT_API_URL

    if choice == "command" and shutil.which("node") is None:
        pytest.fail("node is needed for the command agent `arclight init --agent command` writes (apt-get install nodejs)")
    folder = tmp_path / f"init-{choice}"
    assert _init(str(folder), "--agent", choice).exit_code == 0
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    run = f"init-{choice}"
    overrides = [f"{k}={v}" for k, v in {
        "lake.path": str(collector_config.lake.path),
        "lake.catalog": str(tmp_path / "catalog.duckdb"),
        "run_name": run,
        "collector.endpoint": collector.url,
        "serving.urls": json.dumps([vllm_server.url]),
        "serving.redeploy": "lora",  # the session's vLLM serves other tests: never merge into its weights
        "gateway.port": str(free_port()),
        "model.path": str(tiny_model_dir),
        "model.served_name": "tiny",
        "rollouts.group_size": "2",
        "rollouts.concurrency": "10",
        "rollouts.timeout_s": "60",
        "rollouts.resources.max_tokens": "4",
        "trainer.lora_r": "4",
        "trainer.lora_alpha": "8",
    }.items()]
    sets = [arg for setting in overrides for arg in ("--set", setting)]
    env = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value()}  # the command's flows report to the harness
    ran = subprocess.run([str(ARCLIGHT), "train", str(folder / "config.yaml"), "--epochs", "1", *sets], env=env,
                         cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert ran.returncode == 0, ran.stdout[-3000:] + ran.stderr[-5000:]
    cfg = load_config(folder / "config.yaml", overrides=overrides)
    with Catalog.from_config(cfg).read() as con:
        assert con.execute("SELECT epoch, status FROM epochs WHERE run_id = ?", [run]).fetchall() == [(0, "completed")]
        rollouts = con.execute("SELECT task_id, status, reward FROM rollouts WHERE run_id = ? AND mode = 'train'",
                               [run]).fetchall()
        calls = con.execute("SELECT agent_name, count(*) FROM llm_calls WHERE run_id = ? GROUP BY ALL", [run]).fetchall()
    tasks = sorted(json.loads(line)["id"] for line in (folder / "tasks.jsonl").read_text().splitlines())
    assert sorted(t for t, _, _ in rollouts) == sorted(tasks * 2)
    assert {s for _, s, _ in rollouts} == {"succeeded"} and {r for _, _, r in rollouts} <= {0.0, 1.0}
    agent = {"openai": None, "langgraph": "solver", "openai-agents": "solver", "command": None}[choice]
    assert calls == [(agent, 10)]  # one model call per rollout, named as the framework names it
    triplets = load_triplets(cfg, run_id=run, epoch=0, policy=folder.name).to_pylist()
    assert len(triplets) == 10 and all(t["prompt_token_ids"] and t["response_token_ids"] for t in triplets)
    assert {p.name: p.read_bytes() for p in folder.iterdir() if p.name in before} == before  # trained before any edit
