"""Random-k: k entries chosen by an index stream seeded identically on every worker.

Because every worker picks the same indices, the values alone travel and add up with a plain all-reduce.
Indices are drawn with replacement (O(k), where a permutation would cost O(numel) every step): a repeated
index carries its value twice, so about density/2 of the payload is duplicate, and density 1 covers ~63%.
"""

from __future__ import annotations

from typing import Any

import torch

from gradzip.compress.base import Capabilities, Compressor
from gradzip.compress.topk import k_of


class RandomK(Compressor):
    name = "randomk"
    caps = Capabilities(summable=True, fixed_size=True, shared_randomness=True)
    sparsifies = True

    def __init__(self, density: float, seed: int = 0) -> None:
        super().__init__(seed)
        self.density = density

    def payload_spec(self, numel: int) -> list[tuple[torch.dtype, int]]:
        return [(torch.float32, k_of(self.density, numel))]

    def shared_context(self, numel: int, device: torch.device) -> torch.Tensor:
        """The indices of the current stream: every worker draws the same ones."""
        k = k_of(self.density, numel)
        if k == 0:  # an empty tensor: nothing to draw (randint refuses an empty range)
            return torch.zeros(0, dtype=torch.long, device=device)
        return torch.randint(numel, (k,), generator=self.rng(device), device=device)

    def encode(self, x: torch.Tensor) -> tuple[list[torch.Tensor], Any]:
        idx = self.shared_context(x.numel(), x.device)
        return [x[idx]], idx

    def decode(self, payload: list[torch.Tensor], ctx: Any, numel: int) -> torch.Tensor:
        (values,) = payload
        out = torch.zeros((*values.shape[:-1], numel), dtype=values.dtype, device=values.device)
        # A repeated index appears twice in the payload; after an all-reduce its two sums may differ in the
        # last bit. Taking their max (not "whichever write lands last", which CUDA leaves open) gives every
        # replica the same value.
        index = ctx.expand(values.shape)
        return out.scatter_reduce_(-1, index, values, reduce="amax", include_self=False)

    def residual_(self, p: torch.Tensor, payload: list[torch.Tensor], ctx: Any) -> torch.Tensor:
        return self.mask_sent_(p, ctx)  # what was sent is exactly p at the chosen indices

    def mask_sent_(self, t: torch.Tensor, ctx: Any) -> torch.Tensor:
        t[ctx] = 0
        return t
