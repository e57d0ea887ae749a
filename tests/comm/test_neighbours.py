"""The neighbour exchange of decentralized training, in real processes: fused messages, byte counts, and a
silent neighbour that raises instead of hanging."""

from __future__ import annotations

import time
from datetime import timedelta

import torch

from gradzip.comm.neighbours import NeighbourExchange
from tests.distributed import run_workers


def _dead_neighbour(rank: int, world: int) -> str:
    exchange = NeighbourExchange(timeout=timedelta(seconds=1))
    got = exchange.exchange({1 - rank: [torch.full((3,), float(rank)), torch.ones(2, dtype=torch.int64)]})
    assert torch.equal(got[1 - rank][0], torch.full((3,), float(1 - rank)))
    assert exchange.stats.bytes_sent == exchange.stats.bytes_received == 3 * 4 + 4 + 2 * 8  # + alignment
    # Point-to-point by kind too (the benchmark's wire model): one message each way.
    s = exchange.stats
    assert (s.p2p_bytes_sent, s.p2p_bytes_received, s.p2p_sends, s.p2p_recvs) == (32, 32, 1, 1)
    if rank == 1:
        time.sleep(3)  # alive but silent: rank 0's wait must end with an error, not hang
        return "silent"
    try:
        exchange.exchange({1: [torch.ones(3)]})
    except RuntimeError as err:
        return f"raised: {err}"
    return "returned"


def test_a_silent_neighbour_raises_instead_of_hanging() -> None:
    results = run_workers(_dead_neighbour, 2, timeout=60)
    assert results[0].startswith("raised: "), results
