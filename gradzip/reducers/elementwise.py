"""Element-wise compressors over DDP buckets (``signsgd``, ``topk``, ``randomk``, ``qsgd``): all-reduce when
payloads are summable, else all-gather.

Per bucket: compressible matrices are error-compensated and encoded; 1-D tensors and matrices that would not
compress by ``min_compression_rate`` travel raw; everything goes out as ONE fused message per bucket.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch.futures import Future

from gradzip.comm.collectives import Comm
from gradzip.compress.base import Compressor, check_pairing, is_matrix_worth_it
from gradzip.compress.feedback import ErrorFeedback, Staged, Velocity, encode_with_feedback
from gradzip.compress.fusion import ByteLayout, split_message
from gradzip.reducers.reducer import Bucket, Reducer


@dataclass
class _Plan:
    compressed: list[int]
    raw: list[int]
    sizes: list[int]  # summable: float32 message segments, compressed payloads then raw tensors
    layout: ByteLayout | None  # all-gather: byte layout of the same segments


class ElementwiseReducer(Reducer):
    def __init__(
        self,
        compressor: Compressor,
        comm: Comm,
        min_rate: float,
        error_feedback: bool,
        momentum_correction: float = 0.0,
    ) -> None:
        super().__init__(comm)
        summable = compressor.caps.summable
        # Summable payloads fuse into a float32 all-reduce; the others are all-gathered, which needs a size
        # known in advance.
        pattern = "the all-reduce pattern" if summable else "the all-gather pattern"
        check_pairing(compressor, pattern, fixed_size=not summable, float32=summable)
        compressor.independent_per_rank(comm.rank)
        self.compressor = compressor
        self.min_rate = min_rate
        self.ef = ErrorFeedback() if error_feedback else None
        # DGC (Lin et al. 2018): with sparsified updates, optimizer momentum amplifies the rare large bursts
        # that error feedback releases; accumulating velocity u = m*u + g here instead, and masking the
        # entries just sent, keeps the effective update close to momentum SGD.
        self.velocity = Velocity(momentum_correction)

    def _make_plan(self, bucket: Bucket) -> _Plan:
        comp = self.compressor
        compressed: list[int] = []
        raw: list[int] = []
        for i, g in enumerate(bucket.grads):
            sent = ByteLayout(comp.payload_spec(g.numel())).nbytes  # with the alignment padding
            worth = is_matrix_worth_it(g.shape, sent, self.min_rate, g.element_size())
            (compressed if worth else raw).append(i)
        specs = [s for i in compressed for s in comp.payload_spec(bucket.grads[i].numel())]
        specs += [(torch.float32, bucket.grads[i].numel()) for i in raw]
        if comp.caps.summable:
            return _Plan(compressed, raw, [n for _, n in specs], None)
        return _Plan(compressed, raw, [], ByteLayout(specs))

    def staged_state(self) -> list[Staged]:
        return [self.velocity] + ([self.ef] if self.ef is not None else [])

    def generators(self) -> list[torch.Generator]:
        return [self.compressor.generator]

    def _with_momentum(self, bucket: Bucket, i: int) -> torch.Tensor:
        """The flat tensor to send for ``bucket.grads[i]``: the gradient, or its locally kept velocity."""
        return self.velocity(bucket.keys[i], bucket.grads[i].reshape(-1))

    def start(self, bucket: Bucket) -> Future[torch.Tensor]:
        plan: _Plan = self.plan(bucket, self._make_plan)
        comp, world = self.compressor, self.comm.world
        payloads: list[torch.Tensor] = []
        ctxs: list[Any] = []
        for i in plan.compressed:
            u = self._with_momentum(bucket, i)
            p = self.ef.compensate(bucket.keys[i], u) if self.ef else u
            payload, ctx = encode_with_feedback(
                comp, p, bucket.keys[i], self.step, residual=self.ef is not None,
                sent=u if self.velocity.momentum else None,
            )  # fmt: skip
            payloads += payload
            ctxs.append(ctx)
        payloads += [self._with_momentum(bucket, i) for i in plan.raw]
        nc = len(plan.compressed)

        if plan.layout is None:  # summable: one all-reduce, decode the sum
            msg = torch.cat(payloads) if payloads else bucket.buffer.new_zeros(0)

            def finish_sum(result: torch.Tensor) -> None:
                parts = split_message(result.div_(world), plan.sizes)
                for j, i in enumerate(plan.compressed):
                    g = bucket.grads[i]
                    g.copy_(comp.decode([parts[j]], ctxs[j], g.numel()).view_as(g))
                for part, i in zip(parts[nc:], plan.raw, strict=True):
                    bucket.grads[i].copy_(part.view_as(bucket.grads[i]))

            return self.defer(bucket, self.comm.all_reduce(msg), finish_sum)
        # not summable: all-gather every worker's payloads, aggregate them here
        layout = plan.layout
        msg = layout.pack(payloads, bucket.buffer.device)
        per = len(layout.specs) - len(plan.raw)
        width = per // nc if nc else 0

        def finish_gather(result: torch.Tensor) -> None:
            views = layout.views(result)
            for j, i in enumerate(plan.compressed):
                g = bucket.grads[i]
                agg = comp.aggregate(views[j * width : (j + 1) * width], g.numel())
                g.copy_(agg.view_as(g))
            for v, i in zip(views[per:], plan.raw, strict=True):
                bucket.grads[i].copy_(v.mean(0).view_as(bucket.grads[i]))

        return self.defer(bucket, self.comm.all_gather(msg), finish_gather)

    def state_dict(self) -> dict[str, Any]:
        sd = super().state_dict()
        sd["compressor"] = self.compressor.state_dict()
        sd["residuals"] = self.ef.state_dict() if self.ef else {}
        sd["velocity"] = self.velocity.state_dict()
        return sd

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        super().load_state_dict(sd)
        self.compressor.load_state_dict(sd["compressor"])
        if self.ef:
            self.ef.load_state_dict(sd["residuals"])
        self.velocity.load_state_dict(sd.get("velocity", {}))
