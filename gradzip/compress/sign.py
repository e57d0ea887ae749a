"""EF-SignSGD (Karimireddy et al. 2019): ``C(p) = (|p|_1 / d) * sign(p)``, one bit per element.

Majority vote (Bernstein et al. 2018) aggregates ``sign(sum_i sign(p_i))``; gradzip scales it by the mean of
the workers' scales so the same learning rate works for both aggregations.
"""

from __future__ import annotations

import functools
from typing import Any

import torch

from gradzip.compress import elementwise_kernels as kernels
from gradzip.compress.base import Capabilities, Compressor, compensate_into
from gradzip.compress.fusion import Segments


@functools.cache
def _bits(device: torch.device) -> torch.Tensor:
    """Bit weights, least significant first (the order of a SIMD sign mask, which the C kernel stores as is);
    one copy per device rather than one upload per call."""
    return torch.tensor([1, 2, 4, 8, 16, 32, 64, 128], dtype=torch.uint8, device=device)


def pack_bits(positive: torch.Tensor) -> torch.Tensor:
    """Booleans ``[..., n]`` -> uint8 ``[..., ceil(n / 8)]``, eight per byte (least significant first); pads
    each row's tail with zeros."""
    n, lead = positive.shape[-1], positive.shape[:-1]
    padded = torch.zeros((*lead, -(-n // 8) * 8), dtype=torch.uint8, device=positive.device)
    padded[..., :n] = positive
    return (padded.view(*lead, -1, 8) * _bits(positive.device)).sum(-1, dtype=torch.uint8)


def unpack_bits(packed: torch.Tensor, n: int) -> torch.Tensor:
    """uint8 ``[..., nbytes]`` -> booleans ``[..., n]``."""
    bits = packed.unsqueeze(-1).bitwise_and(_bits(packed.device)).ne(0)
    return bits.flatten(-2)[..., :n]


class ScaledSign(Compressor):
    name = "sign"
    caps = Capabilities(summable=False, fixed_size=True, reveals_nonfinite=True)  # the scale

    def __init__(self, majority_vote: bool = False, seed: int = 0) -> None:
        super().__init__(seed)
        self.majority_vote = majority_vote

    def payload_spec(self, numel: int) -> list[tuple[torch.dtype, int]]:
        return [(torch.float32, 1), (torch.uint8, -(-numel // 8))]

    def encode(self, x: torch.Tensor) -> tuple[list[torch.Tensor], Any]:
        return self._pack(x, None)

    def encode_sum(
        self, e: torch.Tensor, g: torch.Tensor, out: torch.Tensor
    ) -> tuple[list[torch.Tensor], Any]:
        return self._pack(out, (e, g))

    def _pack(
        self, x: torch.Tensor, add: tuple[torch.Tensor, torch.Tensor] | None
    ) -> tuple[list[torch.Tensor], Any]:
        # One sweep in C on the CPU (the compensation x = e + g, the bits and the float64 sum of magnitudes
        # together), else torch.
        n = x.numel()
        fast = kernels.sign_pack(x, add)
        if fast is not None:
            total, bits = fast
            # Rounded once from float64, as the torch path does; an empty tensor's (a part of a tensor smaller
            # than the number of parts) mean magnitude is 0, not the NaN of an empty mean.
            scale = torch.tensor([total / n if n else 0.0], dtype=torch.float32)
            return [scale, bits], None
        if add is not None:
            compensate_into(*add, x)
        # vector_norm, as torch._foreach_norm in the bucket form computes it: the same sum, the same bits
        total_t = torch.linalg.vector_norm(x, 1, dtype=torch.float64)
        scale = (total_t / n if n else total_t).to(torch.float32).reshape(1)
        return [scale, pack_bits(x >= 0)], None

    def batch_rows(self, x: torch.Tensor) -> bool:
        return not kernels.serves(x)

    def _encode_rows_batched(
        self, x: torch.Tensor, streams: list[str], step: int
    ) -> tuple[list[torch.Tensor], Any]:
        m = x.shape[1]
        total = torch.linalg.vector_norm(x, 1, dim=1, keepdim=True, dtype=torch.float64)
        scale = (total / m if m else total).to(torch.float32)
        return [scale, pack_bits(x >= 0)], None

    bucket_granule = 64  # 64 sign bits: 8 bytes

    def encode_bucket(
        self,
        seg: Segments,
        xs: list[torch.Tensor],
        adds: list[torch.Tensor] | None,
        residual_into: list[torch.Tensor] | None,
        streams: list[str],
        step: int,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        # Padding -1: a zero bit, as pack_bits pads.
        x = seg.cat(xs, -1.0)
        if adds is not None:
            x.add_(seg.cat(adds))
        # One multi-tensor reduction for every scale (on the CPU, vector_norm per tensor: encode's own sum).
        totals = torch.stack(torch._foreach_norm(seg.views(x), 1, dtype=torch.float64))
        scale = (totals / seg.counts).to(torch.float32)
        positive = x >= 0
        if residual_into is not None:
            s = scale[seg.ids()]
            # p - scale * sign(p), each case exactly as residual_'s p - (+-1 * scale)
            torch._foreach_copy_(residual_into, seg.views(torch.where(positive, x - s, x + s)))
        return scale, pack_bits(positive)

    def aggregate_bucket(self, head: torch.Tensor, body: torch.Tensor, seg: Segments) -> torch.Tensor:
        world, ids = head.shape[0], seg.ids()
        out = torch.zeros(seg.total, dtype=seg.sum_dtype, device=body.device)
        if self.majority_vote:
            for w in range(world):
                out.add_(self._signs(body[w], seg.total))
            return torch.sign(out).mul_(head.mean(0)[ids])
        for w in range(world):  # one worker at a time, in rank order, as aggregate
            s = head[w][ids]
            out.add_(torch.where(unpack_bits(body[w], seg.total), s, -s))
        return out.mul_(1.0 / world)

    def _signs(self, bits: torch.Tensor, numel: int) -> torch.Tensor:
        return unpack_bits(bits, numel).to(torch.float32) * 2 - 1

    def decode(self, payload: list[torch.Tensor], ctx: Any, numel: int) -> torch.Tensor:
        scale, bits = payload
        return self._signs(bits, numel) * scale

    def residual_(self, p: torch.Tensor, payload: list[torch.Tensor], ctx: Any) -> torch.Tensor:
        scale = payload[0]
        if scale.device.type == "cpu" and kernels.sign_residual(p, float(scale[0])):
            return p
        return super().residual_(p, payload, ctx)

    def aggregate(
        self, gathered: list[torch.Tensor], numel: int, ctx: Any = None, out: torch.Tensor | None = None
    ) -> torch.Tensor:
        scales, bits = gathered
        if out is None:
            out = torch.empty(numel, dtype=torch.float32, device=bits.device)
        # Majority vote scales by the workers' mean scale; the C kernel takes it as a number.
        mean_scale = scales.mean() if self.majority_vote else None
        vote = None if mean_scale is None or out.device.type != "cpu" else float(mean_scale)
        if (not self.majority_vote or vote is not None) and kernels.sign_accumulate(out, scales, bits, vote):
            return out
        if mean_scale is None:
            return super().aggregate(gathered, numel, ctx, out)
        votes = torch.zeros(numel, dtype=torch.float32, device=out.device)
        for row in bits:  # one worker at a time: O(numel) memory whatever the worker count
            votes.add_(self._signs(row, numel))
        return torch.mul(torch.sign(votes), mean_scale, out=out)
