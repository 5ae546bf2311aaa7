"""The Prefect API a command's flows report to: the user's (``PREFECT_API_URL``), else one started for the command.

Without an API URL, Prefect starts a temporary server of its own as a plain child process, in the
command's process group: a terminal's Ctrl-C reached it first, so the interrupted flow could not
record its crash, and the command hung retrying it. ``prefect_api`` starts Prefect's server in a
session of its own instead (``services.start_prefect_api``), points this process at it, and stops
it after the flows' logs and events are delivered, or at once on a second Ctrl-C.

Either way, the block ends by stopping Prefect's background event loop (``_finish``). The services
it runs (log and event delivery) keep, in their shutdown calls, a copy of the flow run's context,
and through it the run's cached task results: a failed task's exception, whose traceback frames
hold what the stage had open, such as DuckDB connections and relations. The loop is a daemon
thread that nothing stops, so all of it lived until the interpreter's last moments, after
DuckDB's module was gone, and nanobind printed a "leaked instance" line for each object.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Iterator

from lightning_core.common.services import start_prefect_api

DRAIN_S = 5.0


@contextlib.contextmanager
def prefect_api(log_dir: Path) -> Iterator[str]:
    """Run the block with Prefect's API at the user's ``PREFECT_API_URL``, or at a server started here (logging to
    ``log_dir/prefect.log``); yield the API URL."""
    configured = os.environ.get("PREFECT_API_URL")
    if configured:
        try:
            yield configured
        finally:
            _finish()
        return
    server = start_prefect_api(log_dir=log_dir)
    url = f"{server.url}/api"
    os.environ["PREFECT_API_URL"] = url  # for a Prefect imported after this (the flows are imported lazily)
    try:
        from prefect.settings import PREFECT_API_URL, temporary_settings

        with temporary_settings(updates={PREFECT_API_URL: url}):  # for a Prefect imported before
            try:
                yield url
            finally:
                _finish()
    finally:
        os.environ.pop("PREFECT_API_URL", None)
        server.stop()


def _finish() -> None:
    """Deliver the logs and events the flows left queued, while the server still runs (as Prefect's test harness),
    then stop Prefect's background loop, which lets go of the flow runs' contexts (see above). The next flow in this
    process starts a new loop."""
    from prefect._internal.concurrency.threads import wait_for_global_loop_exit
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker

    for worker in (APILogWorker, EventsWorker):
        with contextlib.suppress(Exception):
            worker.drain_all(timeout=DRAIN_S)
    with contextlib.suppress(Exception):
        wait_for_global_loop_exit(timeout=DRAIN_S)
