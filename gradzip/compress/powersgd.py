"""PowerSGD (Vogels et al. 2019): one step of warm-started power iteration per SGD step.

    M = G + e;  P = M Q;  all-reduce-mean P;  P^ = orth(P);  Q = M^T P^;  all-reduce-mean Q
    gradient = P^ Q^T;  e = M - P^ Q^T;  Q is kept as next step's warm start

Two dependent all-reduces. The first (P) starts inside the backward hook for each bucket; the second needs
every bucket's P, so it runs when the last bucket arrives, issued in bucket order from this thread. Issuing
it from the first collective's completion callback (as torch's ``powerSGD_hook`` does) lets workers
interleave the two rounds of different buckets in different orders, which gloo reports as a size mismatch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.futures import Future

from gradzip.comm.collectives import Comm
from gradzip.compress.lowrank import (
    LowRankPlan,
    LowRankReducer,
    expand_into,
    orthogonalize,
    times_left,
    times_right,
)
from gradzip.config import LowRankConfig
from gradzip.reducer import Bucket, new_future, split_message


@dataclass
class _Pending:
    bucket: Bucket
    plan: LowRankPlan
    ms: list[torch.Tensor]
    p_round: Future[torch.Tensor]
    out: Future[torch.Tensor]
    phats: list[torch.Tensor] | None = None
    q_round: Future[torch.Tensor] | None = None


class PowerSGD(LowRankReducer):
    def __init__(self, cfg: LowRankConfig, comm: Comm) -> None:
        super().__init__(cfg, comm)
        self._pending: list[_Pending] = []  # buckets of this step whose second round has not run yet

    def launch(self, bucket: Bucket) -> Future[torch.Tensor]:
        self.begin(bucket)
        if self.warming_up:
            fut = self.all_reduce_mean(bucket)
            self.end(bucket)
            return fut
        plan = self.lowrank_plan(bucket)
        ms, ps = [], []
        for i, (rows, cols, r) in zip(plan.compressed, plan.shapes, strict=True):
            key = bucket.keys[i]
            m = self.compensated(bucket, i, rows, cols)
            q = self.q.get(key)
            if q is None:
                q = self.q[key] = self.initial_factor(m, cols, r)
            ms.append(m)
            ps.append(times_right(m, q).reshape(-1))
        ps += [bucket.grads[i].reshape(-1) for i in plan.raw]
        msg = torch.cat(ps) if ps else bucket.buffer.new_zeros(0)
        out = new_future(bucket.buffer)
        self._pending.append(_Pending(bucket, plan, ms, self.comm.all_reduce(msg), out))
        if bucket.is_last:
            self._finish_step()
        self.end(bucket)
        return out

    def _finish_step(self) -> None:
        world = self.comm.world
        # Round 2 for every bucket of this step, in bucket order, so every worker issues the same sequence.
        for pd in self._pending:
            plan = pd.plan
            sizes = [rows * r for rows, _, r in plan.shapes] + [pd.bucket.grads[i].numel() for i in plan.raw]
            parts = split_message(pd.p_round.wait().div_(world), sizes)
            for part, i in zip(parts[len(plan.compressed) :], plan.raw, strict=True):
                pd.bucket.grads[i].copy_(part.view_as(pd.bucket.grads[i]))
            pd.phats = [
                orthogonalize(part.view(rows, r))
                for part, (rows, _, r) in zip(parts, plan.shapes, strict=False)
            ]
            qs = [times_left(m, ph).reshape(-1) for m, ph in zip(pd.ms, pd.phats, strict=True)]
            if qs:
                pd.q_round = self.comm.all_reduce(torch.cat(qs))
        for pd in self._pending:
            if pd.q_round is not None:
                assert pd.phats is not None
                plan, bucket = pd.plan, pd.bucket
                sizes = [cols * r for _, cols, r in plan.shapes]
                parts = split_message(pd.q_round.wait().div_(world), sizes)
                for part, ph, m, i, (_, cols, r) in zip(
                    parts, pd.phats, pd.ms, plan.compressed, plan.shapes, strict=True
                ):
                    q = part.view(cols, r)
                    approx = expand_into(bucket.grads[i].view(m.shape), ph, q)
                    m.sub_(approx)  # the residual M - P^ Q^T, in the residual's own buffer
                    self.q[bucket.keys[i]] = q.clone()  # warm start
            pd.out.set_result(pd.bucket.buffer)
        self._pending = []
