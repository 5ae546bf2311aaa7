"""CPU time of a server under test, read from ``/proc`` (Linux): steadier than throughput on a shared machine."""

from __future__ import annotations

import os


def group_cpu_s(pgid: int) -> float:
    """CPU seconds (user + system, all threads) used so far by the live processes of process group ``pgid``
    (a server started in its own session, with the worker processes it forked)."""
    total = 0
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:  # the process ended meanwhile
            continue
        if int(fields[2]) == pgid:  # pgrp, the 5th field of stat(5)
            total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / os.sysconf("SC_CLK_TCK")
