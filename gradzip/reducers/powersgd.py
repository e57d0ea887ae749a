"""PowerSGD (Vogels et al. 2019): one step of warm-started power iteration per SGD step.

    M = G + e;  P = M Q;  all-reduce-mean P;  P^ = orth(P);  Q = M^T P^;  all-reduce-mean Q
    gradient = P^ Q^T;  e = M - P^ Q^T;  Q is kept as next step's warm start

Two dependent all-reduces. The first (P) starts inside the backward hook for each bucket; the second needs
every bucket's P, so it runs when the last bucket arrives, issued in bucket order from this thread (see
:mod:`gradzip.reducers.reducer` for why not from the first collective's completion callback).
"""

from __future__ import annotations

import torch
from torch.futures import Future

from gradzip.compress.fused import compensate_project_left, compensate_project_right, residual_expand
from gradzip.compress.fusion import split_message
from gradzip.compress.lowrank import orthogonalize
from gradzip.reducers.lowrank import LowRankReducer
from gradzip.reducers.reducer import Bucket


class PowerSGD(LowRankReducer):
    def start(self, bucket: Bucket) -> Future[torch.Tensor]:
        if not self.compressing():
            return self.uncompressed(bucket)
        plan = self.lowrank_plan(bucket)
        msg, p_slots, raw = plan.message(bucket, [rows for rows, _, _ in plan.shapes])
        ms = []
        for i, slot, (rows, cols, r) in zip(plan.compressed, p_slots, plan.shapes, strict=True):
            e, g, m = self.matrices(bucket, i, rows, cols)
            q = self.factor(self.q, bucket.keys[i], m)
            if q is None:  # kept only once the step goes ahead (finish)
                q = self.initial_factor(m, cols, r)
            compensate_project_right(e, g, q.T.contiguous(), slot, m)  # M = G + e; P^T = Q^T M^T
            ms.append(m)
        world = self.comm.world
        phats: list[torch.Tensor] = []
        q_slots: list[torch.Tensor] = []

        def second_round(p_result: torch.Tensor) -> Future[torch.Tensor] | None:
            p_result.div_(world)
            plan.unpack_raw(bucket, raw)
            if not ms:
                return None
            phats.extend(orthogonalize(slot.T) for slot in p_slots)
            sizes = [cols * r for _, cols, r in plan.shapes]
            q_msg = bucket.buffer.new_empty(sum(sizes))
            for part, m, ph, (_, cols, r) in zip(
                split_message(q_msg, sizes), ms, phats, plan.shapes, strict=False
            ):
                q_slots.append(compensate_project_left(m, None, ph, part.view(r, cols)))
            return self.comm.all_reduce(q_msg)

        def finish(q_result: torch.Tensor | None) -> None:
            if q_result is None:
                return
            q_result.div_(world)
            for q_t, ph, m, i in zip(q_slots, phats, ms, plan.compressed, strict=True):
                # G = P^ Q^T, and the residual M - P^ Q^T in the residual's own buffer, in one pass.
                residual_expand(m, ph, q_t, bucket.grads[i].view(m.shape))
                self.q[bucket.keys[i]] = q_t.T.clone()  # warm start

        return self.defer(bucket, self.comm.all_reduce(msg), finish, second_round)
