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

from gradzip.compress.fused import compensate_project_left, compensate_project_right, residual_expand
from gradzip.compress.lowrank import orthogonalize
from gradzip.reducers.lowrank import LowRankReducer
from gradzip.reducers.reducer import Bucket


class ACPSGD(LowRankReducer):
    @property
    def p_step(self) -> bool:
        return (self.step - self.cfg.warmup_steps) % 2 == 0

    def start(self, bucket: Bucket) -> Future[torch.Tensor]:
        if not self.compressing():
            return self.uncompressed(bucket)
        plan = self.lowrank_plan(bucket)
        p_step = self.p_step
        msg, slots, raw = plan.message(bucket, [rows if p_step else cols for rows, cols, _ in plan.shapes])
        # Per matrix: M (which becomes the new residual), the projection basis (transposed where it is the
        # right-hand factor), and this worker's own factor before the all-reduce overwrites its slot.
        work: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
        for i, slot, (rows, cols, r) in zip(plan.compressed, slots, plan.shapes, strict=True):
            key = bucket.keys[i]
            e, g, m = self.matrices(bucket, i, rows, cols)
            # M = G + e, and its projection, straight into the message slot.
            if p_step:
                q = self.factor(self.q, key, m)
                basis_t = orthogonalize(
                    q if q is not None else self.initial_factor(m, cols, r)
                ).T.contiguous()
                compensate_project_right(e, g, basis_t, slot, m)  # P^T = Q^T M^T
                work.append((m, basis_t, slot.clone()))
            else:
                p = self.factor(self.p, key, m)
                assert p is not None, f"Q-step for {key!r} without last step's P"
                basis = orthogonalize(p)
                compensate_project_left(e, g, basis, slot, m)  # Q^T = P^T M
                work.append((m, basis, slot.clone()))
        world, store = self.comm.world, (self.p if p_step else self.q)

        def finish(result: torch.Tensor) -> None:
            result.div_(world)
            for slot, (e, basis, mine), i, (rows, cols, _) in zip(
                slots, work, plan.compressed, plan.shapes, strict=True
            ):
                store[bucket.keys[i]] = slot.T.clone()  # the aggregated factor: next step's warm start
                out = bucket.grads[i].view(rows, cols)
                # One pass: the residual e = M - (own factor's approximation), and the gradient from the
                # aggregated factor.
                if p_step:  # e -= P_own Q^^T;  G = P Q^^T
                    residual_expand(e, mine.T, basis, out, slot.T, basis)
                else:  # e -= P^ Q_own^T;  G = P^ Q^T
                    residual_expand(e, basis, mine, out, basis, slot)
            plan.unpack_raw(bucket, raw)

        return self.defer(bucket, self.comm.all_reduce(msg), finish)
