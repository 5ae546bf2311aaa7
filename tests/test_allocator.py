"""The collector keeps freed memory for its next allocations (glibc's mmap and trim thresholds)."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
                                reason="glibc's malloc only")

# A thread that allocates ten 3 MB arrays and frees them, 50 times, as a conversion's buffers come and go;
# prints whether the thresholds were set and the page faults the thread took.
CHURN = """
import json, resource, sys, threading
import numpy as np
from lightning_core.ingest.allocator import keep_freed_memory
kept = keep_freed_memory() if sys.argv[1] == "keep" else None
out = {"kept": kept}
def churn():
    before = resource.getrusage(resource.RUSAGE_THREAD).ru_minflt
    for _ in range(50):
        arrays = [np.ones(3 << 17) for _ in range(10)]
        del arrays
    out["faults"] = resource.getrusage(resource.RUSAGE_THREAD).ru_minflt - before
thread = threading.Thread(target=churn)
thread.start()
thread.join()
print(json.dumps(out))
"""


def _churn(mode: str, **env: str) -> dict:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "GLIBC_TUNABLES"}
    done = subprocess.run([sys.executable, "-c", CHURN, mode], capture_output=True, text=True, timeout=120,
                          env={**clean, **env}, check=True)
    return json.loads(done.stdout)


def test_freed_buffers_are_reused_instead_of_faulted_in_again():
    default, kept = _churn("default"), _churn("keep")
    assert kept["kept"] is True
    # by default glibc hands the freed 30 MB back and the next round faults it in again, page by page
    assert default["faults"] > 50 * 3 * 256, default
    assert kept["faults"] * 10 < default["faults"], (kept, default)


def test_malloc_settings_from_the_environment_are_left_alone():
    result = _churn("keep", MALLOC_TRIM_THRESHOLD_="1000")
    assert result["kept"] is False
    assert result["faults"] > 50 * 3 * 256, result  # the user's trim threshold still applies
