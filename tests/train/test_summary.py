"""What a run reports: time to a target accuracy, and the summary as ``--json`` writes it."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from gradzip.comm.collectives import CommStats, SoloComm
from gradzip.train.records import EvalRecord, StepRecord
from gradzip.train.summary import (
    GossipSection,
    RunSummary,
    ServerSection,
    TargetResult,
    final_loss,
    median_step_time,
    ring_bytes,
)


def test_time_to_target_is_the_first_evaluation_at_or_above_it() -> None:
    evals = [EvalRecord(10, 1.0, 0.5), EvalRecord(20, 2.0, 0.9), EvalRecord(30, 3.0, 0.8)]
    assert dataclasses.asdict(TargetResult.of(evals, 0.9)) == {
        "target_accuracy": 0.9,
        "time_to_target_s": 2.0,
        "steps_to_target": 20,
    }
    assert TargetResult.of(evals, 0.95).time_to_target_s is None


def _summary(**sections: object) -> RunSummary:
    return RunSummary(
        method="m", options={"rank": 2}, model="mlp", dataset="digits", workers=2, backend="gloo",
        batch_size=32, lr=0.1, momentum=0.9, seed=0, steps=2, epochs=0.1, data_split="iid", final_loss=0.5,
        test_accuracy=0.9, time_per_step_s=0.01, total_train_time_s=0.02, bytes_sent_per_step=100.0,
        bytes_received_per_step=100.0, bytes_uncompressed_per_step=400.0, params_identical=True,
        params_max_abs_diff=0.0, worker_train_time_s=[0.02, 0.03],
        history=[StepRecord(0, 1.0, 0.01, 0.005, 0.001, consensus_distance=0.5)],
        # 2 workers, all-reduces only: a ring moves 2(n-1)/n = 1x the payload on both sides.
        ring_bytes_per_step=100.0, ring_bytes_uncompressed_per_step=400.0, **sections,  # type: ignore[arg-type]
    )  # fmt: skip


def test_the_json_is_flat_and_each_family_adds_its_own_keys() -> None:
    plain = _summary().to_dict()
    assert plain["compression_ratio"] == 4.0 and plain["payload_compression_ratio"] == 4.0
    assert plain["history"] == [{"step": 0, "loss": 1.0, "time": 0.01, "bytes_sent": None, "skipped": False}]
    assert not {"target_accuracy", "servers", "staleness", "topology"} & set(plain)
    gossip = _summary(gossip=GossipSection("ring", 0.5, [0.8, 0.9], 1e-3)).to_dict()
    assert gossip["topology"] == "ring" and gossip["worker_accuracies"] == [0.8, 0.9]
    assert gossip["history"][0]["consensus_distance"] == 0.5
    sync = ServerSection.of([{"bytes_sent": 60, "bytes_received": 80}], servers=1, steps=2)
    assert sync.staleness is None
    synced = _summary(servers=sync).to_dict()
    assert (synced["servers"], synced["server_bytes_sent_per_step"]) == (1, 30.0)
    assert "staleness" not in synced  # the synchronous servers have none
    asynchronous = ServerSection.of(
        [
            {
                "bytes_sent": 60,
                "bytes_received": 80,
                "staleness": {"0": 1, "2": 3},
                "max_lead": 2,
                "max_staleness": 4,
            }
        ],
        servers=1,
        steps=2,
    )
    assert asynchronous.staleness == {0: 1, 2: 3} and asynchronous.mean_staleness == 1.5
    assert _summary(target=TargetResult(0.95, None, None)).to_dict()["time_to_target_s"] is None
    rows = dict(_summary(servers=asynchronous).rows())
    assert rows["max lead"] == "2 steps ahead of the slowest (bound 4)"
    assert rows["compression vs ssgd"] == "4.0x" and rows["sent per step"] == "100 B per worker"


def test_skipped_steps_have_no_loss_in_the_json_and_are_left_out_of_the_loss_and_the_step_time() -> None:
    nan = float("nan")
    assert final_loss([3.0] * 5 + [1.0] * 9 + [nan, 1.0]) == 1.0  # the last 10 that are numbers
    records = [StepRecord(i, 1.0, 1.0, 0.0, 0.0) for i in range(12)] + [
        StepRecord(12, nan, 9.0, 0.0, 0.0, skipped=True)
    ]
    assert median_step_time(records) == 1.0
    summary = _summary()
    summary.history = [StepRecord(0, nan, 0.01, 0.0, 0.0, skipped=True)]
    summary.skipped_steps = 1
    assert summary.to_dict()["history"][0]["loss"] is None
    assert summary.to_dict()["skipped_steps"] == 1
    assert dict(summary.rows())["skipped steps"].startswith("1 ")
    assert "skipped steps" not in dict(_summary().rows())


def _signsgd_at_8_workers() -> tuple[CommStats, int]:
    """What Sign-SGD's hook counts for one step at 8 workers: one all-gather of the 1-bit payload of a 4 MB
    gradient (bytes counted by the real ``Comm``), against a plain all-reduce of the gradient."""
    comm = SoloComm()
    comm.world = 8  # the counters as a worker of 8 records them; the transport stays the world of one
    gradient = 4_000_000
    comm.all_gather(torch.zeros(gradient // 32, dtype=torch.uint8))
    comm.stats.bytes_uncompressed += gradient  # what the reducer adds: a plain all-reduce's payload
    return comm.stats, gradient


def test_compression_ratio_counts_what_a_ring_moves_not_what_is_handed_to_the_collective() -> None:
    stats, gradient = _signsgd_at_8_workers()
    ring, reference = ring_bytes(stats, 8, "all_reduce")
    # A ring all-gather moves the 7 other workers' payloads through every worker; ssgd's ring all-reduce
    # moves 2·7/8 of the gradient.
    assert (ring, reference) == (7 * gradient / 32, 2 * 7 / 8 * gradient)
    summary = _summary()
    summary.workers = 8
    summary.bytes_sent_per_step, summary.bytes_uncompressed_per_step = (
        stats.bytes_sent,
        stats.bytes_uncompressed,
    )
    summary.ring_bytes_per_step, summary.ring_bytes_uncompressed_per_step = ring, reference
    assert summary.compression_ratio == pytest.approx(8.0)  # not 32x: that is the payload's ratio
    assert summary.payload_compression_ratio == pytest.approx(32.0)
    out = summary.to_dict()
    assert out["compression_ratio"] == pytest.approx(8.0) and out[
        "payload_compression_ratio"
    ] == pytest.approx(32.0)
    rows = dict(summary.rows())
    assert rows["compression vs ssgd"] == (
        "8.0x in bytes moved per worker (ring); 32.0x in payload handed to collectives"
    )
    assert (
        rows["sent per step"]
        == "125.0 kB per worker handed to collectives; a ring moves 875.0 kB through each worker"
    )
    # Negative control: all-reduce methods (and every method at 2 workers) have one ratio, shown once.
    assert dict(_summary().rows())["compression vs ssgd"] == "4.0x"
    two = CommStats(bytes_sent=gradient // 32, all_gather_bytes=gradient // 32, all_gather_calls=1,
                    bytes_uncompressed=gradient)  # fmt: skip
    ring2, reference2 = ring_bytes(two, 2, "all_reduce")
    assert reference2 / ring2 == pytest.approx(32.0) == gradient / two.bytes_sent


def test_point_to_point_references_travel_as_counted_and_a_bad_reference_is_refused() -> None:
    # Gossip and the parameter servers: their references (D-PSGD's messages, the fp32 push) are sent as is.
    stats = CommStats(bytes_sent=100, p2p_bytes_sent=100, p2p_sends=2, bytes_uncompressed=1000)
    assert ring_bytes(stats, 4, "sent") == (100, 1000)
    with pytest.raises(ValueError, match="reference='ring' is invalid"):
        ring_bytes(stats, 4, "ring")
    # Nothing counted (no ring bytes): no ratio rather than a division by zero.
    summary = _summary()
    summary.ring_bytes_per_step = 0.0
    assert summary.compression_ratio is None
