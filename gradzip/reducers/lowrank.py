"""What the PowerSGD and ACP-SGD reducers share: the plan of a bucket, warm-started factors, state.

A parameter's gradient ``G`` is viewed as ``M = G.view(shape[0], -1)`` (conv kernels included). A matrix is
compressed at rank ``r' = min(r, rows, cols)`` when ``rows*cols >= min_compression_rate * r'*(rows+cols)``;
1-D tensors and the rest travel raw in the same message. The maths is in :mod:`gradzip.compress.lowrank`
and :mod:`gradzip.compress.fused`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from gradzip.comm.collectives import Comm
from gradzip.compress.base import is_matrix_worth_it
from gradzip.compress.feedback import ErrorFeedback, Staged
from gradzip.compress.fusion import split_message
from gradzip.compress.lowrank import matrix_shape
from gradzip.config import LowRankConfig
from gradzip.reducers.reducer import Bucket, Reducer


@dataclass
class LowRankPlan:
    compressed: list[int]
    shapes: list[tuple[int, int, int]]  # rows, cols, effective rank of each compressed matrix
    raw: list[int]
    raw_sizes: list[int]

    def message(
        self, bucket: Bucket, factor_rows: list[int]
    ) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
        """One flat message: a (r x n) slot per compressed matrix (n from ``factor_rows``), then the raw
        tensors, copied in. Returns the message, the factor slots and the raw slots."""
        sizes = [r * n for n, (_, _, r) in zip(factor_rows, self.shapes, strict=True)] + self.raw_sizes
        msg = bucket.buffer.new_empty(sum(sizes))
        parts = split_message(msg, sizes)
        slots = [part.view(r, n) for part, n, (_, _, r) in zip(parts, factor_rows, self.shapes, strict=False)]
        raw = parts[len(slots) :]
        for part, i in zip(raw, self.raw, strict=True):
            part.copy_(bucket.grads[i].reshape(-1))
        return msg, slots, raw

    def unpack_raw(self, bucket: Bucket, raw: list[torch.Tensor]) -> None:
        for part, i in zip(raw, self.raw, strict=True):
            bucket.grads[i].copy_(part.view_as(bucket.grads[i]))


class LowRankReducer(Reducer):
    """State and planning common to the low-rank methods; subclasses implement ``start``."""

    def __init__(self, cfg: LowRankConfig, comm: Comm) -> None:
        super().__init__(comm)
        self.cfg = cfg
        self.ef = ErrorFeedback()
        self.p: dict[str, torch.Tensor] = {}  # aggregated left factors (rows x r)
        self.q: dict[str, torch.Tensor] = {}  # aggregated right factors (cols x r)
        # Seeded identically on every worker: the first factor must agree everywhere.
        self.generator = torch.Generator()
        self.generator.manual_seed(cfg.seed)

    def compressing(self) -> bool:
        return self.step >= self.cfg.warmup_steps

    def staged_state(self) -> list[Staged]:
        return [self.ef]

    def generators(self) -> list[torch.Generator]:
        return [self.generator]

    def _make_plan(self, bucket: Bucket) -> LowRankPlan:
        compressed, shapes, raw = [], [], []
        for i, g in enumerate(bucket.grads):
            if g.ndim >= 2:
                rows, cols, r = matrix_shape(g.shape, self.cfg.rank)
                sent = r * (rows + cols) * g.element_size()
                if is_matrix_worth_it(g.shape, sent, self.cfg.min_compression_rate, g.element_size()):
                    compressed.append(i)
                    shapes.append((rows, cols, r))
                    continue
            raw.append(i)
        return LowRankPlan(compressed, shapes, raw, [bucket.grads[i].numel() for i in raw])

    def lowrank_plan(self, bucket: Bucket) -> LowRankPlan:
        plan: LowRankPlan = self.plan(bucket, self._make_plan)
        return plan

    def factor(self, store: dict[str, torch.Tensor], key: str, like: torch.Tensor) -> torch.Tensor | None:
        """A kept factor, moved to ``like``'s device and dtype if it was loaded from elsewhere."""
        f = store.get(key)
        if f is not None and (f.device != like.device or f.dtype != like.dtype):
            f = store[key] = f.to(device=like.device, dtype=like.dtype)
        return f

    def initial_factor(self, like: torch.Tensor, n: int, r: int) -> torch.Tensor:
        # Drawn in float32 on the CPU whatever ``like`` is, so every worker's stream is the same.
        return torch.randn(n, r, generator=self.generator).to(device=like.device, dtype=like.dtype)

    def matrices(
        self, bucket: Bucket, i: int, rows: int, cols: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The residual ``e``, the gradient ``G`` of tensor ``i`` and the buffer ``M``, as (rows x cols)
        matrices. The method forms ``M = G + e`` in ``M`` (a fused compensate-and-project), and must leave the
        new residual ``M - approximation`` in it before the step ends. ``M`` is ``e``'s own buffer, or a
        second one where the residuals are staged (``nan_policy="skip"``)."""
        g = bucket.grads[i]
        e, m = self.ef.compensation_buffers(bucket.keys[i], g)
        return e.view(rows, cols), g.view(rows, cols), m.view(rows, cols)

    def state_dict(self) -> dict[str, Any]:
        sd = super().state_dict()
        sd.update(
            residuals=self.ef.state_dict(),
            p={k: v.clone() for k, v in self.p.items()},
            q={k: v.clone() for k, v in self.q.items()},
            generator=self.generator.get_state(),
        )
        return sd

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        super().load_state_dict(sd)
        self.ef.load_state_dict(sd["residuals"])
        self.p = {k: v.clone() for k, v in sd["p"].items()}
        self.q = {k: v.clone() for k, v in sd["q"].items()}
        self.generator.set_state(sd["generator"])
