"""The method families' exchanges, in real processes: what decentralized training delivers to evaluate."""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from gradzip.train.exchange import averaged_model
from tests.distributed import run_workers


def _bn_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))


def _averaged(rank: int, world: int) -> dict[str, Any]:
    model = _bn_net()
    # Non-IID: each worker's inputs come from a distribution of its own, and its parameters have moved apart.
    g = torch.Generator().manual_seed(rank)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))
    for _ in range(3):
        model(torch.randn(16, 6, generator=g) * (1 + rank) + 3 * rank)  # training mode: updates the stats
    avg = averaged_model(model)
    own = {k: v.clone() for k, v in model.state_dict().items()}
    gathered = {}
    for k, v in own.items():
        every = [torch.empty_like(v) for _ in range(world)]
        dist.all_gather(every, v)
        gathered[k] = torch.stack(every)
    return {"avg": avg.state_dict(), "own": own, "gathered": gathered}


def test_the_averaged_model_averages_buffers_like_parameters() -> None:
    r = run_workers(_averaged, 2)[0]
    for key, every in r["gathered"].items():
        if every.is_floating_point():  # weights, biases, running mean and variance, averaged by hand
            by_hand = every.double().mean(0).to(every.dtype)
            torch.testing.assert_close(r["avg"][key], by_hand, rtol=0, atol=1e-6)
        else:  # the step count is the same everywhere
            assert torch.equal(r["avg"][key], every[0]) and torch.equal(every[0], every[1])
    # Negative control: the workers' statistics differ, so rank 0's own would not have passed.
    mean = "1.running_mean"
    assert not torch.allclose(r["own"][mean], r["avg"][mean], atol=1e-2)
