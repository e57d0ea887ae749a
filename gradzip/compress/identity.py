"""No compression: the payload is the tensor itself (fp32) or its half-precision cast (fp16)."""

from __future__ import annotations

from typing import Any

import torch

from gradzip.compress.base import Capabilities, Compressor


class _Cast(Compressor):
    """A compressor whose ``encode`` is element-wise and draws nothing: one call serves every row."""

    def batch_rows(self, x: torch.Tensor) -> bool:
        return True

    def _encode_rows_batched(
        self, x: torch.Tensor, streams: list[str], step: int
    ) -> tuple[list[torch.Tensor], Any]:
        return self.encode(x)


class Identity(_Cast):
    name = "identity"
    caps = Capabilities(summable=True, fixed_size=True, unbiased=True)

    def payload_spec(self, numel: int) -> list[tuple[torch.dtype, int]]:
        return [(torch.float32, numel)]

    def encode(self, x: torch.Tensor) -> tuple[list[torch.Tensor], Any]:
        return [x.clone()], None  # a payload never aliases its input: error feedback reuses that buffer

    def decode(self, payload: list[torch.Tensor], ctx: Any, numel: int) -> torch.Tensor:
        return payload[0]


class Half(_Cast):
    name = "fp16"
    # A sum of halves is the half of the sum up to rounding: all-reduce it (the caller pre-divides by n).
    caps = Capabilities(summable=True, fixed_size=True)

    def payload_spec(self, numel: int) -> list[tuple[torch.dtype, int]]:
        return [(torch.float16, numel)]

    def encode(self, x: torch.Tensor) -> tuple[list[torch.Tensor], Any]:
        return [x.to(torch.float16)], None

    def decode(self, payload: list[torch.Tensor], ctx: Any, numel: int) -> torch.Tensor:
        return payload[0].to(torch.float32)
