"""The parameter-server placements of DoubleSqueeze in real processes on gloo: dedicated servers against the
float64 update rule, their byte counts, and a server that dies."""

from __future__ import annotations

import math
import os
import threading
import time
from typing import Any

import pytest
import torch
from torch import nn

from gradzip.integrations.paramserver import PSWorker, ServerError, is_server, serve
from gradzip.reducers.parts import part_bounds
from tests.distributed import run_workers
from tests.reducers.test_doublesqueeze import (
    KEYS,
    REFERENCE,
    SHAPES,
    STEPS,
    aligned,
    assert_matches_rule,
    grads_of,
    reference,
)


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


@pytest.mark.parametrize("compressor", ["signsgd", "topk"])
def test_server_placement_step_equals_the_update_rule(compressor: str) -> None:
    workers, servers = 3, 2
    got = run_workers(_server, workers + servers, compressor, servers)
    ref = reference(workers, servers, compressor)
    assert_matches_rule(got, ref, workers)
    numels = [math.prod(s) for s in SHAPES]
    lengths = [
        aligned(compressor, [b - a for a, b in (part_bounds(n, servers)[s] for n in numels)])
        for s in range(servers)
    ]
    for step in range(STEPS):
        for rank in range(workers):
            assert got[rank][step]["sent"] == sum(32 + n for n in lengths)  # a 32-byte header and the parts
    for s in range(servers):
        result = got[workers + s]
        for k in KEYS:
            a, b = part_bounds(math.prod(SHAPES[KEYS.index(k)]), servers)[s]
            residual = result["state"]["residuals"][k].double()
            torch.testing.assert_close(residual, ref[-1]["d_s"][k][a:b], rtol=0, atol=1e-5)
        # One reply per worker per step, plus nothing else.
        assert result["bytes_sent"] == STEPS * workers * (32 + lengths[s])


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
