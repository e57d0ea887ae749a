"""PowerSGD (Vogels et al. 2019): one step of warm-started power iteration per SGD step.

    M = G + e;  P = M Q;  all-reduce-mean P;  P^ = orth(P);  Q = M^T P^;  all-reduce-mean Q
    gradient = P^ Q^T;  e = M - P^ Q^T;  Q is kept as next step's warm start

Two dependent all-reduces. The first (P) starts inside the backward hook for each bucket; the second needs
every bucket's P, so it runs when the last bucket arrives, issued in bucket order from this thread. Issuing
it from the first collective's completion callback (as torch's ``powerSGD_hook`` does) lets workers
interleave the two rounds of different buckets in different orders, which gloo reports as a size mismatch.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch.futures import Future

from gradzip.comm.collectives import Comm
from gradzip.compress.fused import compensate_project_left, compensate_project_right, residual_expand
from gradzip.compress.lowrank import LowRankPlan, LowRankReducer, orthogonalize
from gradzip.config import LowRankConfig
from gradzip.reducer import Bucket, new_future, split_message


@dataclass
class _Pending:
    bucket: Bucket
    plan: LowRankPlan
    ms: list[torch.Tensor]
    p_round: Future[torch.Tensor]
    p_slots: list[torch.Tensor]  # P^T of each matrix, inside the first message
    raw: list[torch.Tensor]
    out: Future[torch.Tensor]
    phats: list[torch.Tensor] = field(default_factory=list)
    q_round: Future[torch.Tensor] | None = None
    q_slots: list[torch.Tensor] = field(default_factory=list)


class PowerSGD(LowRankReducer):
    def __init__(self, cfg: LowRankConfig, comm: Comm) -> None:
        super().__init__(cfg, comm)
        self._pending: list[_Pending] = []  # buckets of this step whose second round has not run yet

    def abort_step(self) -> None:
        super().abort_step()
        self._pending = []

    def launch(self, bucket: Bucket) -> Future[torch.Tensor]:
        self.begin(bucket)
        if self.warming_up:
            return self.uncompressed(bucket)
        plan = self.lowrank_plan(bucket)
        msg, slots, raw = plan.message(bucket, [rows for rows, _, _ in plan.shapes])
        ms = []
        for i, slot, (rows, cols, r) in zip(plan.compressed, slots, plan.shapes, strict=True):
            key = bucket.keys[i]
            e, g = self.matrices(bucket, i, rows, cols)
            q = self.factor(self.q, key, e)
            if q is None:
                q = self.q[key] = self.initial_factor(e, cols, r)
            compensate_project_right(e, g, q.T.contiguous(), slot)  # M = G + e in e's buffer; P^T = Q^T M^T
            ms.append(e)
        out = new_future(bucket.buffer)
        self._pending.append(_Pending(bucket, plan, ms, self.comm.all_reduce(msg), slots, raw, out))
        if bucket.is_last:
            self._finish_step()
        self.end(bucket)
        return out

    def _finish_step(self) -> None:
        world = self.comm.world
        # Round 2 for every bucket of this step, in bucket order, so every worker issues the same sequence.
        for pd in self._pending:
            self.wait(pd.p_round).div_(world)
            pd.plan.unpack_raw(pd.bucket, pd.raw)
            pd.phats = [orthogonalize(slot.T) for slot in pd.p_slots]
            if pd.ms:
                sizes = [cols * r for _, cols, r in pd.plan.shapes]
                msg = pd.bucket.buffer.new_empty(sum(sizes))
                for part, m, ph, (_, cols, r) in zip(
                    split_message(msg, sizes), pd.ms, pd.phats, pd.plan.shapes, strict=False
                ):
                    pd.q_slots.append(compensate_project_left(m, None, ph, part.view(r, cols)))
                pd.q_round = self.comm.all_reduce(msg)
        for pd in self._pending:
            if pd.q_round is not None:
                self.wait(pd.q_round).div_(world)
                bucket = pd.bucket
                for q_t, ph, m, i in zip(pd.q_slots, pd.phats, pd.ms, pd.plan.compressed, strict=True):
                    # G = P^ Q^T, and the residual M - P^ Q^T in the residual's own buffer, in one pass.
                    residual_expand(m, ph, q_t, bucket.grads[i].view(m.shape))
                    self.q[bucket.keys[i]] = q_t.T.clone()  # warm start
            pd.out.set_result(pd.bucket.buffer)
        self._pending = []
