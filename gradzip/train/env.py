"""What the environment says about this process: whether torchrun started it, how many workers share this
machine, which backend and how many threads they should use."""

from __future__ import annotations

import os
from collections.abc import Mapping

import torch


def under_torchrun(environ: Mapping[str, str] | None = None) -> bool:
    """True when this process was started by torchrun (or another torchelastic agent) as one of the workers."""
    env = os.environ if environ is None else environ
    return "TORCHELASTIC_RUN_ID" in env or ("LOCAL_RANK" in env and "WORLD_SIZE" in env)


def local_processes(workers: int) -> int:
    """Worker processes on this machine: torchrun's LOCAL_WORLD_SIZE under torchrun, else ``workers``."""
    return int(os.environ.get("LOCAL_WORLD_SIZE", workers)) if under_torchrun() else workers


def default_backend(workers: int | None = None) -> str:
    """nccl where every local worker can have a GPU of its own (NCCL refuses two ranks on one device), else
    gloo on the CPU."""
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    return "nccl" if gpus and (workers is None or local_processes(workers) <= gpus) else "gloo"


def threads_per_worker() -> int:
    """Intra-op threads per worker: the cores this process may use divided by the workers on this machine.

    Without it every worker starts one thread per core, and N workers on C cores run N*C busy threads that
    preempt each other; for the small models that are the default this makes each step several times slower.
    """
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    return max(1, usable_cores() // local_world)


def usable_cores() -> int:
    """The cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1
