"""Starting workers: a worker that fails ends the run with its rank, the failure is pinned on the rank that
failed by itself, and torchrun is recognised."""

from __future__ import annotations

import atexit
import json
import os
import socket
import time
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist

from gradzip.train.config import TrainConfig
from gradzip.train.env import under_torchrun
from gradzip.train.launch import WorkerError, _describe_failure, spawn
from gradzip.train.worker import run_worker


def _entry_rank1_dies(cfg: TrainConfig) -> None:
    """A worker function whose rank 1 fails while rank 0 waits for it in a collective."""
    dist.init_process_group("gloo")
    try:
        if dist.get_rank() == 1:
            raise RuntimeError("first line\nrank one broke on purpose")
        dist.all_reduce(torch.ones(1))
    finally:
        dist.destroy_process_group()


def test_a_failing_worker_ends_the_run_with_its_rank(tmp_path: Path) -> None:
    cfg = TrainConfig(method="ssgd", workers=2, backend="gloo", timeout=120)
    start = time.monotonic()
    with pytest.raises(WorkerError) as info:
        spawn(cfg, _entry_rank1_dies)
    # Not a hang until the collective timeout: the launcher stops the surviving worker.
    assert time.monotonic() - start < 60
    assert info.value.rank == 1
    assert str(info.value).startswith("worker rank 1 failed: RuntimeError: rank one broke on purpose")


class _Failure:
    def __init__(self, message: Any, exitcode: int = 1, timestamp: int = 0) -> None:
        self.message, self.exitcode, self.timestamp = message, exitcode, timestamp

    def signal_name(self) -> str:
        return "SIGKILL"


class _ChildFailed(Exception):
    def __init__(self, failures: dict[int, _Failure]) -> None:
        super().__init__("child failed")
        self.failures = failures


def test_failure_names_the_rank_that_failed_by_itself(tmp_path: Path) -> None:
    # The launcher saw rank 0 die first, of a broken connection; rank 3's own report is the cause even though
    # it was written later.
    (tmp_path / "rank3.json").write_text(json.dumps({"rank": 3, "time": 11.5, "detail": "ValueError: bad"}))
    (tmp_path / "rank0.json").write_text(
        json.dumps({"rank": 0, "time": 11.2, "detail": "RuntimeError: Connection reset by peer"})
    )
    seen = _ChildFailed({0: _Failure({"message": "RuntimeError: Connection reset by peer"}, timestamp=11)})
    err = _describe_failure(seen, str(tmp_path))
    assert (err.rank, str(err)) == (3, "worker rank 3 failed: ValueError: bad (2 ranks failed)")


def test_failure_without_reports_uses_the_launchers_view() -> None:
    killed = _describe_failure(_ChildFailed({1: _Failure("", exitcode=-9)}))
    assert (killed.rank, str(killed)) == (1, "worker rank 1 failed: killed by signal SIGKILL")
    err = _describe_failure(_ChildFailed({2: _Failure({"message": "Traceback...\nKeyError: 'x'"})}))
    assert str(err) == "worker rank 2 failed: KeyError: 'x'"


def test_under_torchrun_detection() -> None:
    assert under_torchrun({"TORCHELASTIC_RUN_ID": "x"})
    assert under_torchrun({"LOCAL_RANK": "0", "WORLD_SIZE": "2"})
    assert not under_torchrun({"LOCAL_RANK": "0"})
    assert not under_torchrun({})


def _entry_aborts_at_exit(cfg: TrainConfig) -> dict[str, int]:
    """A worker that finishes, then dies in the interpreter's teardown (as gloo's SIGABRT, pytorch#190489)."""
    atexit.register(os.abort)
    return {"rank": int(os.environ["RANK"])}


def test_a_finished_worker_that_aborts_at_teardown_is_not_a_failure() -> None:
    cfg = TrainConfig(method="ssgd", workers=2, backend="gloo", timeout=60)
    assert spawn(cfg, _entry_aborts_at_exit) == {"rank": 0}


def _started_differently(rank: int, world: int, port: int, options: list[dict[str, int]]) -> str:
    os.environ["MASTER_PORT"] = str(port)
    cfg = TrainConfig(
        method="acpsgd", options=options[rank], workers=world, steps=3, quiet=True, backend="gloo"
    )
    try:
        run_worker(cfg)
    except ValueError as err:
        return str(err)
    return "trained"


def test_workers_started_differently_all_fail_saying_what_differs() -> None:
    from tests.distributed import free_port, run_workers

    got = run_workers(
        _started_differently, 2, free_port(), [{"rank": 4}, {"rank": 2}], init=False, timeout=120
    )
    for message in got:
        assert message.startswith("the workers were started differently: on worker 0 options is "), message
        assert "'rank': 4" in message and "on worker 1 it is" in message and "'rank': 2" in message
    # Control: the same options on both train.
    same = run_workers(
        _started_differently, 2, free_port(), [{"rank": 4}, {"rank": 4}], init=False, timeout=120
    )
    assert same == ["trained", "trained"]


def _listening(pids: list[int]) -> list[str]:
    """The addresses the given processes listen on for TCP (from /proc: no tool needed)."""
    inodes = set()
    for pid in pids:
        for fd in Path(f"/proc/{pid}/fd").iterdir():
            try:
                target = os.readlink(fd)
            except OSError:
                continue
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
    found = []
    for table, width in (("/proc/net/tcp", 8), ("/proc/net/tcp6", 32)):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A" and fields[9] in inodes:  # LISTEN
                address = bytes.fromhex(fields[1].split(":")[0][:width])
                found.append(
                    socket.inet_ntop(
                        socket.AF_INET if width == 8 else socket.AF_INET6,
                        address[::-1] if width == 8 else address,
                    )
                )
    return found


def _entry_listens(cfg: TrainConfig) -> list[str]:
    from datetime import timedelta

    from gradzip.train.worker import init_process_group

    init_process_group("gloo", timedelta(seconds=30))
    try:
        dist.all_reduce(torch.ones(1))  # every pair connected
        return _listening([os.getpid(), os.getppid()])  # the worker's and the launcher's (the store) sockets
    finally:
        dist.destroy_process_group()


def test_a_local_run_listens_on_loopback_only() -> None:
    cfg = TrainConfig(method="ssgd", workers=2, backend="gloo", timeout=60)
    addresses = spawn(cfg, _entry_listens)
    assert addresses, "no listening socket found: the check would be vacuous"
    assert all(a in ("127.0.0.1", "::1") for a in addresses), addresses
