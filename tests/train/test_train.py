"""Training end to end on real worker processes (gloo, CPU): spawned by ``gradzip train`` and started by
torchrun, through the one training loop; the summary that ``--json`` writes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from gradzip.train.config import steps_per_epoch
from gradzip.train.data import load_dataset
from gradzip.train.models import build_model

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
    assert all(set(h) == {"step", "loss", "time", "bytes_sent", "skipped"} for h in summary["history"])
    assert summary["bytes_sent_per_step"] > 0
    assert summary["time_per_step_s"] > 0
    # The ratio's two sides counted independently of the code that divides them: uncompressed is the fp32
    # model (what a plain all-reduce sends), sent is what the steps' own byte counts add up to (the workers
    # of these methods send the same every step).
    data = load_dataset("digits")
    params = sum(
        p.numel() for p in build_model(summary["model"], data.input_shape, data.num_classes).parameters()
    )
    sent = sum(h["bytes_sent"] for h in summary["history"]) / steps
    assert summary["bytes_uncompressed_per_step"] == 4 * params
    assert summary["compression_ratio"] == pytest.approx(4 * params / sent)
    assert "target_accuracy" not in summary  # no target given, no time-to-target keys
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
