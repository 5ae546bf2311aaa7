"""A stop from outside (CI's time limit, ``kill``, ``timeout``) ends pytest the way Ctrl-C does: the running test
unwinds, every fixture stops what it started, and pytest prints its summary and writes its JUnit file.

Without this, SIGTERM ended pytest at once: a fixture's ``finally`` never ran, and a training run a test had started
(its own process group: collector, gateway, two vLLMs, Prefect's API) went on under init, slowing every later run on
the machine. tests/conftest.py installs it; a second SIGTERM is a hard stop. Stopped either way, pytest names the test
that was running and for how long (its own line gives a file and line number only).
"""

from __future__ import annotations

import signal
import threading
import time

import pytest


def pytest_configure(config: pytest.Config) -> None:
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _interrupt)


def _interrupt(signum: int, frame: object) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # a second SIGTERM ends the process without unwinding
    raise KeyboardInterrupt(f"stopped by signal {signal.Signals(signum).name}")


_running: dict[str, float] = {}  # the test in progress: node id -> when it started (time.monotonic)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None):
    _running[item.nodeid] = time.monotonic()
    result = yield  # a stop raises here, and the test stays named for pytest_keyboard_interrupt
    _running.pop(item.nodeid, None)
    return result


def pytest_keyboard_interrupt(excinfo: pytest.ExceptionInfo) -> None:
    for nodeid, began in _running.items():
        print(f"\nstopped during {nodeid}, {time.monotonic() - began:.0f} s into it", flush=True)
