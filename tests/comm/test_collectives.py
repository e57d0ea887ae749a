"""Byte accounting of the collectives, and the world of one that the kernel benchmark drives reducers through."""

from __future__ import annotations

import torch

from gradzip.comm.collectives import SoloComm


def test_a_world_of_one_returns_what_one_worker_would_and_counts_it() -> None:
    comm = SoloComm()
    comm.trace = []
    t = torch.arange(6, dtype=torch.float32)
    assert comm.all_reduce(t).wait() is t  # the sum over one worker, in place
    gathered = comm.all_gather(t).wait()
    assert gathered.shape == (1, 6) and torch.equal(gathered[0], t)
    assert gathered.data_ptr() != t.data_ptr()  # a new buffer, as a real all-gather writes
    rows = torch.ones(1, 4, dtype=torch.uint8)
    assert torch.equal(comm.all_to_all(rows).wait(), rows)
    # Sent: the all-reduce's contribution and the all-gather's payload; the all-to-all's own row never
    # leaves. Received: the all-reduce's aggregate only (no other worker to gather from).
    assert (comm.stats.bytes_sent, comm.stats.bytes_received) == (24 + 24, 24)
    assert [op for op, _, _ in comm.trace] == ["all_reduce", "all_gather", "all_to_all"]
    assert (comm.world, comm.rank) == (1, 0)


def test_each_collective_is_counted_by_kind_and_ring_bytes_follow_each_algorithm() -> None:
    comm = SoloComm()
    comm.world = 4  # counted as a worker of 4 counts; the transport stays the world of one
    comm.all_reduce(torch.zeros(100))  # 400 B
    comm.all_gather(torch.zeros(10))  # 40 B
    comm.all_to_all(torch.zeros(4, 5))  # rows of 20 B, 3 of them leave
    comm.vote_nonfinite(False, torch.device("cpu"))
    s = comm.stats
    assert (s.all_reduce_bytes, s.all_reduce_calls, s.all_gather_bytes, s.all_gather_calls) == (400, 1, 40, 1)
    assert (s.all_to_all_bytes, s.all_to_all_calls, s.votes) == (60, 1, 1)
    # The payload counts split by kind add up to bytes_sent; the vote is in none of them.
    assert s.bytes_sent == s.all_reduce_bytes + s.all_gather_bytes + s.all_to_all_bytes == 500
    assert s.collectives == 3
    # A ring all-reduce moves 2(n-1)/n of its tensor, a ring all-gather n-1 payloads, all-to-all as sent.
    assert s.ring_bytes(4) == 2 * 3 / 4 * 400 + 3 * 40 + 60
    assert s.ring_bytes(1) == 60  # one worker: the rings move nothing
    assert set(s.to_dict()) >= {"all_reduce_bytes", "p2p_bytes_sent", "votes"}
    assert all(isinstance(v, int) for v in s.to_dict().values())  # checkpoints restore them as ints


def _wait_in_workers_group(rank: int, world: int) -> float | None:
    import time
    from datetime import timedelta

    import torch.distributed as dist

    from gradzip.comm.collectives import workers_group

    group = workers_group(world, timedelta(seconds=3))
    if rank == 1:  # never joins the all-reduce, and outlives rank 0's wait
        time.sleep(7)
        return None
    start = time.monotonic()
    try:
        dist.all_reduce(torch.ones(1), group=group)
    except RuntimeError:
        return time.monotonic() - start
    return None


def test_the_workers_group_waits_no_longer_than_the_runs_timeout() -> None:
    from tests.distributed import run_workers

    # torch's default for a new gloo group is 30 minutes: without the run's timeout this would hang.
    waited, _ = run_workers(_wait_in_workers_group, 2, init=True, timeout=60)
    assert waited is not None and waited < 6, waited
