"""Every method trains the default task (MLP on the embedded digits) about as well as ssgd, through the one
training loop: every DDP-hook method on 2 workers, PowerGossip on a ring of 4, and DoubleSqueeze sharded, with
and without the server's error compensation, and asynchronous with a straggler."""

from __future__ import annotations

import os
from typing import Any

import pytest

import gradzip
from gradzip.train.config import TrainConfig
from gradzip.train.worker import run_worker
from tests.distributed import free_port, run_workers


def _run(cfg: TrainConfig, port: int) -> dict[str, Any] | None:
    """One run on this process's rank, on a fresh rendezvous; the summary as ``--json`` writes it (rank 0)."""
    os.environ["MASTER_PORT"] = str(port)
    summary = run_worker(cfg)
    return None if summary is None else summary.to_dict()


def _train_all(rank: int, world: int, methods: list[str], ports: list[int]) -> dict[str, Any]:
    out = {}
    for method, port in zip(methods, ports, strict=True):
        summary = _run(TrainConfig(method=method, workers=world, quiet=True, backend="gloo"), port)
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


def _train_both(rank: int, world: int, ports: list[int]) -> dict[str, Any]:
    out = {}
    runs = [("ssgd", {}), ("powergossip", {"topology": "ring", "metrics": False})]
    for (method, options), port in zip(runs, ports, strict=True):
        cfg = TrainConfig(method=method, options=options, workers=world, quiet=True, backend="gloo")
        summary = _run(cfg, port)
        if rank == 0:
            assert summary is not None
            out[method] = summary
    return out


def test_powergossip_on_a_ring_of_4_trains_within_3_points_of_ssgd() -> None:
    summaries = run_workers(_train_both, 4, [free_port(), free_port()], init=False, timeout=400)[0]
    ssgd, pg = summaries["ssgd"], summaries["powergossip"]
    report = {m: round(s["test_accuracy"], 4) for m, s in summaries.items()}
    assert ssgd["test_accuracy"] > 0.95, f"the baseline itself did not learn: {report}"
    assert pg["test_accuracy"] >= ssgd["test_accuracy"] - 0.03, report
    assert pg["topology"] == "ring" and pg["spectral_gap"] == pytest.approx(2 / 3)
    assert len(pg["worker_accuracies"]) == 4 and min(pg["worker_accuracies"]) > 0.9
    assert 0 < pg["consensus_distance"] < 1
    assert not pg["params_identical"] and pg["params_max_abs_diff"] > 0
    # With metrics off the step sends neighbour messages only; the history says so.
    assert all(h["consensus_distance"] is None for h in pg["history"])
    # Two neighbours, one rank-1 projection per matrix each: far less than the model to each of them.
    assert pg["compression_ratio"] > 10
    assert set(ssgd) - {"worker_train_time_s"} <= set(pg)


def _default_task(
    rank: int, world: int, runs: list[tuple[str, dict[str, Any], dict[str, Any]]], ports: list[int]
) -> Any:
    out = []
    for (method, options, extra), port in zip(runs, ports, strict=True):
        out.append(
            _run(TrainConfig(method=method, options=options, quiet=True, backend="gloo", **extra), port)
        )
    return out


def test_default_task_accuracy_server_error_feedback_and_asynchrony() -> None:
    runs: list[tuple[str, dict[str, Any], dict[str, Any]]] = [
        ("ssgd", {}, {"workers": 3}),
        ("doublesqueeze", {"compressor": "signsgd"}, {"workers": 3}),
        ("doublesqueeze", {"compressor": "signsgd", "server_error_feedback": False}, {"workers": 3}),
        # World of 4: three workers, one of them 3x slower, and one server.
        (
            "doublesqueeze-async",
            {"compressor": "signsgd", "max_staleness": 2},
            {"workers": 3, "straggler": "2:3"},
        ),
    ]
    # Every run needs its own world size: ssgd and the sharded runs use 3 processes, the async one 4.
    sync = run_workers(_default_task, 3, runs[:3], [free_port() for _ in range(3)], init=False, timeout=400)[
        0
    ]
    (async_run,) = run_workers(_default_task, 4, runs[3:], [free_port()], init=False, timeout=400)[0]
    ssgd, ds, ds_no_server_ef = (s["test_accuracy"] for s in sync)
    report = f"ssgd {ssgd:.4f}, doublesqueeze {ds:.4f}, without server EF {ds_no_server_ef:.4f}"
    assert ssgd > 0.95, report
    assert ds >= ssgd - 0.02, report
    assert ds >= ds_no_server_ef, report
    assert all(s["params_identical"] for s in sync)
    # Both passes compressed: far fewer bytes than fp32 in both directions.
    assert sync[1]["compression_ratio"] > 10
    assert sync[1]["bytes_received_per_step"] < sync[1]["bytes_uncompressed_per_step"] / 10

    print(report, f"async {async_run['test_accuracy']:.4f}, staleness {async_run['staleness']}")
    assert async_run["test_accuracy"] >= ssgd - 0.03
    # The fast workers ran ahead of the straggler (asynchronous), but never further than the bound.
    assert async_run["max_lead"] == 2
    assert max(async_run["staleness"]) > 0
    times = async_run["worker_train_time_s"]
    assert len(times) == 3
    assert async_run["params_identical"]  # every worker ends with the servers' authoritative model
