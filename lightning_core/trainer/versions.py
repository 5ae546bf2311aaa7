"""Policy versions in the catalog: ``<policy>-v<n>``, numbered per policy, with parent and metrics."""

from __future__ import annotations

import json
import math
import re
from typing import Any

from lightning_core.store.catalog import Catalog

_NUMBER = re.compile(r"-v(\d+)$")


def version_number(version: str) -> int:
    """Return N of a version id ``<policy>-vN``."""
    match = _NUMBER.search(version)
    if not match:
        raise ValueError(f"policy version {version!r} is not of the form <policy>-v<N>")
    return int(match.group(1))


def version_name(policy: str, number: int) -> str:
    """Return the version id of the ``number``-th version of ``policy`` (also the served adapter name)."""
    return f"{policy}-v{number}"


def next_version(catalog: Catalog, *, policy: str) -> str:
    """Return the id the next version of ``policy`` gets."""
    with catalog.read(spans=False) as con:
        names = [r[0] for r in con.execute("SELECT version FROM policy_versions WHERE policy = ?", [policy]).fetchall()]
    numbers = [int(m.group(1)) for m in (_NUMBER.search(n) for n in names) if m]
    return version_name(policy, max(numbers, default=0) + 1)


def latest_version(catalog: Catalog, *, policy: str) -> dict[str, Any] | None:
    """Return the newest recorded version of ``policy`` as a dict, or None."""
    return _newest(catalog, "policy = ?", [policy])


def version_of_epoch(catalog: Catalog, *, policy: str, run_id: str, epoch: int) -> dict[str, Any] | None:
    """Return the version of ``policy`` trained on (``run_id``, ``epoch``) as a dict, or None when there is none."""
    return _newest(catalog, "policy = ? AND run_id = ? AND epoch = ?", [policy, run_id, epoch])


def version_row(catalog: Catalog, version: str) -> dict[str, Any]:
    """Return the recorded row of ``version``; a ``ValueError`` naming it when the catalog has none."""
    row = _newest(catalog, "version = ?", [version])
    if row is None:
        raise ValueError(f"policy version {version} is served but not recorded in the catalog {catalog.state_root}")
    return row


def lineage(catalog: Catalog, version: str) -> list[dict[str, Any]]:
    """The rows of ``version`` and of its ancestors, newest first (``version``'s parent, its parent, ...)."""
    rows, seen = [], set()
    while version is not None and version not in seen:
        seen.add(version)
        rows.append(version_row(catalog, version))
        version = rows[-1].get("parent_version")
    return rows


def warm_start(catalog: Catalog, *, version: str | None, run_id: str) -> dict[str, Any] | None:
    """The version a policy's GRPO started from: the newest in ``version``'s lineage (itself included) trained by an
    SFT epoch, or by another run than ``run_id`` (the run continued it); None when there is none."""
    if version is None:
        return None
    for row in lineage(catalog, version):
        if (row.get("metrics") or {}).get("mode") == "sft" or row.get("run_id") != run_id:
            return row
    return None


def _newest(catalog: Catalog, where: str, params: list[Any]) -> dict[str, Any] | None:
    """The highest-numbered version row that matches ``where``, its metrics parsed; None when none does."""
    with catalog.read(spans=False) as con:
        rows = con.execute(f"SELECT * FROM policy_versions WHERE {where}", params).fetchdf().to_dict("records")
    rows = [r for r in rows if _NUMBER.search(r["version"])]
    if not rows:
        return None
    row = max(rows, key=lambda r: version_number(r["version"]))
    row["metrics"] = json.loads(row["metrics"]) if isinstance(row.get("metrics"), str) else row.get("metrics")
    return row


def version_at_path(catalog: Catalog, path: str) -> str | None:
    """Return the version whose checkpoint lives at ``path``, or None."""
    with catalog.read(spans=False) as con:
        row = con.execute("SELECT version FROM policy_versions WHERE path = ?", [str(path)]).fetchone()
    return row[0] if row else None


def record_version(
    catalog: Catalog,
    *,
    version: str,
    policy: str,
    parent_version: str | None,
    run_id: str,
    epoch: int,
    path: str,
    metrics: dict[str, Any],
    kind: str,
    base_model: str,
    mlflow_run_id: str | None,
    registry_version: str | None,
) -> None:
    """Insert one version row (versions are immutable: a second insert of the same id fails)."""
    clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in metrics.items()}
    with catalog.write() as con:
        con.execute(
            "INSERT INTO policy_versions (version, policy, parent_version, run_id, epoch, path, metrics, kind, "
            "base_model, mlflow_run_id, registry_version) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            [version, policy, parent_version, run_id, epoch, path, json.dumps(clean), kind, base_model,
             mlflow_run_id, registry_version],
        )
