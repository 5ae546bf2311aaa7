"""Prompts as versioned resources: texts in the config, every version in the catalog, one serving.

A project names its prompts under ``rollouts.resources.prompts.<name>``. The catalog's
``prompt_versions`` table keeps every version of every prompt: the config's text, the candidates
prompt optimisation wrote, with parent, score, critique and how each was made. One version per
prompt serves. Rollouts get its text as ``ctx.prompt(name)`` (``ctx.resources["prompts"]``) and
its id on their spans (resource attribute ``arclight.prompt.<name>.version``) and in the catalog
(``rollouts.prompt_versions``).

Which version serves: the one last promoted, unless the config's text is new to the catalog. An
edit of the config is registered as a new version that serves; re-running with an unchanged
config keeps what prompt optimisation promoted.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from lightning_core import names
from lightning_core.store.catalog import Catalog
from lightning_core.config import ArclightConfig

COLUMNS = ("version", "name", "number", "text", "parent_version", "score", "score_tasks", "made_by", "critique",
           "run_id", "round", "serving")


class PromptError(ValueError):
    """A prompt or prompt version that does not exist or cannot be used; the message says which and why."""


@dataclass(frozen=True)
class PromptVersion:
    """One version of a named prompt."""

    version: str
    name: str
    number: int
    text: str
    parent_version: str | None
    score: float | None
    score_tasks: int | None
    made_by: str  # config | critic | scripted | manual
    critique: str | None
    run_id: str | None
    round: int | None
    serving: bool


def configured(config: ArclightConfig) -> dict[str, str]:
    """Return the prompts the config names (``rollouts.resources.prompts``), name -> text."""
    return dict(config.rollouts.resources.get("prompts") or {})


def register_config_prompts(catalog: Catalog, config: ArclightConfig) -> dict[str, PromptVersion]:
    """Record each configured prompt's text as a version (once) and return the serving version per name.

    A text the catalog has not seen for that name becomes a new version that serves (the user
    edited the config); a known text changes nothing, so a promoted version keeps serving.
    """
    serving = {}
    for name, text in configured(config).items():
        with catalog.write() as con:
            known = con.execute("SELECT version FROM prompt_versions WHERE name = ? AND text = ?", [name, text]).fetchall()
            if not known:
                parent = con.execute("SELECT version FROM prompt_versions WHERE name = ? AND serving", [name]).fetchall()
                version = _insert(con, name=name, text=text, parent=parent[0][0] if parent else None, made_by="config")
                con.execute("UPDATE prompt_versions SET serving = (version = ?) WHERE name = ?", [version, name])
        serving[name] = serving_version(catalog, name)
    return serving


def serving_version(catalog: Catalog, name: str) -> PromptVersion:
    """Return the version of ``name`` that serves now."""
    rows = _select(catalog, "WHERE name = ? AND serving", [name])
    if not rows:
        raise PromptError(f"prompt {name!r} has no serving version: name it under rollouts.resources.prompts in the config")
    return rows[0]


def get(catalog: Catalog, version: str) -> PromptVersion:
    """Return one version by id (``<name>-v<N>``); the error lists the versions that exist."""
    rows = _select(catalog, "WHERE version = ?", [version])
    if not rows:
        known = [v.version for v in versions(catalog)]
        raise PromptError(f"prompt version {version!r} is not in the catalog (known: {', '.join(known) or 'none'}); "
                          "`arclight prompts CONFIG` lists them")
    return rows[0]


def versions(catalog: Catalog, name: str | None = None, *, run_id: str | None = None) -> list[PromptVersion]:
    """Return every version (of ``name``, made by ``run_id``), oldest first."""
    where, params = [], []
    if name is not None:
        where.append("name = ?")
        params.append(name)
    if run_id is not None:
        where.append("run_id = ?")
        params.append(run_id)
    return _select(catalog, ("WHERE " + " AND ".join(where)) if where else "", params)


def resolve(catalog: Catalog, config: ArclightConfig, overrides: list[str] | None = None) -> dict[str, PromptVersion]:
    """Return the version each configured prompt uses: the serving one, or one named in ``overrides``."""
    if not configured(config):
        if overrides:
            raise PromptError(f"prompt versions {overrides} were asked for, but the config names no prompts "
                              "(rollouts.resources.prompts)")
        return {}
    chosen = register_config_prompts(catalog, config)
    for version in overrides or []:
        found = get(catalog, version)
        if found.name not in chosen:
            raise PromptError(f"prompt version {version!r} is a version of {found.name!r}, which the config does not name "
                              f"(its prompts: {sorted(chosen)})")
        chosen[found.name] = found
    return chosen


def add_candidate(catalog: Catalog, *, name: str, text: str, parent: str | None, made_by: str, critique: str | None,
                  run_id: str | None, round: int | None) -> tuple[PromptVersion, bool]:
    """Record a candidate text of ``name``; return it and whether it is new (a known text returns the known version)."""
    with catalog.write() as con:
        known = con.execute("SELECT version FROM prompt_versions WHERE name = ? AND text = ?", [name, text]).fetchall()
        if known:
            version, new = known[0][0], False
        else:
            version = _insert(con, name=name, text=text, parent=parent, made_by=made_by, critique=critique,
                              run_id=run_id, round=round)
            new = True
    return get(catalog, version), new


def set_score(catalog: Catalog, version: str, *, score: float | None, tasks: int) -> None:
    """Store a version's latest score (mean reward) and how many rollouts it is over."""
    with catalog.write() as con:
        con.execute("UPDATE prompt_versions SET score = ?, score_tasks = ? WHERE version = ?", [score, tasks, version])


def promote(catalog: Catalog, version: str) -> PromptVersion:
    """Make ``version`` the serving version of its prompt; return it."""
    found = get(catalog, version)
    with catalog.write() as con:
        con.execute("UPDATE prompt_versions SET serving = (version = ?) WHERE name = ?", [version, found.name])
    return get(catalog, version)


def resources_with(resources: dict[str, Any], chosen: dict[str, PromptVersion]) -> dict[str, Any]:
    """Return rollout resources whose ``prompts`` hold the chosen versions' texts."""
    if not chosen:
        return dict(resources)
    return {**resources, "prompts": {name: v.text for name, v in chosen.items()}}


def version_ids(chosen: dict[str, PromptVersion]) -> dict[str, str]:
    """Return name -> version id."""
    return {name: v.version for name, v in chosen.items()}


def _insert(con, *, name: str, text: str, parent: str | None, made_by: str, critique: str | None = None,
            run_id: str | None = None, round: int | None = None) -> str:
    names.check_name(name, what="prompt name")
    number = con.execute("SELECT coalesce(max(number), 0) + 1 FROM prompt_versions WHERE name = ?", [name]).fetchall()[0][0]
    version = f"{name}-v{number}"
    con.execute(
        "INSERT INTO prompt_versions (version, name, number, text, parent_version, made_by, critique, run_id, round, serving) "
        "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, false)",
        [version, name, number, text, parent, made_by, critique, run_id, round],
    )
    return version


def _select(catalog: Catalog, where: str, params: list[Any]) -> list[PromptVersion]:
    with catalog.read(spans=False) as con:
        rows = con.execute(f"SELECT {', '.join(COLUMNS)} FROM prompt_versions {where} ORDER BY name, number", params).fetchall()
    return [PromptVersion(*row[:-1], bool(row[-1])) for row in rows]


def as_json(chosen: dict[str, PromptVersion]) -> str:
    """The ``rollouts.prompt_versions`` value: JSON of name -> version id."""
    return json.dumps(version_ids(chosen), sort_keys=True)
