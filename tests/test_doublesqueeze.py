"""DoubleSqueeze in real processes on gloo: both placements against the update rule of ALGORITHMS.md computed
here in float64 from the gathered worker inputs, byte counts, the default task, asynchrony and a dying server."""

from __future__ import annotations

import math
import os
import threading
import time
from typing import Any

import pytest
import torch
from torch import nn

import gradzip
from gradzip.comm.collectives import Comm
from gradzip.comm.doublesqueeze import part_bounds
from gradzip.comm.paramserver import PSWorker, ServerError, is_server, serve
from gradzip.reducer import Bucket
from gradzip.registry import get_spec, make_compressor
from tests.distributed import free_port, run_workers

SHAPES = [(6, 5), (7,), (3, 4, 2)]
KEYS = ["w", "b", "conv"]
STEPS = 3


def grads_of(rank: int, step: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(100 * step + rank)
    return [torch.randn(s, generator=g) for s in SHAPES]


# The compressors as ALGORITHMS.md writes them, in float64, independent of gradzip's code.
def c_sign(x: torch.Tensor) -> torch.Tensor:
    return x.abs().mean() * torch.where(x >= 0, 1.0, -1.0).to(x.dtype)


def c_topk(x: torch.Tensor, density: float = 0.25) -> torch.Tensor:
    k = max(1, math.ceil(density * x.numel()))
    out = torch.zeros_like(x)
    idx = x.abs().topk(k).indices
    out[idx] = x[idx]
    return out


REFERENCE = {"signsgd": (c_sign, {}), "topk": (c_topk, {"density": 0.25})}


def reference(n_workers: int, parts: int, compressor: str, server_ef: bool = True) -> list[dict[str, Any]]:
    """DoubleSqueeze step by step in float64: per step the output and every residual."""
    c = REFERENCE[compressor][0]
    d_w = {
        (i, k): torch.zeros(math.prod(s), dtype=torch.float64)
        for i in range(n_workers)
        for k, s in zip(KEYS, SHAPES, strict=True)
    }
    d_s = {k: torch.zeros(math.prod(s), dtype=torch.float64) for k, s in zip(KEYS, SHAPES, strict=True)}
    out = []
    for step in range(STEPS):
        gs = [grads_of(i, step) for i in range(n_workers)]
        result = {}
        for t, k in enumerate(KEYS):
            n = gs[0][t].numel()
            full = torch.zeros(n, dtype=torch.float64)
            for a, b in part_bounds(n, parts):
                cs = []
                for i in range(n_workers):
                    v = gs[i][t].reshape(-1)[a:b].double() + d_w[i, k][a:b]
                    cs.append(c(v))
                    d_w[i, k][a:b] = v - cs[-1]
                v = torch.stack(cs).mean(0) + d_s[k][a:b]
                full[a:b] = c(v)
                d_s[k][a:b] = v - full[a:b] if server_ef else 0.0
            result[k] = full
        out.append(
            {
                "out": result,
                "d_w": {kk: v.clone() for kk, v in d_w.items()},
                "d_s": {kk: v.clone() for kk, v in d_s.items()},
            }
        )
    return out


def _sharded(rank: int, world: int, compressor: str) -> list[dict[str, Any]]:
    options = REFERENCE[compressor][1]
    cfg = gradzip.make_config("doublesqueeze", compressor=compressor, **options)
    reducer = get_spec("doublesqueeze").build(cfg, Comm())
    seen = []
    for step in range(STEPS):
        bucket = Bucket.of(grads_of(rank, step), KEYS)
        sent = reducer.comm.stats.bytes_sent
        reducer.launch(bucket).wait()
        seen.append(
            {
                "out": {k: g.reshape(-1).clone() for k, g in zip(KEYS, bucket.grads, strict=True)},
                "d_w": {k: v.clone() for k, v in reducer.worker_ef.residuals.items()},  # type: ignore[attr-defined]
                "d_s": {k: v.clone() for k, v in reducer.server_ef.residuals.items()},  # type: ignore[attr-defined]
                "sent": reducer.comm.stats.bytes_sent - sent,
            }
        )
    return seen


class Params(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        for k, s in zip(KEYS, SHAPES, strict=True):
            self.register_parameter(k, nn.Parameter(torch.zeros(s)))


def _server(rank: int, world: int, compressor: str, servers: int) -> Any:
    model = Params()
    if is_server(servers):
        return serve()
    ps = PSWorker(model, servers=servers, compressor=compressor, **REFERENCE[compressor][1])
    seen = []
    for step in range(STEPS):
        for p, g in zip(model.parameters(), grads_of(rank, step), strict=True):
            p.grad = g
        sent = ps.stats.bytes_sent
        ps.step()
        seen.append(
            {
                "out": {k: p.grad.reshape(-1).clone() for k, p in model.named_parameters()},
                "d_w": {k: v.clone() for k, v in ps.ef.residuals.items()},
                "sent": ps.stats.bytes_sent - sent,
            }
        )
    ps.close()
    return seen


def aligned(compressor: str, numels: list[int]) -> int:
    """Bytes of one message carrying these parts: every payload segment padded to 8 bytes."""
    comp = make_compressor(compressor, **REFERENCE[compressor][1])
    return sum(-(-dt.itemsize * c // 8) * 8 for n in numels for dt, c in comp.payload_spec(n))


@pytest.mark.parametrize("compressor", ["signsgd", "topk"])
def test_sharded_step_equals_the_update_rule_and_sends_compressed_payloads_both_ways(compressor: str) -> None:
    world = 3
    got = run_workers(_sharded, world, compressor)
    ref = reference(world, world, compressor)
    numels = [math.prod(s) for s in SHAPES]
    width = max(
        aligned(compressor, [b - a for a, b in (part_bounds(n, world)[j] for n in numels)])
        for j in range(world)
    )
    for step in range(STEPS):
        for rank in range(world):
            seen = got[rank][step]
            for k in KEYS:
                torch.testing.assert_close(seen["out"][k].double(), ref[step]["out"][k], rtol=0, atol=1e-5)
                torch.testing.assert_close(
                    seen["d_w"][k].double(), ref[step]["d_w"][rank, k], rtol=0, atol=1e-5
                )
                a, b = part_bounds(seen["out"][k].numel(), world)[rank]
                # A worker's server residual covers its own part only.
                torch.testing.assert_close(
                    seen["d_s"][k].double(), ref[step]["d_s"][k][a:b], rtol=0, atol=1e-5
                )
                assert torch.equal(seen["out"][k], got[0][step]["out"][k]), (
                    "workers applied different updates"
                )
            # Pass 1 sends the n-1 other workers their parts, pass 2 this worker's server part to all.
            assert seen["sent"] == (world - 1) * width + width
    # Negative control: without the server's error compensation the reference differs, so the check can fail.
    plain = reference(world, world, compressor, server_ef=False)
    assert not torch.allclose(plain[-1]["out"]["w"], ref[-1]["out"]["w"], atol=1e-3)


@pytest.mark.parametrize("compressor", ["signsgd", "topk"])
def test_server_placement_step_equals_the_update_rule(compressor: str) -> None:
    workers, servers = 3, 2
    got = run_workers(_server, workers + servers, compressor, servers)
    ref = reference(workers, servers, compressor)
    numels = [math.prod(s) for s in SHAPES]
    lengths = [
        aligned(compressor, [b - a for a, b in (part_bounds(n, servers)[s] for n in numels)])
        for s in range(servers)
    ]
    for step in range(STEPS):
        for rank in range(workers):
            seen = got[rank][step]
            for k in KEYS:
                torch.testing.assert_close(seen["out"][k].double(), ref[step]["out"][k], rtol=0, atol=1e-5)
                torch.testing.assert_close(
                    seen["d_w"][k].double(), ref[step]["d_w"][rank, k], rtol=0, atol=1e-5
                )
                assert torch.equal(seen["out"][k], got[0][step]["out"][k]), (
                    "workers applied different updates"
                )
            assert seen["sent"] == sum(32 + n for n in lengths)  # a 32-byte header and the parts
    for s in range(servers):
        result = got[workers + s]
        for k in KEYS:
            a, b = part_bounds(math.prod(SHAPES[KEYS.index(k)]), servers)[s]
            residual = result["state"]["residuals"][k].double()
            torch.testing.assert_close(residual, ref[-1]["d_s"][k][a:b], rtol=0, atol=1e-5)
        # One reply per worker per step, plus nothing else.
        assert result["bytes_sent"] == STEPS * workers * (32 + lengths[s])


def _default_task(
    rank: int, world: int, runs: list[tuple[str, dict[str, Any], dict[str, Any]]], ports: list[int]
) -> Any:
    from gradzip.train.loop import TrainConfig, run_worker

    out = []
    for (method, options, extra), port in zip(runs, ports, strict=True):
        os.environ["MASTER_PORT"] = str(port)
        summary = run_worker(TrainConfig(method=method, options=options, quiet=True, backend="gloo", **extra))
        out.append(summary)
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


def _dying_server(rank: int, world: int) -> Any:
    model = Params()
    if is_server(1):
        threading.Timer(1.5, os._exit, (3,)).start()  # the server dies mid-run
        serve()
        return None
    ps = PSWorker(model, servers=1, compressor="signsgd", timeout=20)
    start = time.monotonic()
    try:
        for step in range(100_000):
            for p, g in zip(model.parameters(), grads_of(rank, step), strict=True):
                p.grad = g
            ps.step()
            time.sleep(0.005)
    except ServerError as err:
        return {"message": str(err), "rank": err.rank, "after_s": time.monotonic() - start}
    return {"message": "no error", "rank": None, "after_s": time.monotonic() - start}


def test_a_dying_server_fails_every_worker_with_an_error_naming_it() -> None:
    got = run_workers(_dying_server, 3, may_die=(2,), timeout=120)
    for r in got[:2]:
        assert r["rank"] == 2, r
        assert "parameter server 0 (rank 2)" in r["message"], r
        assert r["after_s"] < 1.5 + 20 + 5, r  # within the timeout


def test_hook_refuses_the_server_placements_and_bad_options() -> None:
    with pytest.raises(ValueError, match="unknown compressor 'powersgd'"):
        gradzip.make_config("doublesqueeze", compressor="powersgd")
    with pytest.raises(ValueError, match="has no option 'density'"):
        gradzip.make_config("doublesqueeze", compressor="signsgd", density=0.1)
    with pytest.raises(ValueError, match="placement must be sharded or server"):
        gradzip.make_config("doublesqueeze", placement="ring")
    with pytest.raises(ValueError, match="max_staleness"):
        gradzip.make_config("doublesqueeze-async", max_staleness=-1)
    for method, options in [("doublesqueeze", {"placement": "server"}), ("doublesqueeze-async", {})]:
        with pytest.raises(ValueError, match="dedicated server"):
            get_spec(method).build(gradzip.make_config(method, **options), None)  # type: ignore[arg-type]
