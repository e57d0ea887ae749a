"""Top-k sparsification (Stich et al. 2018; Lin et al. 2018): keep the k entries of largest magnitude."""

from __future__ import annotations

import math
from typing import Any

import torch

from gradzip.compress.base import Capabilities, Compressor


def k_of(density: float, numel: int) -> int:
    """Entries a sparsifier sends of a tensor of ``numel``: at least one, at most all (none of an empty one:
    a part of a tensor smaller than the number of parts is empty)."""
    return min(numel, max(1, math.ceil(density * numel)))


def scatter_mean(values: torch.Tensor, indices: torch.Tensor, numel: int) -> torch.Tensor:
    """Mean over the leading (worker) dim of sparse tensors given as values and int indices.

    One worker at a time, in rank order: a worker's own indices are distinct, so no two additions of one
    call meet, and the sum's order is the same on every replica. (One call over all workers would let CUDA's
    atomics add overlapping entries in a different order on each replica, and the models drift apart.)"""
    out = torch.zeros(numel, dtype=values.dtype, device=values.device)
    for v, i in zip(values, indices, strict=True):
        out.index_add_(0, i.long(), v)
    return out / values.shape[0]


class TopK(Compressor):
    name = "topk"
    caps = Capabilities(summable=False, fixed_size=True)
    sparsifies = True

    def __init__(self, density: float, seed: int = 0) -> None:
        super().__init__(seed)
        self.density = density

    def payload_spec(self, numel: int) -> list[tuple[torch.dtype, int]]:
        k = k_of(self.density, numel)
        return [(torch.float32, k), (torch.int32, k)]

    def encode(self, x: torch.Tensor) -> tuple[list[torch.Tensor], Any]:
        idx = torch.topk(x.abs(), k_of(self.density, x.numel()), sorted=False).indices
        return [x[idx], idx.to(torch.int32)], idx

    def decode(self, payload: list[torch.Tensor], ctx: Any, numel: int) -> torch.Tensor:
        values, indices = payload
        out = torch.zeros((*values.shape[:-1], numel), dtype=values.dtype, device=values.device)
        return out.scatter_(-1, indices.long(), values)

    def aggregate(self, gathered: list[torch.Tensor], numel: int, ctx: Any = None) -> torch.Tensor:
        return scatter_mean(gathered[0], gathered[1], numel)

    def residual_(self, p: torch.Tensor, payload: list[torch.Tensor], ctx: Any) -> torch.Tensor:
        return self.mask_sent_(p, ctx)  # what was sent is exactly p at the chosen indices

    def mask_sent_(self, t: torch.Tensor, ctx: Any) -> torch.Tensor:
        t[ctx] = 0
        return t
