"""Timelines whose answer is known by hand, and the alpha-beta costs of the collectives."""

from __future__ import annotations

import math

import pytest

from gradzip.sim import network, timeline
from gradzip.sim.network import Link
from gradzip.sim.timeline import BucketWork, Exchange


def test_one_bucket_runs_hook_link_decode_and_optimizer_in_turn() -> None:
    # forward 1, backward 2, hook 0.5, link 3, decode 0.25, optimizer 1: nothing overlaps.
    t = timeline.run(1.0, [2.0], 1.0, buckets=[BucketWork(0.5, 3.0, finish_s=0.25, ready_layer=0)])
    assert t.iteration_s == pytest.approx(1 + 2 + 0.5 + 3 + 0.25 + 1)
    assert t.compression_s == pytest.approx(0.75)
    assert t.link_s == pytest.approx(3.0)
    assert t.exposed_s == pytest.approx(3.0)
    link = [s for s in t.segments if s.resource == "link"]
    assert [(s.start, s.end) for s in link] == [pytest.approx((3.5, 6.5))]


def test_two_buckets_overlap_backward_and_queue_on_the_link() -> None:
    # Layer 0 ends at 1 (bucket 0 goes), layer 1 at 2 (bucket 1 waits for the link until 2.5).
    buckets = [BucketWork(0.0, 1.5, ready_layer=0), BucketWork(0.0, 1.5, ready_layer=1)]
    t = timeline.run(0.0, [1.0, 1.0], 0.5, buckets=buckets)
    link = [(s.start, s.end) for s in t.segments if s.resource == "link"]
    assert link == [pytest.approx((1.0, 2.5)), pytest.approx((2.5, 4.0))]
    assert t.iteration_s == pytest.approx(4.5)
    # Of 3 s on the link, 1 s hid behind the second layer's backward.
    assert t.exposed_s == pytest.approx(2.0)
    # Negative control: without pipelining (both buckets at the end) the step is 1 s longer.
    late = [BucketWork(0.0, 1.5, ready_layer=1), BucketWork(0.0, 1.5, ready_layer=1)]
    assert timeline.run(0.0, [1.0, 1.0], 0.5, buckets=late).iteration_s == pytest.approx(5.5)


def test_a_hook_holds_backward_up() -> None:
    buckets = [BucketWork(2.0, 0.1, ready_layer=0), BucketWork(0.0, 0.1, ready_layer=1)]
    t = timeline.run(0.0, [1.0, 1.0], 0.0, buckets=buckets)
    backward = [(s.start, s.end) for s in t.segments if s.label == "backward"]
    assert backward == [pytest.approx((0.0, 1.0)), pytest.approx((3.0, 4.0))]


def test_second_round_waits_for_the_end_of_backward() -> None:
    # Bucket 0's first round lands at 2, long before backward ends at 10; its second round (PowerSGD's Q)
    # still starts only once the last bucket has been launched, and its collective queues behind bucket 1's
    # first round on the link; the decodes follow in bucket order.
    buckets = [
        BucketWork(0.0, 1.0, mid_s=0.5, second_s=1.0, finish_s=0.1, ready_layer=0),
        BucketWork(0.0, 1.0, mid_s=0.5, second_s=1.0, finish_s=0.1, ready_layer=1),
    ]
    t = timeline.run(0.0, [1.0, 9.0], 0.0, buckets=buckets)
    rounds = {s.label: (s.start, s.end) for s in t.segments}
    assert rounds["bucket 0"] == pytest.approx((1.0, 2.0))
    assert rounds["bucket 1"] == pytest.approx((10.0, 11.0))
    assert rounds["round 2, bucket 0"] == pytest.approx((10.0, 10.5))
    assert rounds["bucket 0, round 2"] == pytest.approx((11.0, 12.0))
    assert rounds["round 2, bucket 1"] == pytest.approx((11.0, 11.5))  # once bucket 1's P has landed
    assert rounds["bucket 1, round 2"] == pytest.approx((12.0, 13.0))
    assert rounds["decode 1"] == pytest.approx((13.0, 13.1))
    assert t.iteration_s == pytest.approx(13.1)


def test_exchanges_after_backward_and_after_the_step() -> None:
    ex = Exchange(0.5, 2.0, 0.25, 100.0)
    t = timeline.run(1.0, [1.0], 1.0, exchange=ex)
    assert t.iteration_s == pytest.approx(1 + 1 + 0.5 + 2 + 0.25 + 1)
    labels = [s.label for s in t.segments]
    assert labels.index("exchange") < labels.index("optimizer")
    gossip = Exchange(0.5, 2.0, 0.25, 100.0, after_step=True)
    labels = [s.label for s in timeline.run(1.0, [1.0], 1.0, exchange=gossip).segments]
    assert labels.index("exchange") > labels.index("optimizer")


def test_all_gather_against_all_reduce_at_2_and_16_workers() -> None:
    link = Link(8e9, message_s=1e-4, overhead=1.0)  # 1 GB/s of payload, 100 us a message
    mb = 1e6
    # Ring all-reduce of B: 2(n-1) messages, 2(n-1)/n B; all-gather of b: n-1 messages, (n-1) b.
    assert network.all_reduce(link, 32 * mb, 2) == pytest.approx(2e-4 + 32e-3)
    assert network.all_reduce(link, 32 * mb, 16) == pytest.approx(30e-4 + 30 / 16 * 32e-3)
    assert network.all_gather(link, 1 * mb, 2) == pytest.approx(1e-4 + 1e-3)
    assert network.all_gather(link, 1 * mb, 16) == pytest.approx(15e-4 + 15e-3)
    # A 32x smaller payload (sign) wins at 2 workers by ~32x; at 16 the all-gather's growth eats most of it.
    gain2 = network.all_reduce(link, 32 * mb, 2) / network.all_gather(link, mb, 2)
    gain16 = network.all_reduce(link, 32 * mb, 16) / network.all_gather(link, mb, 16)
    assert gain2 > 25 and gain16 < 5
    assert network.all_gather(link, mb, 1) == 0.0


def test_link_rejects_nonsense() -> None:
    with pytest.raises(ValueError, match="bandwidth=-1"):
        Link(-1)
    with pytest.raises(ValueError, match="latency"):
        Link(1e9, latency=-1.0)
    assert Link(1e9).beta == pytest.approx(1e9 / 8 / network.WIRE_OVERHEAD)
    assert math.isclose(Link(None, unbounded_bytes_per_s=3e9).beta, 3e9)
