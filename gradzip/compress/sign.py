"""EF-SignSGD (Karimireddy et al. 2019): ``C(p) = (|p|_1 / d) * sign(p)``, one bit per element.

Majority vote (Bernstein et al. 2018) aggregates ``sign(sum_i sign(p_i))``; gradzip scales it by the mean of
the workers' scales so the same learning rate works for both aggregations.
"""

from __future__ import annotations

import functools
from typing import Any

import torch

from gradzip.compress.base import Capabilities, Compressor


@functools.cache
def _bits(device: torch.device) -> torch.Tensor:
    """Bit weights, most significant first; one copy per device rather than one upload per call."""
    return torch.tensor([128, 64, 32, 16, 8, 4, 2, 1], dtype=torch.uint8, device=device)


def pack_bits(positive: torch.Tensor) -> torch.Tensor:
    """Booleans -> uint8, eight per byte (most significant first); pads the tail with zeros."""
    n = positive.numel()
    padded = torch.zeros(-(-n // 8) * 8, dtype=torch.uint8, device=positive.device)
    padded[:n] = positive.reshape(-1)
    return (padded.view(-1, 8) * _bits(positive.device)).sum(1, dtype=torch.uint8)


def unpack_bits(packed: torch.Tensor, n: int) -> torch.Tensor:
    """uint8 ``[..., nbytes]`` -> booleans ``[..., n]``."""
    bits = packed.unsqueeze(-1).bitwise_and(_bits(packed.device)).ne(0)
    return bits.flatten(-2)[..., :n]


class ScaledSign(Compressor):
    name = "sign"
    caps = Capabilities(summable=False, fixed_size=True)

    def __init__(self, majority_vote: bool = False, seed: int = 0) -> None:
        super().__init__(seed)
        self.majority_vote = majority_vote

    def payload_spec(self, numel: int) -> list[tuple[torch.dtype, int]]:
        return [(torch.float32, 1), (torch.uint8, -(-numel // 8))]

    def encode(self, x: torch.Tensor) -> tuple[list[torch.Tensor], Any]:
        # The mean magnitude; an empty tensor's (a part of a tensor smaller than the number of parts) is 0,
        # not the NaN of an empty mean.
        scale = (x.abs().mean() if x.numel() else x.new_zeros(())).reshape(1)
        return [scale, pack_bits(x >= 0)], None

    def _signs(self, bits: torch.Tensor, numel: int) -> torch.Tensor:
        return unpack_bits(bits, numel).to(torch.float32) * 2 - 1

    def decode(self, payload: list[torch.Tensor], ctx: Any, numel: int) -> torch.Tensor:
        scale, bits = payload
        return self._signs(bits, numel) * scale

    def aggregate(self, gathered: list[torch.Tensor], numel: int, ctx: Any = None) -> torch.Tensor:
        scales, bits = gathered
        if not self.majority_vote:
            return self.decode(gathered, None, numel).mean(0)
        votes = self._signs(bits, numel).sum(0)
        return torch.sign(votes) * scales.mean()
