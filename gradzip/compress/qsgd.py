"""QSGD (Alistarh et al. 2017): unbiased stochastic rounding of ``|v_j| / |v|_2`` to ``s`` levels.

    a = |v_j| / |v|_2 * s;  l = floor(a);  level = l + 1 with probability a - l, else l
    Q(v)_j = |v|_2 * sign(v_j) * level / s

Sign and level travel together as one int8 (``levels <= 127``), plus one float for the norm.
"""

from __future__ import annotations

from typing import Any

import torch

from gradzip.compress.base import Capabilities, Compressor


class QSGD(Compressor):
    name = "qsgd"
    caps = Capabilities(summable=False, fixed_size=True, unbiased=True)

    def __init__(self, levels: int, seed: int = 0) -> None:
        super().__init__(seed)
        self.levels = levels

    def payload_spec(self, numel: int) -> list[tuple[torch.dtype, int]]:
        return [(torch.float32, 1), (torch.int8, numel)]

    def encode(self, x: torch.Tensor) -> tuple[list[torch.Tensor], Any]:
        norm = x.norm().reshape(1)
        a = x.abs() / norm.clamp_min(torch.finfo(x.dtype).tiny) * self.levels
        floor = a.floor()
        u = torch.rand(x.shape, generator=self.rng(x.device), device=x.device, dtype=x.dtype)
        level = floor + (u < a - floor).to(x.dtype)
        return [norm, (torch.sign(x) * level).to(torch.int8)], None

    def decode(self, payload: list[torch.Tensor], ctx: Any, numel: int) -> torch.Tensor:
        norm, q = payload
        return q.to(torch.float32) * (norm / self.levels)
