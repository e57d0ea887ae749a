"""ACP-SGD (Li et al. 2023): alternate between compressing to P and to Q, one all-reduce per step.

    P-step (even): Q^ = orth(Q);  P = M Q^;  e = M - P Q^^T;  all-reduce-mean P;  gradient = P Q^^T
    Q-step (odd):  P^ = orth(P);  Q = M^T P^; e = M - P^ Q^T;  all-reduce-mean Q;  gradient = P^ Q^T

with ``M = G + e`` and the factor from the previous step (the aggregated one) as the warm start. A step's
message depends only on local data and last step's factor, so it is launched inside the backward hook
(pipelining), and the factors of every matrix in the bucket plus its raw 1-D tensors go out as one fused
all-reduce (tensor fusion). The first Q is drawn from a generator seeded identically on every worker.
"""

from __future__ import annotations

import torch
from torch.futures import Future

from gradzip.compress.lowrank import (
    LowRankReducer,
    expand_into,
    left_factor_t,
    orthogonalize,
    right_factor_t,
)
from gradzip.reducer import Bucket


class ACPSGD(LowRankReducer):
    @property
    def p_step(self) -> bool:
        return (self.step - self.cfg.warmup_steps) % 2 == 0

    def launch(self, bucket: Bucket) -> Future[torch.Tensor]:
        self.begin(bucket)
        if self.warming_up:
            return self.uncompressed(bucket)
        plan = self.lowrank_plan(bucket)
        p_step = self.p_step
        msg, slots, raw = plan.message(bucket, [rows if p_step else cols for rows, cols, _ in plan.shapes])
        bases = []
        for i, slot, (rows, cols, r) in zip(plan.compressed, slots, plan.shapes, strict=True):
            key = bucket.keys[i]
            m = self.compensated(bucket, i, rows, cols)
            # The factor goes straight into its message slot; the new residual M - (local approximation)
            # is formed in M's own buffer. Both before the all-reduce starts to work on the message.
            if p_step:
                q = self.factor(self.q, key, m)
                basis = orthogonalize(q if q is not None else self.initial_factor(m, cols, r))
                p_t = right_factor_t(m, basis, slot)
                m.addmm_(p_t.T, basis.T, alpha=-1)
            else:
                p = self.factor(self.p, key, m)
                assert p is not None, f"Q-step for {key!r} without last step's P"
                basis = orthogonalize(p)
                q_t = left_factor_t(m, basis, slot)
                m.addmm_(basis, q_t, alpha=-1)
            bases.append(basis)
        world, store = self.comm.world, (self.p if p_step else self.q)

        def finish(result: torch.Tensor) -> torch.Tensor:
            result.div_(world)
            for slot, basis, i, (rows, cols, _) in zip(
                slots, bases, plan.compressed, plan.shapes, strict=True
            ):
                factor = slot.T.clone()  # the aggregated P (rows x r) or Q (cols x r): next step's warm start
                store[bucket.keys[i]] = factor
                out = bucket.grads[i].view(rows, cols)
                if p_step:
                    expand_into(out, factor, basis)
                else:
                    expand_into(out, basis, factor)
            plan.unpack_raw(bucket, raw)
            return bucket.buffer

        fut = self.deferred(bucket, self.comm.all_reduce(msg), finish)
        self.end(bucket)
        return fut
