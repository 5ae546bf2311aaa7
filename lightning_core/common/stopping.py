"""Stopping: the first Ctrl-C (or SIGTERM) stops everything this process started, within seconds.

``on_signals()`` wraps a command's work. The first SIGINT or SIGTERM sets ``STOP`` (rollouts in
flight see it within a quarter second, kill their agent's process group and report
``interrupted``: they stay planned, and the next run does them again), kills the agent
processes at once, and raises ``KeyboardInterrupt`` in the main thread, so that every ``finally``
stops the servers its block started. Whatever else the block raises once a stop was asked for (a
training thread that stopped at its next micro-batch may get there first) comes out as
``KeyboardInterrupt`` too. A second signal while that cleanup runs kills what is left (every
server and agent process group this process started) and exits at once with 130.

Servers register here when they start (``services.start_process``) and leave when they stop;
rollout processes register for as long as they run (``runner.run_attempt``). Each runs in its
own process group, so a terminal's Ctrl-C reaches only this process, which stops them in order.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import os
import signal
import threading
from typing import Iterator

log = logging.getLogger("arclight.stopping")

STOP = threading.Event()  # set by the first signal: rollouts end, stages return, the command unwinds
# the current run's "it has ended" event (``run_scope``): a context variable, so the threads a flow's task runner
# starts for its rollouts see their own run's, and a later run (or a rollout run outside any run) is not affected
_RUN_ENDED: contextvars.ContextVar[threading.Event | None] = contextvars.ContextVar("arclight_run_ended", default=None)
_groups: dict[int, str] = {}  # process group -> what it is ("rollout", "vllm0", ...)
_rollouts: dict[int, threading.Event | None] = {}  # a rollout's process group -> the run it belongs to
_lock = threading.Lock()


def stopping() -> bool:
    """True once a stop was asked for (the first Ctrl-C or SIGTERM inside ``on_signals``)."""
    return STOP.is_set()


def rollouts_end() -> bool:
    """True once the rollouts in flight here are to end now: a stop was asked for, or their run ended (``run_scope``)."""
    ended = _RUN_ENDED.get()
    return STOP.is_set() or (ended is not None and ended.is_set())


@contextlib.contextmanager
def run_scope() -> Iterator[None]:
    """A run's block (a flow's services and stages): when it leaves by an exception -- a run that stopped, a deployment
    run cancelled from the Prefect server (Prefect's own SIGTERM handling raises it) -- the rollouts it still runs end
    with it: their agents are killed, and their rollouts, interrupted, stay planned and run on resume. Left running,
    they outlived the run and their exporters retried against the collector it had stopped. Threads that run the
    block's rollouts must start in its context (``contextvars.copy_context``: Prefect's task runners do)."""
    ended = threading.Event()
    token = _RUN_ENDED.set(ended)
    try:
        yield
    except BaseException:
        ended.set()
        with _lock:
            rollouts = [pgid for pgid, run in _rollouts.items() if run is ended]
        _kill(rollouts)
        raise
    finally:
        _RUN_ENDED.reset(token)


def add_group(pgid: int, what: str, *, rollout: bool = False) -> None:
    """Remember a process group this process started (killed by a second signal; a rollout's also by the first)."""
    with _lock:
        _groups[pgid] = what
        if rollout:
            _rollouts[pgid] = _RUN_ENDED.get()


def drop_group(pgid: int) -> None:
    """Forget a process group that was stopped."""
    with _lock:
        _groups.pop(pgid, None)
        _rollouts.pop(pgid, None)


def kill_group(pgid: int) -> None:
    """SIGKILL every process of the group (gone already: nothing to do)."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)


def _kill(groups: list[int]) -> None:
    for pgid in groups:
        kill_group(pgid)


@contextlib.contextmanager
def on_signals() -> Iterator[None]:
    """Run the block with Ctrl-C and SIGTERM stopping everything (see the module's docstring); restore after.

    Only the main thread can set handlers: elsewhere the block runs as it is.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handle(signum, frame):
        name = signal.Signals(signum).name
        if STOP.is_set():  # the second: whatever is still running goes now
            with _lock:
                groups = list(_groups)
            _kill(groups)
            os.write(2, f"\n{name} again: killed {len(groups)} process group(s) this run started; exiting\n".encode())
            os._exit(130)
        STOP.set()
        with _lock:
            rollouts = list(_rollouts)
        _kill(rollouts)  # agents hold nothing that must be saved: their rollouts stay planned and run again
        raise KeyboardInterrupt(name)

    previous = {sig: signal.signal(sig, handle) for sig in (signal.SIGINT, signal.SIGTERM)}
    STOP.clear()
    try:
        yield
    except Exception as exc:
        if STOP.is_set():  # a failure the stop caused (a training stopped beside the rollouts, ...) is the stop
            raise KeyboardInterrupt(f"stopped ({type(exc).__name__}: {exc})") from exc
        raise
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        STOP.clear()
