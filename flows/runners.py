"""Which Prefect task runner runs the rollout tasks: the flow's own threads, a Dask cluster or a Ray cluster.

Only rollouts leave the flow's process; planning, ingest, triplets, training and redeploy stay
with the catalog. A Dask worker must run with ``distributed.worker.daemon: False``
(``DASK_DISTRIBUTED__WORKER__DAEMON=False``): rollouts run in child processes so that a hung agent
can be killed at its timeout, and a daemonic process may not start children.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Iterator

from prefect.task_runners import TaskRunner

from lightning_core.config import ArclightConfig


@contextlib.contextmanager
def rollout_task_runner(config: ArclightConfig) -> Iterator[TaskRunner | None]:
    """Yield a started runner for ``rollouts.executor`` (dask, ray), or None for local (the flow's runner)."""
    executor, address = config.rollouts.executor, config.rollouts.address
    if executor == "local":
        yield None
        return
    if executor == "dask":
        try:
            from prefect_dask import DaskTaskRunner
        except ImportError as exc:
            raise RuntimeError(f"rollouts.executor=dask needs prefect-dask ({exc}); pip install -e . installs it") from exc
        runner: TaskRunner = DaskTaskRunner(address=address)
    elif executor == "ray":
        try:
            from prefect_ray import RayTaskRunner
        except ImportError as exc:
            raise RuntimeError(f"rollouts.executor=ray needs prefect-ray ({exc}): pip install -e '.[ray]'") from exc
        # the workers' own output (their agents' exporters retrying, a task's traceback) stays in Ray's logs on their
        # nodes: streamed to the driver it scrolled through the command's display. A failed task's error still
        # reaches the flow, and the task runs' logs the Prefect server
        runner = RayTaskRunner(address=address, init_kwargs={"log_to_driver": False, "logging_level": logging.WARNING})
    else:
        raise ValueError(f"rollouts.executor must be 'local', 'dask' or 'ray', found {executor!r}")
    with runner:
        yield runner


@contextlib.contextmanager
def no_engine_retries(runner: TaskRunner | None) -> Iterator[None]:
    """Keep the engine from running a rollout batch again when it loses the worker or node that ran it (or that held
    its result): it would run under the same attempt numbers, and its spans would mix with the lost run's in the lake.
    The flow records such a batch as our failure and runs it again with new attempt numbers
    (``failures.lost_with_their_worker``). Ray is told so per task (``max_retries=0``). Dask cannot be (its
    ``allowed-failures`` is the scheduler's, for every task), so each batch marks itself started on the scheduler and a
    second start fails at once (``failures.refuse_a_second_run``); the marks go once the round's futures are released."""
    kind = type(runner).__name__ if runner is not None else None
    if kind == "RayTaskRunner":
        from prefect_ray.context import remote_options

        with remote_options(max_retries=0):
            yield
    elif kind == "DaskTaskRunner":
        try:
            yield
        finally:
            _forget_started_batches(runner.client)
    else:
        yield


def _forget_started_batches(client) -> None:
    """Release the round's batches (so that no lost result is computed again) then forget that they started."""
    from distributed import Event, Future

    from lightning_core.epoch.failures import claim_name

    keys = list(client.futures)
    try:
        if keys:
            client.cancel([Future(key, client) for key in keys])
        for key in keys:
            Event(claim_name(key), client=client).clear()
    except Exception as exc:  # noqa: BLE001 - a lost scheduler: what the round raised, if anything, matters more
        logging.getLogger("arclight.flows").warning(
            "could not forget the %d rollout batches of the round on the Dask scheduler (%r): their marks stay there, a "
            "few bytes each", len(keys), exc)
