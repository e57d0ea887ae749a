"""Every method trains the default task (MLP on the embedded digits, 2 workers) about as well as ssgd."""

from __future__ import annotations

import os
from typing import Any

import gradzip
from gradzip.train.loop import TrainConfig, run_worker
from tests.distributed import free_port, run_workers


def _train_all(rank: int, world: int, methods: list[str], ports: list[int]) -> dict[str, Any]:
    out = {}
    for method, port in zip(methods, ports, strict=True):
        os.environ["MASTER_PORT"] = str(port)  # a fresh rendezvous per run
        summary = run_worker(TrainConfig(method=method, workers=world, quiet=True, backend="gloo"))
        if rank == 0:
            assert summary is not None
            out[method] = summary
    return out


def test_every_method_ends_within_two_points_of_ssgd() -> None:
    methods = gradzip.methods("hook")
    summaries = run_workers(_train_all, 2, methods, [free_port() for _ in methods], init=False, timeout=400)[
        0
    ]
    ssgd = summaries["ssgd"]["test_accuracy"]
    assert ssgd > 0.95, f"the baseline itself did not learn: {ssgd}"
    report = {m: round(s["test_accuracy"], 4) for m, s in summaries.items()}
    for method, s in summaries.items():
        assert s["params_identical"], f"{method}: workers diverged"
        assert s["test_accuracy"] >= ssgd - 0.02, f"{method} is more than 2 points below ssgd: {report}"
        if method != "ssgd":
            assert s["compression_ratio"] > 1.5, f"{method} did not compress: {s['compression_ratio']}"
