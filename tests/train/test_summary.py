"""What a run reports: time to a target accuracy, and the summary as ``--json`` writes it."""

from __future__ import annotations

import dataclasses

from gradzip.train.records import EvalRecord, StepRecord
from gradzip.train.summary import (
    GossipSection,
    RunSummary,
    ServerSection,
    TargetResult,
    final_loss,
    median_step_time,
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
        history=[StepRecord(0, 1.0, 0.01, 0.005, 0.001, consensus_distance=0.5)], **sections,  # type: ignore[arg-type]
    )  # fmt: skip


def test_the_json_is_flat_and_each_family_adds_its_own_keys() -> None:
    plain = _summary().to_dict()
    assert plain["compression_ratio"] == 4.0
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
