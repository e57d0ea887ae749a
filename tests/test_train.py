"""Training end to end on real worker processes (gloo, CPU): spawned by ``gradzip train``, started by
torchrun, and a worker that fails."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist

from gradzip.train.launch import WorkerError, _describe_failure, spawn, under_torchrun
from gradzip.train.loop import DEFAULT_STEPS, TrainConfig, steps_per_epoch, total_steps

SUMMARY_KEYS = {
    "method",
    "options",
    "workers",
    "steps",
    "final_loss",
    "test_accuracy",
    "time_per_step_s",
    "bytes_sent_per_step",
    "bytes_received_per_step",
    "bytes_uncompressed_per_step",
    "compression_ratio",
    "params_identical",
    "history",
}


def _env() -> dict[str, str]:
    env = dict(os.environ)
    # The launcher of a run under test must not believe it is itself a torchrun worker.
    for key in ("TORCHELASTIC_RUN_ID", "LOCAL_RANK", "WORLD_SIZE", "RANK"):
        env.pop(key, None)
    return env


def _train(tmp_path: Path, *args: str, timeout: float = 120) -> tuple[subprocess.CompletedProcess[str], Any]:
    out = tmp_path / "out.json"
    proc = subprocess.run(
        [sys.executable, "-m", "gradzip", "train", "--quiet", "--backend", "gloo", "--json", str(out), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=_env(),
    )
    assert proc.returncode == 0, proc.stderr
    return proc, json.loads(out.read_text())


def _check_summary(summary: dict[str, Any], method: str, steps: int, workers: int = 2) -> None:
    assert set(summary) >= SUMMARY_KEYS
    assert summary["method"] == method
    assert summary["workers"] == workers
    assert summary["steps"] == steps
    assert summary["params_identical"] is True
    assert len(summary["history"]) == steps
    assert [h["step"] for h in summary["history"]] == list(range(steps))
    assert all(set(h) == {"step", "loss", "time", "bytes_sent"} for h in summary["history"])
    assert summary["bytes_sent_per_step"] > 0
    assert summary["time_per_step_s"] > 0
    assert summary["compression_ratio"] == pytest.approx(
        summary["bytes_uncompressed_per_step"] / summary["bytes_sent_per_step"]
    )
    # Training worked: the loss fell from the ~ln(10) of an untrained 10-class model.
    assert summary["final_loss"] < summary["history"][0]["loss"]


def test_train_ssgd_end_to_end(tmp_path: Path) -> None:
    proc, summary = _train(tmp_path, "--steps", "30", "--workers", "2", "--method", "ssgd")
    _check_summary(summary, "ssgd", 30)
    assert summary["options"] == {}
    assert summary["test_accuracy"] >= 0.8
    # Plain fp32 all-reduce: sends exactly what it would send uncompressed.
    assert summary["compression_ratio"] == pytest.approx(1.0)
    # The human summary is on stdout.
    assert "test accuracy" in proc.stdout and "compression vs ssgd" in proc.stdout


def test_train_acpsgd_end_to_end(tmp_path: Path) -> None:
    _, summary = _train(tmp_path, "--steps", "30", "--workers", "2", "--method", "acpsgd", "--rank", "4")
    # Includes params_identical: every worker must apply the same decompressed update, bit for bit.
    _check_summary(summary, "acpsgd", 30)
    assert summary["options"]["rank"] == 4
    # Low-rank updates start slower than ssgd (~68% after 30 steps, ~99% after the default 300).
    assert summary["test_accuracy"] >= 0.5
    assert summary["compression_ratio"] > 3


def test_epochs_set_the_number_of_steps(tmp_path: Path) -> None:
    _, summary = _train(tmp_path, "--epochs", "1", "--batch-size", "64", "--method", "fp16")
    # digits: 1437 training samples, 718 per worker, 11 full batches of 64 each.
    n_train = round(summary["steps"] * 64 * 2 / summary["epochs"])
    assert summary["steps"] == steps_per_epoch(n_train, 2, 64)
    _check_summary(summary, "fp16", summary["steps"])


def test_under_torchrun(tmp_path: Path) -> None:
    out = tmp_path / "tr.json"
    proc = subprocess.run(
        [
            sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--standalone",
            "-m", "gradzip", "train", "--steps", "10", "--method", "ssgd", "--backend", "gloo", "--quiet",
            "--workers", "3", "--json", str(out),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        env=_env(),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(out.read_text())
    _check_summary(summary, "ssgd", 10)
    # --workers is ignored there, and said so once (by rank 0).
    assert proc.stderr.count("--workers 3 ignored under torchrun (WORLD_SIZE=2)") == 1
    # Only rank 0 prints the summary.
    assert proc.stdout.count("test accuracy") == 1


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
