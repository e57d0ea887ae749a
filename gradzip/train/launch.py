"""Starting the workers of a training run: spawned locally through torch's elastic launcher, or, under torchrun,
the current process is itself one of the workers.

Either way the workers run ``gradzip.train.worker.run_worker`` with the same env:// rendezvous, so a run started
by ``gradzip train --workers 4`` and one started by ``torchrun --nproc-per-node 4 -m gradzip train`` execute
the same code.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import logging
import os
import pickle
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from gradzip.registry import servers_needed
from gradzip.train import rendezvous
from gradzip.train.config import TrainConfig
from gradzip.train.env import under_torchrun
from gradzip.train.summary import RunSummary
from gradzip.train.worker import PeerStalled, run_worker
from gradzip.util import free_port, is_failed_wait, last_line

Entrypoint = Callable[[TrainConfig], Any]


class WorkerError(RuntimeError):
    """A worker failed; ``rank`` is its global rank (None when unknown), the message is one line."""

    def __init__(self, message: str, rank: int | None = None) -> None:
        super().__init__(message)
        self.rank = rank


def _quiet_launcher_logs() -> None:
    # The elastic agent logs its whole configuration, every rendezvous round and every worker's exit at INFO
    # or WARNING, and a failure again at ERROR; gradzip reports the outcome itself, so only keep CRITICAL.
    for name in ("torch.distributed.elastic", "torch.distributed.launcher", "torch.multiprocessing"):
        logging.getLogger(name).setLevel(logging.CRITICAL)


def _guarded(entrypoint: Entrypoint, report_dir: str, cfg: TrainConfig) -> Any:
    """Run ``entrypoint(cfg)``; if it raises, leave the time and the error's last line in ``report_dir``.

    The launcher reports only the first worker it sees dead, which is often a survivor whose collective broke
    because the real culprit had already gone; these reports let the parent name the culprit instead.
    """
    rank = int(os.environ.get("RANK", "0"))
    with contextlib.suppress(OSError):  # a report of an earlier attempt (before a restart) is not this one's
        Path(report_dir, f"rank{rank}.json").unlink(missing_ok=True)
    try:
        result = entrypoint(cfg)
        # The launcher pickles the result to hand it back: a failure to do so must be this worker's error
        # here, not a missing result after it has left (below).
        pickle.dumps(result)
    except BaseException as err:
        detail = f"{type(err).__name__}: {last_line(str(err))}".rstrip(": ")
        report: dict[str, Any] = {"rank": rank, "time": time.time(), "detail": detail}
        if isinstance(err, PeerStalled):  # the survivors' roll call named the worker that stopped answering
            report["culprit"] = err.ranks[0]
        with contextlib.suppress(OSError):
            Path(report_dir, f"rank{rank}.json").write_text(json.dumps(report))
        raise
    atexit.register(leave_without_teardown)
    return result


def leave_without_teardown(code: int = 0) -> None:
    """End a process whose work is done and handed back, without the interpreter's teardown: gloo can abort a
    process (SIGABRT, "terminate called without an active exception") when its objects are freed during
    teardown (pytorch#190489), and a finished run must never report failure because of it.

    Registered with atexit once a worker has succeeded, it runs before the handlers registered earlier (the
    launcher's child has already flushed its result queue by then) and skips them."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _read_reports(report_dir: str | None) -> list[dict[str, Any]]:
    reports = []
    for path in sorted(Path(report_dir).glob("rank*.json")) if report_dir else []:
        with contextlib.suppress(OSError, ValueError):
            reports.append(json.loads(path.read_text()))
    return reports


def _describe_failure(err: Exception, report_dir: str | None = None) -> WorkerError:
    """One line naming the failed rank that caused the others to fail, and its error's last line."""
    reports = _read_reports(report_dir)
    failures: dict[int, Any] = getattr(err, "failures", {}) or {}
    for rank, failure in failures.items():
        if not any(r["rank"] == rank for r in reports):
            # Killed by a signal (no Python exception to report) or failed before the report could be written.
            reports.append(
                {"rank": rank, "time": float(failure.timestamp), "detail": _failure_detail(failure)}
            )
    if not reports:
        return WorkerError(f"a worker failed: {last_line(str(err)) or type(err).__name__}")

    # A rank that failed by itself comes first, then one that the survivors' roll call found not answering
    # (worker.PeerStalled), then one that lost its peer; then the earliest.
    def order(r: dict[str, Any]) -> tuple[int, float, int]:
        kind = 1 if "culprit" in r else 2 if is_failed_wait(r["detail"]) else 0
        return kind, r["time"], r["rank"]

    first = min(reports, key=order)
    if "culprit" in first:
        return WorkerError(first["detail"].removeprefix("PeerStalled: "), rank=int(first["culprit"]))
    more = f" ({len(reports)} ranks failed)" if len(reports) > 1 else ""
    return WorkerError(f"worker rank {first['rank']} failed: {first['detail']}{more}", rank=first["rank"])


def _failure_detail(failure: Any) -> str:
    message = failure.message
    if isinstance(message, dict):  # written by the elastic error handler: {"message": ..., "extraInfo": ...}
        message = message.get("message", "")
    detail = last_line(str(message))
    if failure.exitcode < 0:
        return f"killed by signal {failure.signal_name()}"
    if not detail or detail.startswith("To enable traceback"):
        return f"exited with code {failure.exitcode}"
    return detail


def spawn(cfg: TrainConfig, entrypoint: Entrypoint = run_worker) -> Any:
    """Run ``entrypoint(cfg)`` on ``cfg.workers`` local processes; returns rank 0's return value.

    When one worker fails the agent stops the others, so a dead peer ends the run instead of leaving the rest
    blocked in a collective until the timeout; the failure is raised as WorkerError. With
    ``cfg.max_restarts``, the agent starts every worker again instead, up to that many times, and they
    continue from the latest checkpoint (``run_worker`` resumes when it is a restart).
    """
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    _quiet_launcher_logs()
    config = LaunchConfig(
        min_nodes=1,
        max_nodes=1,
        # Dedicated parameter servers (DoubleSqueeze placement="server") are processes of their own.
        nproc_per_node=cfg.workers + servers_needed(cfg.method, cfg.options),
        run_id=f"gradzip-{uuid.uuid4().hex[:12]}",
        rdzv_backend=rendezvous.register(),  # c10d's, on loopback only
        rdzv_endpoint=f"127.0.0.1:{free_port()}",
        # The rendezvous of local processes takes seconds; a long wait means something is broken.
        rdzv_configs={"timeout": int(max(60, cfg.timeout))},
        max_restarts=cfg.max_restarts,
        # spawn, not fork: the parent may already run threads (torch's intra-op pool) that fork would break.
        start_method="spawn",
        local_addr="127.0.0.1",
    )
    # Every worker is on this machine: gloo talks over loopback rather than whatever interface the hostname
    # resolves to (a user's own setting is kept).
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    with tempfile.TemporaryDirectory(prefix="gradzip-") as report_dir:
        try:
            results = elastic_launch(config, _guarded)(entrypoint, report_dir, cfg)
        except ChildFailedError as err:
            raise _describe_failure(err, report_dir) from None
    return results.get(0)


def run(cfg: TrainConfig) -> RunSummary | None:
    """Train: under torchrun as this process's rank, else on ``cfg.workers`` spawned processes.

    Returns the summary on the process that holds global rank 0's result (the parent, when spawning), None on
    the other torchrun ranks.
    """
    if not under_torchrun():
        return spawn(cfg)
    try:
        return run_worker(cfg)
    except Exception as err:
        rank = os.environ.get("RANK", "?")
        raise WorkerError(f"worker rank {rank} failed: {type(err).__name__}: {last_line(str(err))}") from err
