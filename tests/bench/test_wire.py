"""The wire-bytes model and the link counters' arithmetic, without a cluster (the cluster test is in
test_bench.py): the model's formulas on known collectives, and the headers of offloaded segments added back."""

from __future__ import annotations

import pytest

from gradzip.bench import wire
from gradzip.bench.wire import LinkCounters
from gradzip.comm.collectives import CommStats


def test_the_model_of_one_all_reduce_is_the_ring_payload_plus_framing_headers_and_acks() -> None:
    b = 1_000_000
    stats = CommStats(all_reduce_bytes=b, all_reduce_calls=1)
    got = wire.model(stats, world=4, steps=1)
    ring = 2 * 3 / 4 * b  # 1.5 MB out and in
    messages = 4 * 3  # 2n segments, each phase sends all but the worker's own two
    segments = messages * -(-(ring / messages + 144) // 1448)
    expected = ring + 144 * messages + 66 * segments + 66 * (3 * messages + segments / 64)
    assert got == {"sent": pytest.approx(expected), "received": pytest.approx(expected), "payload": ring}
    # What was measured on this machine (1 Gbit/s, 4 workers, 1 MB all-reduces): 1,573,549 bytes.
    assert got["sent"] == pytest.approx(1_573_549, rel=0.01)
    # Bulk data: about 1.046 times the payload.
    big = wire.model(CommStats(all_reduce_bytes=400 * b, all_reduce_calls=1), 4, 1)
    assert big["sent"] / big["payload"] == pytest.approx(1 + 66 / 1448 + 66 / 1448 / 64, rel=1e-3)


def test_all_gathers_move_n_minus_1_payloads_and_votes_and_point_to_point_count_too() -> None:
    gather = wire.model(CommStats(all_gather_bytes=100_000, all_gather_calls=1), 4, 1)
    assert gather["payload"] == 300_000  # a ring all-gather forwards the 3 other payloads
    # Measured: 1,258,322 bytes per 400 kB all-gather at 4 workers; here a quarter of that payload.
    assert wire.model(CommStats(all_gather_bytes=400_000, all_gather_calls=1), 4, 1)["sent"] == pytest.approx(
        1_258_322, rel=0.01
    )
    # The vote (4 workers): 6 messages of 4 bytes, measured 888 bytes of TCP payload and 23 segments.
    vote = wire.model(CommStats(votes=1), 4, 1)
    assert vote["payload"] == 0 and vote["sent"] == pytest.approx(888 + 66 * 24, rel=0.1)
    # Point-to-point is asymmetric: a push out, a smaller reply in.
    p2p = wire.model(
        CommStats(p2p_bytes_sent=40_000, p2p_sends=1, p2p_bytes_received=4_000, p2p_recvs=1), 1, 2
    )
    assert p2p["sent"] > 40_000 / 2 > p2p["received"] > 4_000 / 2  # per step, two steps
    # A world of one: the collectives move nothing, the point-to-point messages still go.
    solo = wire.model(CommStats(all_reduce_bytes=10**6, all_reduce_calls=1, votes=1), 1, 1)
    assert solo == {"sent": 0.0, "received": 0.0, "payload": 0.0}
    with pytest.raises(ValueError, match="steps=0 is invalid"):
        wire.model(CommStats(), 4, 0)
    with pytest.raises(ValueError, match="world=0 is invalid"):
        wire.model(CommStats(), 0, 1)


def test_wire_bytes_add_back_the_headers_of_segments_that_offloading_merged() -> None:
    # 3 MB in 56 packets of the interface that TCP sent as 2076 segments (measured through a 1gbit link).
    before = LinkCounters(1000, 10, 500, 5, {7: (100, 50)}, headers=66)
    after = LinkCounters(
        1000 + 3_003_704, 10 + 56, 500 + 3_662, 5 + 55, {7: (100 + 2076, 50 + 52), 9: (3, 0)}
    )
    sent, received = wire.wire_bytes(before, after)
    # A connection opened in the window (inode 9) counts from zero.
    assert sent == 3_003_704 + (2076 + 3 - 56) * 66
    # Fewer segments than packets (acknowledgements, no offload): nothing to add back, never less.
    assert received == 3_662
    assert sent / 3_000_000 == pytest.approx(1 + 66 / 1448, rel=0.002)


def test_reading_a_link_needs_an_interface_of_this_namespace() -> None:
    counters = wire.read_link("lo")  # every namespace has one; its counters only grow
    assert counters.tx_bytes >= 0 and counters.rx_packets >= 0 and counters.headers > 0
    with pytest.raises(ValueError, match="no interface 'nosuch0' in this network namespace"):
        wire.read_link("nosuch0")
    assert wire.summary([{"sent": 1.0, "payload": 2.0}, {"sent": 3.0, "payload": None}]) == {
        "wire_bytes_sent_per_step": 2.0,
        "wire_bytes_received_per_step": None,
        "model_wire_bytes_sent_per_step": None,
        "model_wire_bytes_received_per_step": None,
        "ring_bytes_per_step": None,  # one worker without a figure: none for the configuration
    }
