"""Random-k: k entries chosen by an index stream seeded identically on every worker.

Because every worker picks the same indices, the values alone travel and add up with a plain all-reduce.
Indices are drawn with replacement (cheap, O(k)); a repeated index carries the same value twice, which
decoding by overwrite handles exactly.
"""

from __future__ import annotations

from typing import Any

import torch

from gradzip.compress.base import Capabilities, Compressor
from gradzip.compress.topk import k_of


class RandomK(Compressor):
    name = "randomk"
    caps = Capabilities(summable=True, fixed_size=True, shared_randomness=True)

    def __init__(self, density: float, seed: int = 0) -> None:
        super().__init__(seed)
        self.density = density

    def payload_spec(self, numel: int) -> list[tuple[torch.dtype, int]]:
        return [(torch.float32, k_of(self.density, numel))]

    def encode(self, x: torch.Tensor) -> tuple[list[torch.Tensor], Any]:
        idx = torch.randint(x.numel(), (k_of(self.density, x.numel()),), generator=self.generator)
        idx = idx.to(x.device)
        return [x[idx]], idx

    def decode(self, payload: list[torch.Tensor], ctx: Any, numel: int) -> torch.Tensor:
        (values,) = payload
        out = torch.zeros((*values.shape[:-1], numel), dtype=values.dtype, device=values.device)
        out[..., ctx] = values
        return out

    def residual_(self, p: torch.Tensor, payload: list[torch.Tensor], ctx: Any) -> torch.Tensor:
        return self.mask_sent_(p, ctx)  # what was sent is exactly p at the chosen indices

    def mask_sent_(self, t: torch.Tensor, ctx: Any) -> torch.Tensor:
        t[ctx] = 0
        return t
