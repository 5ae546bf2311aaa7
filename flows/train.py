"""Prefect flows: ``train-epoch`` (one epoch), ``train`` (N epochs), ``evaluate`` (held-out tasks).

Each reads like the stage table of ARCHITECTURE.md: plan -> rollouts (fan-out) -> ingest ->
triplets -> train -> redeploy. An epoch's status in the catalog records the last stage it
finished, so re-running a flow after a crash resumes the epoch at the stage that was cut off.
"""

from __future__ import annotations

import contextlib
import fcntl
from pathlib import Path
from typing import Any, Iterator

from prefect import flow, get_run_logger, unmapped
from prefect.artifacts import create_progress_artifact, create_table_artifact, update_progress_artifact
from prefect.futures import as_completed
from prefect.task_runners import ThreadPoolTaskRunner

from lightning_core import epoch as ep
from lightning_core import stages
from lightning_core.catalog import Catalog
from lightning_core.config import ArclightConfig, load_config
from lightning_core.stack import Stack, open_stack
from tasks import epoch as t


def load(config_path: str | None, overrides: list[str] | None) -> ArclightConfig:
    """Load the project config a flow run was given."""
    return load_config(config_path, overrides=list(overrides or []))


@contextlib.contextmanager
def project_lock(config: ArclightConfig) -> Iterator[None]:
    """Hold the project's training lock: two epochs of one project never overlap."""
    path = config.project_dir / ".arclight" / "train.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RuntimeError(f"another epoch of project {config.name!r} is running (lock {path}); wait for it to finish") from None
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def run_rollouts(config: ArclightConfig, stack: Stack, *, run_id: str, epoch: int, mode: str) -> dict[str, int]:
    """Fan the epoch's pending rollouts out over the task runner, with a progress artifact."""
    logger = get_run_logger()
    pending = t.plan(config, run_id=run_id, epoch=epoch, mode=mode)
    total = sum(ep.rollout_counts(Catalog.from_config(config), run_id=run_id, epoch=epoch, mode=mode).values())
    done = total - len(pending)
    logger.info("epoch %s: %d rollouts planned, %d to run", epoch, total, len(pending))
    if pending:
        settings = stages.runner_settings(config, stack, mode=mode)
        attempts = stages.first_attempts(config, run_id=run_id, epoch=epoch)
        progress = create_progress_artifact(100.0 * done / total, key=t.artifact_key(run_id, mode, epoch, "progress"),
                                            description=f"{mode} rollouts of epoch {epoch}")
        futures = t.rollout.map(
            pending, config=unmapped(config), stack=unmapped(stack), settings=unmapped(settings),
            first_attempt=[attempts.get(s.rollout_id, 0) for s in pending],
        )
        for future in as_completed(futures):
            outcome = future.result()
            done += 1
            update_progress_artifact(progress, 100.0 * done / total)
            if outcome.status != "succeeded":
                logger.warning("rollout %s %s: %s", outcome.rollout_id, outcome.status, (outcome.error or "")[:300])
    return ep.rollout_counts(Catalog.from_config(config), run_id=run_id, epoch=epoch, mode=mode)


def run_epoch(config: ArclightConfig, stack: Stack, *, epoch: int | None = None) -> dict[str, Any]:
    """Run (or resume) one epoch on a running stack and return its summary row."""
    logger = get_run_logger()
    catalog = Catalog.from_config(config)
    run_id = config.run_name
    epoch = ep.next_epoch(catalog, run_id=run_id) if epoch is None else epoch
    status = ep.epoch_status(catalog, run_id=run_id, epoch=epoch)
    if ep.reached(status, "completed"):
        logger.info("epoch %s of run %s is already complete", epoch, run_id)
        return _row(config, epoch)
    if status is not None:
        logger.info("resuming epoch %s of run %s after stage %r", epoch, run_id, status)
    t.redeploy(config, stack)  # serve the newest version before sampling from it
    if not ep.reached(status, "rollouts_done"):
        serving = stages.serving_versions(config, stack)
        ep.set_epoch_status(catalog, run_id=run_id, epoch=epoch, status="planned", policy_version=",".join(serving.values()))
        counts = run_rollouts(config, stack, run_id=run_id, epoch=epoch, mode="train")
        ep.set_epoch_status(catalog, run_id=run_id, epoch=epoch, status="rollouts_done", stats={"rollouts": counts})
    if not ep.reached(status, "ingested"):
        counts = t.ingest(config, stack, run_id=run_id, epoch=epoch)
        logger.info("epoch %s rollouts: %s", epoch, counts)
        ep.set_epoch_status(catalog, run_id=run_id, epoch=epoch, status="ingested", stats={"rollouts": counts})
    if not ep.reached(status, "triplets_done"):
        report = t.triplets(config, run_id=run_id, epoch=epoch)
        ep.set_epoch_status(catalog, run_id=run_id, epoch=epoch, status="triplets_done", stats=report)
    if not ep.reached(status, "trained"):
        results = t.train(config, run_id=run_id, epoch=epoch)
        for r in results:
            logger.info(r["message"])
        new = ",".join(r["version"] for r in results if r["version"]) or None
        ep.set_epoch_status(catalog, run_id=run_id, epoch=epoch, status="trained", new_version=new)
    deployed = t.redeploy(config, stack)
    for d in deployed:
        logger.info("policy %s now serves %s (first answer after %.2f s)", d["policy"], d["version"], d["first_answer_s"])
    ep.set_epoch_status(catalog, run_id=run_id, epoch=epoch, status="completed")
    t.publish_epoch_report(config, run_id=run_id, epoch=epoch)
    return _row(config, epoch)


def _row(config: ArclightConfig, epoch: int) -> dict[str, Any]:
    return next((r for r in stages.summary_rows(config) if r["epoch"] == epoch), {"epoch": epoch})


def _prepare(config: ArclightConfig) -> None:
    """Create the catalog, the run row and the MLflow store before any stage can be interrupted."""
    from lightning_core import tracking

    catalog = Catalog.from_config(config)
    catalog.ensure()
    ep.ensure_run(catalog, config)
    tracking.experiment_id(config)  # a crash during MLflow's first schema migration would leave it broken


@flow(name="train-epoch", task_runner=ThreadPoolTaskRunner(max_workers=16), log_prints=True)
def train_epoch(config_path: str | None = None, overrides: list[str] | None = None, epoch: int | None = None) -> dict[str, Any]:
    """Run the next epoch of a project (or ``epoch``), resuming it if an earlier run was cut off."""
    config = load(config_path, overrides)
    _prepare(config)
    with project_lock(config), open_stack(config) as stack:
        return run_epoch(config, stack, epoch=epoch)


@flow(name="train", task_runner=ThreadPoolTaskRunner(max_workers=16), log_prints=True)
def train(config_path: str | None = None, overrides: list[str] | None = None, epochs: int | None = None) -> list[dict[str, Any]]:
    """Run epochs until the run has ``epochs`` (default ``config.epochs``) completed ones."""
    config = load(config_path, overrides)
    _prepare(config)
    target = epochs or config.epochs
    rows = []
    with project_lock(config), open_stack(config) as stack:
        while (next_epoch := ep.next_epoch(Catalog.from_config(config), run_id=config.run_name)) < target:
            rows.append(run_epoch(config, stack, epoch=next_epoch))
    return stages.summary_rows(config)


@flow(name="evaluate", task_runner=ThreadPoolTaskRunner(max_workers=16), log_prints=True)
def evaluate(config_path: str | None = None, overrides: list[str] | None = None, label: str | None = None) -> dict[str, Any]:
    """Run the held-out tasks greedily against the policy serving now; return reward and success rate.

    Evaluation rollouts go to their own run, ``<run>.eval``, one epoch per evaluated version.
    """
    config = load(config_path, overrides)
    _prepare(config)
    catalog = Catalog.from_config(config)
    eval_run = stages.eval_run_id(config)
    with open_stack(config) as stack:
        t.redeploy(config, stack)
        serving = stages.serving_versions(config, stack)
        label = label or ",".join(serving.values())
        eval_epoch = stages.eval_epoch(catalog, run_id=eval_run, label=label)
        counts = run_rollouts(config, stack, run_id=eval_run, epoch=eval_epoch, mode="eval")
        t.ingest(config, stack, run_id=eval_run, epoch=eval_epoch, mode="eval")
        ep.set_epoch_status(catalog, run_id=eval_run, epoch=eval_epoch, status="completed")
    result = stages.eval_result(config, epoch=eval_epoch, label=label)
    create_table_artifact([result], key=t.artifact_key(config.run_name, "eval", eval_epoch), description=f"Held-out evaluation of {label}")
    get_run_logger().info("evaluation of %s: %s (rollouts %s)", label, result, counts)
    return result


DEPLOYABLE = {"train-epoch": train_epoch, "train": train, "evaluate": evaluate}
