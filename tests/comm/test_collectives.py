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
