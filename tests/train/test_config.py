"""A training run's options, validated before any worker starts."""

from __future__ import annotations

from typing import Any

import pytest

from gradzip.train.config import DEFAULT_STEPS, TrainConfig, steps_per_epoch, total_steps


def test_train_config_validates() -> None:
    cfg = TrainConfig(method="acpsgd", options={"rank": 2}, backend="gloo")
    assert cfg.steps == DEFAULT_STEPS and cfg.epochs is None
    assert cfg.options["rank"] == 2 and cfg.options["warmup_steps"] == 0  # completed with the defaults
    cases: list[tuple[dict[str, Any], str]] = [
        ({"method": "nope"}, "nope"),
        ({"method": "ssgd", "options": {"rank": 4}}, "rank"),
        ({"steps": 3, "epochs": 1.0}, "not both"),
        ({"steps": 0}, "steps"),
        ({"epochs": 0.0}, "epochs"),
        ({"workers": 0}, "workers"),
        ({"batch_size": 0}, "batch_size"),
        ({"lr": 0.0}, "lr"),
        ({"momentum": 1.0}, "momentum"),
        ({"backend": "mpi"}, "mpi"),
        ({"bucket_cap_mb": 0.0}, "bucket_cap_mb"),
        ({"timeout": 0.0}, "timeout"),
    ]
    for bad, needle in cases:
        kwargs: dict[str, Any] = {"backend": "gloo", **bad}
        with pytest.raises(ValueError, match=needle):
            TrainConfig(**kwargs)


def test_steps_per_epoch_is_equal_on_every_rank() -> None:
    assert steps_per_epoch(1437, 2, 32) == 718 // 32
    assert steps_per_epoch(10, 2, 32) == 1  # a batch larger than the shard shrinks to the shard
    with pytest.raises(ValueError, match="fewer than"):
        steps_per_epoch(1, 2, 32)
    cfg = TrainConfig(method="ssgd", epochs=2.5, batch_size=32, backend="gloo")
    assert total_steps(cfg, 1437, 2) == 55  # 2.5 * 22
    cfg = TrainConfig(method="ssgd", epochs=0.01, batch_size=32, backend="gloo")
    assert total_steps(cfg, 1437, 2) == 1  # rounded up, never zero


def test_data_split_and_worker_count_are_checked_before_training() -> None:
    assert TrainConfig(method="ssgd", data_split="noniid", backend="gloo").data_split == "noniid"
    with pytest.raises(ValueError, match="data_split='sorted'"):
        TrainConfig(method="ssgd", data_split="sorted", backend="gloo")
    with pytest.raises(ValueError, match="cannot take 7 workers"):
        TrainConfig(method="powergossip", options={"topology": "torus"}, workers=7, backend="gloo")
