"""A stop from outside (CI's time limit, ``kill``, ``timeout``) ends pytest the way Ctrl-C does: the running test
unwinds, every fixture stops what it started, and pytest prints its summary and writes its JUnit file.

Without this, SIGTERM ended pytest at once: a fixture's ``finally`` never ran, and a training run a test had started
(its own process group: collector, gateway, two vLLMs, Prefect's API) went on under init, slowing every later run on
the machine. tests/conftest.py installs it; a second SIGTERM is a hard stop.
"""

from __future__ import annotations

import signal
import threading

import pytest


def pytest_configure(config: pytest.Config) -> None:
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _interrupt)


def _interrupt(signum: int, frame: object) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # a second SIGTERM ends the process without unwinding
    raise KeyboardInterrupt(f"stopped by signal {signal.Signals(signum).name}")
