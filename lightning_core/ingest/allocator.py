"""Keep the memory a process frees for its next allocations (glibc's malloc), instead of handing it back.

By default glibc serves a large allocation (from 128 kB, a threshold that adapts up to 32 MB) with its own
``mmap`` and unmaps it on ``free``, and gives the top of its heap back to the system once more than twice that
is free there. The collector's conversion allocates and frees numpy and protobuf buffers of a few MB for every
request, so each request's buffers were fresh pages that the kernel zeroed and faulted in, one page at a time.
Converting pairs of benchmark requests in a loop took 18-19 ms of CPU a pair, and 13.8-13.9 ms with the
thresholds below; in the collector the converter thread's page faults fell from 26k to 4k a second
(docs/measurement-log.md). Arrow's buffers come from its own allocator (mimalloc) and are not affected.

A process that calls ``keep_freed_memory`` holds on to up to ``TRIM_THRESHOLD`` of free heap per malloc arena.
Where ``MALLOC_MMAP_THRESHOLD_`` or ``MALLOC_TRIM_THRESHOLD_`` (or their ``GLIBC_TUNABLES``) is set, they win and
nothing is changed; on a C library other than glibc (macOS, musl) nothing is changed either.
"""

from __future__ import annotations

import ctypes
import logging
import os
import platform

log = logging.getLogger("arclight.allocator")

MMAP_THRESHOLD = 32 << 20  # allocations below this come from the heap and return to it
TRIM_THRESHOLD = 64 << 20  # free memory at the top of a heap kept for the next allocations
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters (malloc.h)
_ENVIRONMENT = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")
_TUNABLES = ("glibc.malloc.mmap_threshold", "glibc.malloc.trim_threshold")  # in GLIBC_TUNABLES


def keep_freed_memory() -> bool:
    """Set glibc's mmap and trim thresholds for this process; True when they were set."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    tunables = os.environ.get("GLIBC_TUNABLES", "")
    if any(name in os.environ for name in _ENVIRONMENT) or any(name in tunables for name in _TUNABLES):
        log.debug("malloc tunables set in the environment; the allocator is left as they say")
        return False
    mallopt = ctypes.CDLL(None).mallopt
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    done = mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1 and mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1
    if not done:
        log.warning("glibc refused the malloc thresholds; conversions fault in fresh pages for their buffers")
    return done
