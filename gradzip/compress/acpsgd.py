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

from gradzip.compress.lowrank import LowRankReducer, expand_into, orthogonalize, times_left, times_right
from gradzip.reducer import Bucket, split_message


class ACPSGD(LowRankReducer):
    @property
    def p_step(self) -> bool:
        return (self.step - self.cfg.warmup_steps) % 2 == 0

    def launch(self, bucket: Bucket) -> Future[torch.Tensor]:
        self.begin(bucket)
        if self.warming_up:
            fut = self.all_reduce_mean(bucket)
            self.end(bucket)
            return fut
        plan = self.lowrank_plan(bucket)
        p_step = self.p_step
        bases, parts, sizes = [], [], []
        for i, (rows, cols, r) in zip(plan.compressed, plan.shapes, strict=True):
            key = bucket.keys[i]
            m = self.compensated(bucket, i, rows, cols)
            # The new residual M - (local approximation) is formed in M's own buffer: no temporary.
            if p_step:
                q = self.q.get(key)
                basis = orthogonalize(q if q is not None else self.initial_factor(m, cols, r))
                factor = times_right(m, basis)
                m.addmm_(factor, basis.T, alpha=-1)
            else:
                basis = orthogonalize(self.p[key])
                factor = times_left(m, basis)
                m.addmm_(basis, factor.T, alpha=-1)
            bases.append(basis)
            parts.append(factor.reshape(-1))
            sizes.append(factor.numel())
        parts += [bucket.grads[i].reshape(-1) for i in plan.raw]
        sizes += [bucket.grads[i].numel() for i in plan.raw]
        msg = torch.cat(parts) if parts else bucket.buffer.new_zeros(0)
        world, store = self.comm.world, (self.p if p_step else self.q)

        def finish(result: torch.Tensor) -> torch.Tensor:
            views = split_message(result.div_(world), sizes)
            n = len(plan.compressed)
            for view, basis, i, (rows, cols, r) in zip(
                views, bases, plan.compressed, plan.shapes, strict=False
            ):
                g = bucket.grads[i]
                factor = view.view(rows if p_step else cols, r).clone()
                store[bucket.keys[i]] = factor
                out = g.view(rows, cols)
                expand_into(out, factor, basis) if p_step else expand_into(out, basis, factor)
            for view, i in zip(views[n:], plan.raw, strict=True):
                bucket.grads[i].copy_(view.view_as(bucket.grads[i]))
            return bucket.buffer

        fut = self.deferred(bucket, self.comm.all_reduce(msg), finish)
        self.end(bucket)
        return fut
