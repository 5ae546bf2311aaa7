"""``arclight init DIR``: a new project to edit, for an agent written with the plain OpenAI client, LangGraph, the
OpenAI Agents SDK, or as a program in any language.

The files come from the package's templates (``lightning_core/init-templates``): ``common/`` holds the config, the
task file and the README stub, one folder per agent choice its agent file. ``arclight train DIR/config.yaml`` runs
on the bundled model right after, before any edit.
"""

from __future__ import annotations

import re
import shutil
from enum import Enum
from importlib import resources
from pathlib import Path
from string import Template

import typer

from lightning_core.cli.common import console, fail


class AgentChoice(str, Enum):
    openai = "openai"
    langgraph = "langgraph"
    openai_agents = "openai-agents"
    command = "command"


# what each choice puts under `rollouts:` in config.yaml, and the agent file it copies
AGENTS = {
    AgentChoice.openai: ("agent.py", "  agent: agent:run               # agent.py's run(task, ctx), once per rollout: "
                                     "it returns the reward"),
    AgentChoice.langgraph: ("agent.py", "  agent: agent:run               # agent.py's run(task, ctx): the LangGraph "
                                        "graph, once per rollout; it returns the reward"),
    AgentChoice.openai_agents: ("agent.py", "  agent: agent:run               # agent.py's run(task, ctx): the Agents "
                                            "SDK agent, once per rollout; it returns the reward"),
    AgentChoice.command: ("agent.mjs", "  command: [node, agent.mjs]     # a program per rollout, in any language: "
                                       "the task on stdin, the reward as its last line"),
}


def project_name(folder: Path) -> str:
    """The project's name from its folder's: letters, digits, '.', '_' and '-' (a name that names lake folders)."""
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", folder.name).strip("-._") or "agent"
    return name[:128]


def write_project(folder: Path, *, agent: AgentChoice = AgentChoice.openai, force: bool = False) -> list[Path]:
    """Write a new project into ``folder`` (made if missing); return the files written.

    A folder that holds anything is refused unless ``force``, which overwrites only the files it writes."""
    if folder.exists() and not folder.is_dir():
        raise FileExistsError(f"{folder} is a file, not a folder: give a new or empty folder")
    if folder.is_dir() and any(folder.iterdir()) and not force:
        found = sorted(p.name for p in folder.iterdir())
        shown = ", ".join(found[:5]) + (f" and {len(found) - 5} more" if len(found) > 5 else "")
        raise FileExistsError(f"{folder} is not empty (it holds {shown}): give a new or empty folder, "
                              "or --force to write the project's files over what is there")
    agent_file, agent_setting = AGENTS[agent]
    name = project_name(folder.resolve())
    values = {"name": name, "agent": agent.value, "agent_file": agent_file, "agent_setting": agent_setting}
    templates = resources.files("lightning_core") / "init-templates"
    files = {"config.yaml": Template((templates / "common" / "config.yaml").read_text()).substitute(values),
             "README.md": Template((templates / "common" / "README.md").read_text()).substitute(values),
             "tasks.jsonl": (templates / "common" / "tasks.jsonl").read_text(),
             agent_file: (templates / agent.value / agent_file).read_text()}
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for relative, text in files.items():
        path = folder / relative
        path.write_text(text)
        written.append(path)
    return written


def init(
    folder: Path = typer.Argument(..., metavar="DIR", help="The new project's folder (made if missing; must be empty)."),
    agent: AgentChoice = typer.Option(AgentChoice.openai, "--agent", help="How the agent is written: the plain OpenAI "
                                      "client, LangGraph, the OpenAI Agents SDK, or a program in any language (command: "
                                      "Node.js)."),
    force: bool = typer.Option(False, "--force", help="Write into a folder that is not empty (the project's files are "
                               "overwritten, others left alone)."),
) -> None:
    """Start a project: a config, an agent with one function, five tasks and a README, ready to train."""
    try:
        written = write_project(folder, agent=agent, force=force)
    except FileExistsError as exc:
        fail(str(exc), code=2)
    console.print(f"made {folder}/ (agent: {agent.value}): {', '.join(p.name for p in written)}", highlight=False)
    if agent is AgentChoice.command and shutil.which("node") is None:
        console.print("warning: node is not on PATH: agent.mjs needs Node.js 18 or later (or point rollouts.command at "
                      "a program in another language)", highlight=False)
    console.print(f"train it on the bundled model:  arclight train {folder / 'config.yaml'} --epochs 1", highlight=False)
