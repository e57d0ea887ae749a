"""Run a function in N real processes on gloo and collect what each returns (the shared multi-process fixture).

The workers fork from a server that has imported torch once (``_context``); each still pays a process group's
set-up, so a test runs many checks inside one call.
"""

from __future__ import annotations

import faulthandler
import io
import os
import pickle
import time
import traceback
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from gradzip.util import free_port

__all__ = ["differences", "free_port", "init_gloo", "run_workers"]


def init_gloo(rank: int, world: int, port: int) -> None:
    """Join a gloo group of ``world`` processes on loopback ``port`` (one minute to find each other)."""
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world,
        timeout=timedelta(seconds=60),
    )


def _entry(
    rank: int,
    world: int,
    port: int,
    init: bool,
    work: bytes,
    queue: Any,
    environ: dict[str, str],
) -> None:
    # The caller's environment as it is now, as a spawned process would inherit it (the forkserver's dates
    # from its start, before a test's monkeypatch.setenv).
    os.environ.clear()
    os.environ.update(environ)
    # A worker still running near the test's deadline prints every thread's stack: a hang names its wait.
    faulthandler.dump_traceback_later(float(os.environ.get("GRADZIP_TEST_DUMP_AFTER", "200")), exit=False)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    # All ranks are on this machine: gloo must use loopback, never the machine's network interface.
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"
    torch.set_num_threads(1)  # several workers share 2 cores: one thread each avoids oversubscription
    try:
        if not init:  # fn starts its own process groups, from the environment torchrun would set
            os.environ.update(
                RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world)
            )
            os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        else:
            init_gloo(rank, world, port)
        # Unpickled only now, after the environment is the caller's: it may import the test's module.
        fn, args = pickle.loads(work)
        result = fn(rank, world, *args)
        # Tensors cross as bytes: torch's shared-memory handover breaks once the worker has exited.
        buf = io.BytesIO()
        torch.save(result, buf)
        queue.put((rank, True, buf.getvalue()))
    except BaseException:
        queue.put((rank, False, traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


_CTX: Any = None


def _context() -> Any:
    """A forkserver that has imported torch and gradzip once: each worker forks from it instead of starting a
    fresh interpreter that imports torch again (about 1 s per worker on 2 cores, for hundreds of workers in
    the suite). The server imports only (numpy's BLAS thread aside, which survives a fork), starts no torch
    thread pool and no process group, so forking it is safe."""
    global _CTX
    if _CTX is None:
        _CTX = mp.get_context("forkserver")
        _CTX.set_forkserver_preload(["torch", "torch.distributed", "gradzip", "tests.distributed"])
    return _CTX


def run_workers(
    fn: Callable[..., Any],
    world: int,
    *args: Any,
    timeout: float = 240,
    init: bool = True,
    may_die: tuple[int, ...] = (),
) -> list[Any]:
    """``fn(rank, world, *args)`` in ``world`` processes; returns the results ordered by rank.

    With ``init`` the processes join one gloo group first; without it they only get torchrun's environment
    variables (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT...) and ``fn`` starts its own groups."""
    ctx = _context()
    queue = ctx.SimpleQueue()
    port = free_port()
    environ = dict(os.environ)
    work = pickle.dumps((fn, args))
    procs = [
        ctx.Process(target=_entry, args=(r, world, port, init, work, queue, environ)) for r in range(world)
    ]
    for p in procs:
        p.start()
    results: dict[int, Any] = {}
    errors: list[str] = []
    deadline = time.monotonic() + timeout
    expected = world - len(may_die)
    while len(results) + len(errors) < expected and time.monotonic() < deadline:
        if queue.empty():
            if not any(p.is_alive() for p in procs) and queue.empty():
                break
            time.sleep(0.05)
            continue
        rank, ok, value = queue.get()
        if ok:
            results[rank] = torch.load(io.BytesIO(value), weights_only=False)
        else:
            errors.append(f"rank {rank}:\n{value}")
    for p in procs:
        p.join(timeout=5)
        if p.is_alive():
            p.kill()
    if errors:
        raise AssertionError("worker failed\n" + "\n".join(errors))
    if len(results) < expected:
        raise AssertionError(f"only ranks {sorted(results)} of {world} finished within {timeout}s")
    return [results.get(r) for r in range(world)]


def _flat(x: Any, prefix: str = "") -> dict[str, Any]:
    """Every leaf of a nested state, by path."""
    if isinstance(x, dict):
        return {k: v for key, value in x.items() for k, v in _flat(value, f"{prefix}/{key}").items()}
    if isinstance(x, (list, tuple)):
        return {k: v for i, value in enumerate(x) for k, v in _flat(value, f"{prefix}[{i}]").items()}
    return {prefix: x}


def differences(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    """The leaves of two states that are not bit-identical (tensors compared with torch.equal)."""
    fa, fb = _flat(a), _flat(b)
    out = sorted(set(fa) ^ set(fb))
    for key in set(fa) & set(fb):
        x, y = fa[key], fb[key]
        same = torch.equal(x, y) if isinstance(x, torch.Tensor) else x == y
        if not same:
            out.append(key)
    return sorted(out)
