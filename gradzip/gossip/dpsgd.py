"""D-PSGD (Lian et al. 2017): ``x_i <- sum_j W_ij x_j - lr * g_i``, uncompressed.

``step()`` runs after ``optimizer.step()``, so the local gradient step is already in ``x_i``; mixing the
stepped models is the "adapt then combine" order of D-PSGD (each worker sends its freshly stepped model),
which converges like the "combine then adapt" order of the paper and needs no copy of the old model.
"""

from __future__ import annotations

import torch

from gradzip.gossip.base import Gossip


class DPSGD(Gossip):
    method = "dpsgd"

    def _mix(self) -> None:
        params = list(self.params.values())
        # The whole model to every neighbour; the copies are what was sent, fixed before anyone mixes.
        mine = [p.detach().clone() for p in params]
        received = self.comm.exchange({j: mine for j in self.neighbours})
        # x_i + sum_j W_ij (x_j - x_i) = sum_j W_ij x_j with W_ii = 1 - sum_j W_ij: written as differences, the
        # pair (i, j) exchanges exactly opposite amounts, which is why the average is kept.
        delta = [torch.zeros_like(x) for x in mine]
        for j in self.neighbours:
            w = self.weight(j)
            for d, xj, xi in zip(delta, received[j], mine, strict=True):
                d.add_(xj - xi, alpha=w)
        for p, d in zip(params, delta, strict=True):
            p.add_(d)
