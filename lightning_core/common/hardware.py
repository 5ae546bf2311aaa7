"""What this machine can compute fast: a GPU, and whether its CPU has native bf16.

On a CPU without bf16 instructions (AVX2 only, no AVX512-BF16 or AMX), bf16 is emulated: measured
here, vLLM generated 3x fewer tokens/s in bf16 than in fp32 and a bf16-autocast GRPO step did not
finish in 10 minutes where fp32 took 44 s (docs/measurement-log.md, issue 14). Defaults use fp32 there.
"""

from __future__ import annotations

import contextlib
import functools
import os
import shutil
from pathlib import Path
from typing import Iterator

BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")


def has_gpu() -> bool:
    """True when an NVIDIA GPU is visible (nvidia-smi on PATH)."""
    return shutil.which("nvidia-smi") is not None


@functools.lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    """The CPU feature flags of /proc/cpuinfo (empty where there is none)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def cpu_has_bf16() -> bool:
    """True when the CPU computes bf16 natively (AVX512-BF16 or AMX)."""
    return any(flag in cpu_flags() for flag in BF16_CPU_FLAGS)


def serving_dtype(config, *, gpu: bool | None = None, cpu_bf16: bool | None = None) -> str:
    """vLLM's dtype for ``config`` (an ``ArclightConfig``): ``serving.dtype``, or for auto bf16 where the hardware
    computes it natively (a GPU, or a CPU with AVX512-BF16/AMX), else fp32. ``gpu``/``cpu_bf16``: this machine's
    unless given."""
    if config.serving.dtype != "auto":
        return config.serving.dtype
    gpu = has_gpu() if gpu is None else gpu
    cpu_bf16 = cpu_has_bf16() if cpu_bf16 is None else cpu_bf16
    return "bfloat16" if gpu or cpu_bf16 else "float32"


def cpu_count() -> int:
    """Cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def gpu_count() -> int:
    """CUDA devices this process sees (CUDA_VISIBLE_DEVICES applies); 0 without a GPU, without importing torch."""
    if not has_gpu():
        return 0
    try:
        import torch
    except ImportError:
        return 0
    return torch.cuda.device_count()


def gpu_total_bytes(index: int) -> int:
    """Total memory of CUDA device ``index`` (``torch.cuda.mem_get_info``; creates this process's context there)."""
    import torch

    return int(torch.cuda.mem_get_info(index)[1])


@contextlib.contextmanager
def passive_openmp() -> Iterator[None]:
    """For the block, make OpenMP threads wait passively (``OMP_WAIT_POLICY=PASSIVE``) in this process, where torch
    has not loaded OpenMP yet, and in the processes it starts; then put the environment back as it was, so the
    servers a later run (or a later test in the same process) starts get what the user's shell gave.

    vLLM's CPU build and the trainer both run OpenMP threads that spin between parallel regions. Taking turns
    (synchronous epochs) that is the fastest wait; running at once on the same cores (asynchronous epochs), the
    spinning threads of one take the other's time: on 2 cores the calc example's overlapped epochs ran 28% slower
    than in turn, and about as fast once both waited passively (docs/measurement-log.md). A setting the user made
    is kept.
    """
    before = os.environ.get("OMP_WAIT_POLICY")
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("OMP_WAIT_POLICY", None)
        else:
            os.environ["OMP_WAIT_POLICY"] = before
