"""Prefect flows: ``train-epoch`` (one epoch), ``train`` (N epochs), ``evaluate`` (held-out tasks).

Each reads like the stage table of ARCHITECTURE.md: plan -> rollouts (fan-out) -> ingest ->
triplets -> train -> redeploy. An epoch's status in the catalog records the last stage it
finished, so re-running a flow after a crash resumes the epoch at the stage that was cut off.
A flow builds the run's context once (config, catalog, running services: ``RunContext``) and
hands it to every stage and task.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import json
import threading
from pathlib import Path
from typing import Any, Iterator

from prefect import flow, get_run_logger, unmapped
from prefect.artifacts import create_progress_artifact, create_table_artifact, update_progress_artifact
from prefect.futures import wait
from prefect.task_runners import ThreadPoolTaskRunner

from flows.runners import no_engine_retries, rollout_task_runner
from lightning_core import tracking
from lightning_core.common import hardware, logs, stopping
from lightning_core.common.redact import given_back
from lightning_core.config import ArclightConfig, load_config
from lightning_core.epoch import bookkeeping as ep
from lightning_core.epoch import deploy, draw, failures, reports, sampling, sentences, stages, validation
from lightning_core.epoch.context import RunContext
from lightning_core.epoch.stack import open_stack
from lightning_core.epoch.supervise import Supervisor
from lightning_core.rollouts.runner import RunnerSettings
from tasks import epoch as t


# Threads of a flow's task runner. Rollouts at once are bounded by rollouts.concurrency (a slot per
# rollout, tasks/epoch.py), not by this: a cap of 16 here silently held concurrency 64 at 16.
TASK_THREADS = 512
# Rollouts per Prefect task: whole groups, packed up to this many (eval groups have one rollout each).
ROLLOUT_BATCH = 8


def load(config_path: str | None, overrides: list[str] | None) -> ArclightConfig:
    """Load the project config a flow run was given, with the secrets the command kept out of its parameters; a run
    no command set up (a worker's) logs to the project's file."""
    config = load_config(config_path, overrides=given_back(overrides))
    logs.to_project_log(config.project_dir)
    return config


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


@contextlib.contextmanager
def running(config: ArclightConfig, *, lock: bool = True) -> Iterator[RunContext]:
    """The run's context over its services, started (or attached) for the block and watched by a supervisor that
    restarts the ones that die; with ``lock``, the project's training lock held too."""
    # asynchronous epochs on a CPU: the trainer runs beside vLLM on the same cores, and neither spins while it waits
    passive = config.trainer.max_staleness and not hardware.has_gpu()
    with (hardware.passive_openmp() if passive else contextlib.nullcontext()), \
            (project_lock(config) if lock else contextlib.nullcontext()), open_stack(config) as stack:
        ctx = RunContext.of(config, stack)
        with Supervisor(ctx), stopping.run_scope():  # the rollouts in flight end before the services stop
            yield ctx


def run_round(ctx: RunContext, *, run_id: str, epoch: int, mode: str, eval_tasks: int | None = None,
              settings: RunnerSettings | None = None, sampling_round: int | None = None) -> dict[str, int]:
    """One sampling round: run the planned rollouts, wait for their spans (the ingest barrier), run again the ones
    our services failed once they are back (``rollouts.infra_retries`` times), then stop the run if too many failed.

    A rollout our services failed and that failed again every time is left out, and its group does not train
    (``sql/triplets.sql``): a group scored on the members the infrastructure happened to leave is biased.
    """
    logger = get_run_logger()
    config, stack = ctx.config, ctx.services
    retries = config.rollouts.infra_retries
    for attempt in range(retries + 1):
        run_rollouts(ctx, run_id=run_id, epoch=epoch, mode=mode, eval_tasks=eval_tasks, settings=settings)
        t.ingest(ctx, run_id=run_id, epoch=epoch, mode=mode)
        failures.settle_blame(ctx, run_id=run_id, epoch=epoch, mode=mode, sampling_round=sampling_round)
        if attempt == retries:
            break
        failed = failures.retry_infrastructure_failures(ctx, run_id=run_id, epoch=epoch, mode=mode,
                                                        sampling_round=sampling_round)
        if not failed:
            break
        outages = "; ".join(o.describe() for o in stack.outages[-3:]) or "no outage was seen: their calls failed upstream"
        logger.warning("epoch %s: %d rollouts failed because of our services (%s), not the agent: running them again "
                       "(retry %d of %d)", epoch, len(failed), outages, attempt + 1, retries)
        failures.wait_for_services(stack, timeout_s=config.serving.startup_timeout_s)
    logs = [str(s.log_path) for s in stack.services() if s.log_path]
    result = failures.check_round(ctx, run_id=run_id, epoch=epoch, mode=mode, sampling_round=sampling_round, logs=logs)
    if result["by_kind"].get("infrastructure"):
        logger.warning("epoch %s: %d rollouts left out after %d retries: our services failed them every time; their "
                       "groups do not train", epoch, result["by_kind"]["infrastructure"], retries)
    return ep.rollout_counts(ctx.catalog, run_id=run_id, epoch=epoch, mode=mode)


def run_rollouts(ctx: RunContext, *, run_id: str, epoch: int, mode: str, eval_tasks: int | None = None,
                 settings: RunnerSettings | None = None) -> dict[str, int]:
    """Fan the epoch's pending rollouts out over the task runner, with a progress artifact.

    ``settings`` (default: the mode's, with the serving prompt versions) say what every rollout
    runs with; the prompt versions are recorded on the rollouts' rows before they start. An attempt
    that ran while a service was down is recorded as an infrastructure failure (``blame_outages``).
    """
    logger = get_run_logger()
    config, catalog = ctx.config, ctx.catalog
    pending = t.plan(ctx, run_id=run_id, epoch=epoch, mode=mode, eval_tasks=eval_tasks)
    total = sum(ep.rollout_counts(catalog, run_id=run_id, epoch=epoch, mode=mode).values())
    done = total - len(pending)
    logger.info("epoch %s: %d rollouts planned, %d to run", epoch, total, len(pending))
    if pending:
        settings = settings or stages.runner_settings(ctx, mode=mode)
        ep.record_prompt_versions(catalog, run_id=run_id, epoch=epoch, mode=mode, versions=settings.prompt_versions)
        attempts = stages.first_attempts(ctx, run_id=run_id, epoch=epoch)
        progress = create_progress_artifact(100.0 * done / total, key=t.artifact_key(run_id, mode, epoch, "progress"),
                                            description=f"{mode} rollouts of epoch {epoch}")
        batches = stages.rollout_batches(pending, size=max(config.rollouts.group_size, ROLLOUT_BATCH))
        parameters = {"specs": batches, "settings": unmapped(settings), "first_attempts": unmapped(attempts),
                      "concurrency": unmapped(config.rollouts.concurrency)}
        unsuccessful: dict[tuple[str, str], int] = {}  # (status, error type): rollouts
        with rollout_task_runner(config) as cluster, no_engine_retries(cluster):  # None: the flow's own threads
            futures = cluster.map(t.rollouts, parameters) if cluster else t.rollouts.map(**parameters)
            batch_of = {id(future): batch for future, batch in zip(futures, batches)}
            for future in _completed(futures, ctx.services):
                try:
                    outcomes = future.result()
                except Exception as exc:  # noqa: BLE001 - only a batch whose worker was lost is kept going
                    if cluster is None or not failures.worker_lost(exc):
                        raise
                    outcomes = failures.lost_with_their_worker(batch_of[id(future)], first_attempts=attempts, error=exc)
                    logger.warning("epoch %s: %d rollouts lost with their worker (%s): they run again as our failure",
                                   epoch, len(outcomes), outcomes[0].error)
                outcomes = failures.blame_outages(outcomes, ctx.services)
                stages.record_rollouts(ctx, outcomes)
                done += len(outcomes)
                update_progress_artifact(progress, 100.0 * done / total)
                for outcome in outcomes:
                    if outcome.status != "succeeded":
                        _warn_once(logger, outcome, unsuccessful)
        for (status, cause), count in unsuccessful.items():
            if count > 1:
                logger.warning("epoch %s: %d more %s rollouts %s", epoch, count - 1, mode,
                               "timed out" if status == "timed_out" else f"{status} with {cause}")
    return ep.rollout_counts(catalog, run_id=run_id, epoch=epoch, mode=mode)


def _warn_once(logger, outcome, seen: dict[tuple[str, str], int]) -> None:
    """Warn of an unsuccessful rollout the first time its cause (status and error type: the error's last line up to
    its first colon) shows in the round, and count the repeats: an agent that fails every rollout the same way gets
    one line, not one per rollout."""
    lines = (outcome.error or "").strip().splitlines()
    key = (outcome.status, lines[-1].split(":")[0][:80] if lines else "an error")
    if key not in seen:
        logger.warning("rollout %s %s: %s", outcome.rollout_id, outcome.status, (outcome.error or "")[:300])
    seen[key] = seen.get(key, 0) + 1


def _completed(futures: list, stack) -> Iterator:
    """The futures as they complete; a server the supervisor could not restart stops the wait at once (every later
    rollout would fail, and those in flight may hang on it until they time out). The rollouts left unrecorded stay
    planned and run on resume."""
    pending = list(futures)
    while pending:
        stack.raise_failure()
        done, not_done = wait(pending, timeout=1.0)
        yield from done
        pending = list(not_done)


def sample_until_informative(ctx: RunContext, *, epoch: int, report: dict[str, Any]) -> dict[str, Any]:
    """Dynamic sampling: draw, run and count further tasks until the epoch has enough informative groups."""
    config, catalog, run_id = ctx.config, ctx.catalog, ctx.run_id
    target, cap = config.rollouts.informative_groups, sampling.task_cap(config)
    while True:
        if not ep.pending_rollouts(catalog, run_id=run_id, epoch=epoch):  # a resumed round runs its rest first
            drawn = len({s.task_id for s in ep.planned_rollouts(catalog, run_id=run_id, epoch=epoch)})
            extra = sampling.tasks_to_add(informative=report["informative_groups"], drawn=drawn, target=target, cap=cap)
            if extra == 0:
                return report
            if not t.plan_more(ctx, run_id=run_id, epoch=epoch, count=extra):
                get_run_logger().warning("epoch %s: the dataset has no undrawn task left; training on %d informative "
                                         "groups of the %d wanted", epoch, report["informative_groups"], target)
                return report
            get_run_logger().info("epoch %s: %d of %d groups informative, want %d: drawing %d more tasks",
                                  epoch, report["informative_groups"], drawn, target, extra)
        run_round(ctx, run_id=run_id, epoch=epoch, mode="train",
                  sampling_round=ep.sampling_round(catalog, run_id=run_id, epoch=epoch))
        report = t.triplets(ctx, run_id=run_id, epoch=epoch)


def sample_epoch(ctx: RunContext, *, epoch: int) -> None:
    """The epoch's rollouts, ingest and triplets (with dynamic sampling), on the versions serving now; an epoch an
    earlier run cut off resumes at the stage it reached."""
    logger = get_run_logger()
    catalog, run_id = ctx.catalog, ctx.run_id
    status = ep.epoch_status(catalog, run_id=run_id, epoch=epoch)
    if not ep.reached(status, "rollouts_done"):
        serving = deploy.serving_versions(ctx)
        ep.set_epoch_status(catalog, run_id=run_id, epoch=epoch, status="planned", policy_version=",".join(serving.values()))
        counts = run_round(ctx, run_id=run_id, epoch=epoch, mode="train", sampling_round=0)
        ep.set_epoch_status(catalog, run_id=run_id, epoch=epoch, status="rollouts_done", stats={"rollouts": counts})
    if not ep.reached(status, "ingested"):
        counts = t.ingest(ctx, run_id=run_id, epoch=epoch)
        logger.info("epoch %s rollouts: %s", epoch, sentences.rollout_counts(counts))
        ep.set_epoch_status(catalog, run_id=run_id, epoch=epoch, status="ingested", stats={"rollouts": counts})
    if not ep.reached(status, "triplets_done"):
        report = t.triplets(ctx, run_id=run_id, epoch=epoch)
        report = sample_until_informative(ctx, epoch=epoch, report=report)
        counts = ep.record_sampling(catalog, run_id=run_id, epoch=epoch, informative_groups=report["informative_groups"])
        logger.info("epoch %s sampling: %s", epoch, sentences.sampling(counts))
        ep.set_epoch_status(catalog, run_id=run_id, epoch=epoch, status="triplets_done", stats=report)


def train_beside_next_rollouts(ctx: RunContext, *, epoch: int) -> list[dict[str, Any]]:
    """Asynchronous epochs (``trainer.max_staleness`` >= 1): train ``epoch`` in a task run of its own while the next
    epoch's rollouts, ingest and triplets run on the version serving now; return the training's results.

    The next epoch then trains one version after the one that sampled it (the bound is checked when it trains). A
    failure of the next epoch's sampling waits for this training to finish (its version is kept), then stops the run;
    Ctrl-C stops both at once.
    """
    abandon = threading.Event()
    training = t.train.submit(ctx, run_id=ctx.run_id, epoch=epoch, abandon=abandon)
    sampling_error: Exception | None = None
    try:
        sample_epoch(ctx, epoch=epoch + 1)
    except Exception as exc:  # noqa: BLE001 - raised again once the training beside it is in
        sampling_error = exc
    except BaseException:
        abandon.set()  # Ctrl-C: the training thread stops before its next micro-batch
        raise
    try:
        results = training.result()
    except BaseException:
        abandon.set()
        raise
    if sampling_error is not None:
        _record_trained(ctx, epoch=epoch, results=results)
        raise sampling_error
    return results


def run_epoch(ctx: RunContext, *, epoch: int | None = None, overlap: bool = True) -> dict[str, Any]:
    """Run (or resume) one epoch on the run's services and return its summary row.

    With ``trainer.max_staleness`` >= 1 and ``overlap``, the next epoch's rollouts run while this one trains
    (``train_beside_next_rollouts``); the next call of this function then starts at that epoch's training.
    """
    logger = get_run_logger()
    catalog, run_id = ctx.catalog, ctx.run_id
    epoch = ep.next_epoch(catalog, run_id=run_id) if epoch is None else epoch
    status = ep.epoch_status(catalog, run_id=run_id, epoch=epoch)
    if ep.reached(status, "completed"):
        logger.info("epoch %s of run %s is already complete", epoch, run_id)
        return _row(ctx, epoch)
    if status is not None:
        logger.info("resuming epoch %s of run %s after stage %r", epoch, run_id, status)
    t.redeploy(ctx)  # serve the newest version before sampling from it
    sample_epoch(ctx, epoch=epoch)
    # the epoch's rollouts as MLflow traces, beside its training (a failure there is a warning in the summary)
    publishing = t.publish_traces.submit(ctx, run_id=run_id, epoch=epoch) if ctx.config.tracking.traces != "off" else None
    if not ep.reached(ep.epoch_status(catalog, run_id=run_id, epoch=epoch), "trained"):
        ep.set_epoch_status(catalog, run_id=run_id, epoch=epoch, status="triplets_done",
                            train_started_at=dt.datetime.now(dt.timezone.utc))
        if ctx.config.trainer.max_staleness and overlap:
            results = train_beside_next_rollouts(ctx, epoch=epoch)
        else:
            results = t.train(ctx, run_id=run_id, epoch=epoch)
        _record_trained(ctx, epoch=epoch, results=results)
    deployed = t.redeploy(ctx)
    for d in deployed:
        logger.info("policy %s now serves %s (first answer after %.2f s)", d["policy"], d["version"], d["first_answer_s"])
    if publishing is not None:  # its own task: a failure is in its result and a warning, never the epoch's
        publishing.wait()
        if publishing.state.is_completed():
            t.log_traces(publishing.result())
        else:
            logger.warning("epoch %s: publishing its traces failed (%s): arclight traces --epoch %s publishes them",
                           epoch, publishing.state.message, epoch)
    incidents = failures.record_incidents(ctx, run_id=run_id, epoch=epoch)
    if incidents:
        logger.warning("epoch %s: %s", epoch, failures.describe_incidents(incidents))
    ep.set_epoch_status(catalog, run_id=run_id, epoch=epoch, status="completed")
    t.publish_epoch_report(ctx, run_id=run_id, epoch=epoch)
    return _row(ctx, epoch)


def _record_trained(ctx: RunContext, *, epoch: int, results: list[dict[str, Any]]) -> None:
    """The epoch's training is done: its new versions, when it ended, the staleness it trained on and the lowest
    entropy of its policies."""
    for r in results:
        get_run_logger().info(r["message"])
    new = ",".join(r["version"] for r in results if r["version"]) or None
    stale = [r["staleness/max"] for r in results if r.get("staleness/max") is not None]
    entropy = [r["entropy"] for r in results if r.get("entropy") is not None and r["entropy"] == r["entropy"]]  # not NaN
    ep.set_epoch_status(ctx.catalog, run_id=ctx.run_id, epoch=epoch, status="trained", new_version=new,
                        train_finished_at=dt.datetime.now(dt.timezone.utc), entropy=min(entropy, default=None),
                        staleness_max=int(max(stale)) if stale else None, **reports.epoch_start_columns(results))


def _row(ctx: RunContext, epoch: int) -> dict[str, Any]:
    return next((r for r in reports.summary_rows(ctx) if r["epoch"] == epoch), {"epoch": epoch})


def _prepare(config: ArclightConfig) -> None:
    """Create the catalog, the run row and the MLflow store before any stage can be interrupted."""
    ctx = RunContext.of(config)
    ctx.catalog.ensure()
    ep.ensure_run(ctx.catalog, config)
    tracking.experiment_id(config)  # a crash during MLflow's first schema migration would leave it broken


@flow(name="train-epoch", task_runner=ThreadPoolTaskRunner(max_workers=TASK_THREADS), log_prints=True)
def train_epoch(config_path: str | None = None, overrides: list[str] | None = None, epoch: int | None = None) -> dict[str, Any]:
    """Run the next epoch of a project (or ``epoch``), resuming it if an earlier run was cut off."""
    config = load(config_path, overrides)
    _prepare(config)
    with running(config) as ctx:
        return run_epoch(ctx, epoch=epoch)


@flow(name="train", task_runner=ThreadPoolTaskRunner(max_workers=TASK_THREADS), log_prints=True)
def train(config_path: str | None = None, overrides: list[str] | None = None, epochs: int | None = None) -> list[dict[str, Any]]:
    """Run epochs until the run has ``epochs`` (default ``config.epochs``) completed ones.

    With ``evaluation.every_epochs`` = K, the serving policy is evaluated on the held-out tasks
    before the first epoch and after every K-th and the last, for the learning curve.
    """
    config = load(config_path, overrides)
    _prepare(config)
    target = epochs or config.epochs
    config = config.model_copy(update={"epochs": target})  # the run's length: learning-rate schedules span it
    every = config.evaluation.every_epochs
    with running(config) as ctx:
        if every and config.evaluation.at_start and ep.next_epoch(ctx.catalog, run_id=ctx.run_id) == 0:
            run_evaluation(ctx, tasks=config.evaluation.tasks)
        start = ep.next_epoch(ctx.catalog, run_id=ctx.run_id)
        if config.rollouts.validate_every and ep.epoch_status(ctx.catalog, run_id=ctx.run_id, epoch=start) is None:
            run_validation(ctx)  # the version this call starts from (an SFT warm start; one scored before is reused)
        while (next_epoch := ep.next_epoch(ctx.catalog, run_id=ctx.run_id)) < target:
            run_epoch(ctx, epoch=next_epoch, overlap=next_epoch + 1 < target)
            if every and ((next_epoch + 1) % every == 0 or next_epoch + 1 == target):
                run_evaluation(ctx, tasks=config.evaluation.tasks)
            if validation.due(config, completed=next_epoch + 1, target=target):
                run_validation(ctx)
        if config.rollouts.validate_every:
            serve_result(ctx)
        return reports.summary_rows(ctx)


def run_validation(ctx: RunContext) -> dict[str, Any]:
    """Score the versions serving now greedily on the validation split of the training tasks, in the run
    ``<run>.validation`` (``epoch/validation.py``); log it and the best so far to MLflow; return its result."""
    config = ctx.config
    run = validation.run_id(config)
    t.redeploy(ctx)
    settings = stages.runner_settings(ctx, mode="eval")
    serving = deploy.serving_versions(ctx)
    label = reports.eval_label(config, serving)
    identity = {**draw.dataset_identity(config), "versions": serving}
    epoch = reports.eval_epoch(ctx.catalog, run_id=run, label=label, dataset=identity)
    ep.plan_tasks(ctx.catalog, run_id=run, epoch=epoch, mode="eval", tasks=draw.validation_split(config), group_size=1)
    counts = run_round(ctx, run_id=run, epoch=epoch, mode="eval", settings=settings)
    result = reports.record_eval(ctx, epoch=epoch, label=label, run_id=run)
    rows = t.log_validation(ctx)
    chosen = validation.best(rows)
    get_run_logger().info("validation of %s after %s epochs: reward %.3f on %d training tasks held out (rollouts: %s); "
                          "best so far: %s", label, result["after_epochs"], result["reward_mean"] or 0.0,
                          result["tasks"], sentences.rollout_counts(counts), chosen["label"] if chosen else "-")
    return result


def serve_result(ctx: RunContext) -> None:
    """At the run's end, serve its result: the best validated versions (training continues from the newest)."""
    for d in t.redeploy(ctx, result=True):
        get_run_logger().info("the run's result, its best validated version, now serves: policy %s %s",
                              d["policy"], d["version"])


def run_evaluation(ctx: RunContext, *, label: str | None = None, tasks: int | None = None,
                   prompt_versions: list[str] | None = None, result: bool = False) -> dict[str, Any]:
    """Evaluate the serving policy greedily on the held-out tasks (an earlier identical one is reused).

    ``prompt_versions`` (ids such as ``system-v3``) replace the serving versions of those prompts. ``result``:
    evaluate the run's result (its best validated versions with ``rollouts.validate_every``), not the newest.
    """
    config = ctx.config
    eval_run = reports.eval_run_id(config)
    t.redeploy(ctx, result=result)
    settings = stages.runner_settings(ctx, mode="eval", prompt_versions=prompt_versions)
    label = label or reports.eval_label(config, deploy.serving_versions(ctx), tasks=tasks,
                                        prompt_versions=settings.prompt_versions)
    # the same versions on another held-out file (or on this file's new contents) are another evaluation
    eval_epoch = reports.eval_epoch(ctx.catalog, run_id=eval_run, label=label,
                                    dataset=reports.eval_dataset(config, tasks=tasks))
    run_round(ctx, run_id=eval_run, epoch=eval_epoch, mode="eval", eval_tasks=tasks, settings=settings)
    result = reports.record_eval(ctx, epoch=eval_epoch, label=label)
    if config.tracking.traces != "off":
        t.log_traces(t.publish_traces(ctx, run_id=eval_run, epoch=eval_epoch, mode="eval", label=label))
    create_table_artifact([result], key=t.artifact_key(config.run_name, "eval", eval_epoch),
                          description=f"Held-out evaluation of {label} on {Path(result['dataset']).name}")
    logger = get_run_logger()
    logger.info("%s", sentences.evaluation(result))
    # the machine-readable form, for the log file only
    logger.info("evaluation %s: %s", label, json.dumps(result, default=str), extra={"screen": False})
    t.log_eval_curve(ctx)
    return result


@flow(name="evaluate", task_runner=ThreadPoolTaskRunner(max_workers=TASK_THREADS), log_prints=True)
def evaluate(config_path: str | None = None, overrides: list[str] | None = None, label: str | None = None,
             prompt_versions: list[str] | None = None) -> dict[str, Any]:
    """Run the held-out tasks greedily against the policy serving now; return reward and success rate.

    Evaluation rollouts go to their own run, ``<run>.eval``, one epoch per evaluated version.
    ``prompt_versions`` (ids such as ``system-v3``) score those prompt versions instead of the serving ones.
    """
    config = load(config_path, overrides)
    reports.eval_dataset(config)  # a missing held-out file is said before the services start (tens of seconds)
    _prepare(config)
    with running(config, lock=False) as ctx:
        return run_evaluation(ctx, label=label, prompt_versions=prompt_versions, result=True)


DEPLOYABLE = {"train-epoch": train_epoch, "train": train, "evaluate": evaluate}
