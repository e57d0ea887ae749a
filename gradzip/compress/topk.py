"""Top-k sparsification (Stich et al. 2018; Lin et al. 2018): keep the k entries of largest magnitude."""

from __future__ import annotations

import functools
import math
from typing import Any

import torch

from gradzip.compress import elementwise_kernels as kernels
from gradzip.compress.base import Capabilities, Compressor, compensate_into

# The sampled selection (see ``sampled_topk``): the sample holds about this many entries above the
# threshold it estimates...
SAMPLE_TAIL = 128
# ...which is set so that about this many times k entries pass it; more than CAP times k is a miss.
MARGIN, CAP = 1.5, 3.0
RUN = 16  # consecutive entries per sampled position: one 64-byte cache line of float32


def k_of(density: float, numel: int) -> int:
    """Entries a sparsifier sends of a tensor of ``numel``: at least one, at most all (none of an empty one:
    a part of a tensor smaller than the number of parts is empty)."""
    return min(numel, max(1, math.ceil(density * numel)))


@functools.lru_cache(maxsize=256)
def _sample_positions(numel: int, size: int) -> torch.Tensor:
    """About ``size`` positions in ``[0, numel)`` (``numel >= 4 size``): a run of ``RUN`` consecutive ones at
    a seeded random offset in each of ``size / RUN`` equal strata. Spread over the whole tensor and never
    aligned with its rows (a plain stride could read one column only); a run is one cache line, where
    scattered single entries would each cost a miss. Fixed per shape, so a selection depends on the tensor
    alone."""
    strata = max(1, size // RUN)
    stride = numel // strata
    gen = torch.Generator().manual_seed(numel)
    starts = torch.arange(strata) * stride + torch.randint(stride - RUN + 1, (strata,), generator=gen)
    return (starts[:, None] + torch.arange(RUN)).flatten()


def sampled_topk(
    x: torch.Tensor, k: int, add: tuple[torch.Tensor, torch.Tensor] | None = None
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Indices (increasing) and values of the ``k`` entries of flat CPU float32 ``x`` of largest magnitude, or None where this does
    not apply or the estimate missed (the caller then runs ``torch.topk``). With ``add = (e, g)``, ``x = e +
    g`` first (error feedback's compensation), in the same sweep as the selection; ``x`` holds it either way.

    DGC's estimate (Lin et al. 2018): the magnitude exceeded by about ``MARGIN * k`` entries, read off a
    sample, is a threshold; one sweep (C) collects the entries at or above it, and a quickselect (C) keeps the
    k largest among those few. When at least k entries pass, every one of the k largest is among them, so the
    result is exactly ``torch.topk``'s set (up to ties at the k-th magnitude, which either may break; here
    the lower index wins): what is sent is exactly ``x`` at those indices, and error feedback's invariant
    holds unchanged."""
    n = x.numel()
    size = math.ceil(SAMPLE_TAIL * n / (MARGIN * k)) if k else n
    found = None
    # A sample of a quarter of the tensor, or a dense top-k, saves little over torch.topk.
    if size * 4 <= n and CAP * k < n and x.device.type == "cpu":
        pos = _sample_positions(n, size)
        sample = (add[0][pos] + add[1][pos] if add is not None else x[pos]).abs_()
        tail = math.ceil(MARGIN * k * pos.numel() / n)
        threshold = float(torch.topk(sample, tail, sorted=False).values.min())
        found = kernels.select_abs_ge(x, threshold, math.ceil(CAP * k), add)
    if found is None:
        if add is not None:
            compensate_into(*add, x)
        return None
    count, candidates, values = found
    if count < k or count > candidates.numel():
        return None  # too few pass (the estimate was high), or too many to hold (it was low)
    if bool(values.isnan().any()):
        return None  # torch.topk ranks a NaN first (only under nan_policy="off": the screen zeroes them)
    return kernels.keep_top(candidates, values, k)


def scatter_mean(
    values: torch.Tensor, indices: torch.Tensor, numel: int, out: torch.Tensor | None = None
) -> torch.Tensor:
    """Mean over the leading (worker) dim of sparse tensors given as values and int indices (into ``out``,
    flat, when given).

    One worker at a time, in rank order: a worker's own indices are distinct, so no two additions of one
    call meet, and the sum's order is the same on every replica. (One call over all workers would let CUDA's
    atomics add overlapping entries in a different order on each replica, and the models drift apart.)"""
    if out is None:
        out = torch.zeros(numel, dtype=values.dtype, device=values.device)
    else:
        out.zero_()
    # Each value is scaled as it is added: the mean without a second sweep over the dense result.
    for v, i in zip(values, indices, strict=True):
        out.index_add_(0, i.long(), v, alpha=1.0 / values.shape[0])
    return out


class TopK(Compressor):
    name = "topk"
    # A NaN or an Inf is always among the k largest magnitudes sent.
    caps = Capabilities(summable=False, fixed_size=True, reveals_nonfinite=True)
    sparsifies = True

    def __init__(self, density: float, seed: int = 0) -> None:
        super().__init__(seed)
        self.density = density

    def payload_spec(self, numel: int) -> list[tuple[torch.dtype, int]]:
        k = k_of(self.density, numel)
        return [(torch.float32, k), (torch.int32, k)]

    def encode(self, x: torch.Tensor) -> tuple[list[torch.Tensor], Any]:
        return self._select(x, None)

    def encode_sum(
        self, e: torch.Tensor, g: torch.Tensor, out: torch.Tensor
    ) -> tuple[list[torch.Tensor], Any]:
        return self._select(out, (e, g))

    def _select(
        self, x: torch.Tensor, add: tuple[torch.Tensor, torch.Tensor] | None
    ) -> tuple[list[torch.Tensor], Any]:
        k = k_of(self.density, x.numel())
        found = sampled_topk(x, k, add)
        if found is None:
            idx = torch.topk(x.abs(), k, sorted=False).indices
            return [x[idx], idx.to(torch.int32)], idx
        idx, values = found
        return [values, idx.to(torch.int32)], idx

    def batch_rows(self, x: torch.Tensor) -> bool:
        return x.device.type != "cpu"  # on the CPU, the sampled selection row by row

    def _encode_rows_batched(
        self, x: torch.Tensor, streams: list[str], step: int
    ) -> tuple[list[torch.Tensor], Any]:
        idx = torch.topk(x.abs(), k_of(self.density, x.shape[1]), dim=1, sorted=False).indices
        return [x.gather(1, idx), idx.to(torch.int32)], idx

    def residual_rows_(self, x: torch.Tensor, payload: list[torch.Tensor], ctx: Any) -> torch.Tensor:
        return self.mask_rows_(x, ctx)  # what was sent is exactly x at the chosen indices

    def mask_rows_(self, t: torch.Tensor, ctx: Any) -> torch.Tensor:
        if isinstance(ctx, torch.Tensor):  # batched: [rows, k] indices
            return t.scatter_(1, ctx, 0.0)
        return super().mask_rows_(t, ctx)

    def decode(self, payload: list[torch.Tensor], ctx: Any, numel: int) -> torch.Tensor:
        values, indices = payload
        out = torch.zeros((*values.shape[:-1], numel), dtype=values.dtype, device=values.device)
        return out.scatter_(-1, indices.long(), values)

    def aggregate(
        self, gathered: list[torch.Tensor], numel: int, ctx: Any = None, out: torch.Tensor | None = None
    ) -> torch.Tensor:
        return scatter_mean(gathered[0], gathered[1], numel, out)

    def residual_(self, p: torch.Tensor, payload: list[torch.Tensor], ctx: Any) -> torch.Tensor:
        return self.mask_sent_(p, ctx)  # what was sent is exactly p at the chosen indices

    def mask_sent_(self, t: torch.Tensor, ctx: Any) -> torch.Tensor:
        t[ctx] = 0
        return t
