"""PowerGossip (Vogels et al. 2020): gossip of model differences compressed by low-rank power iteration.

For each edge (i, j) and each matrix parameter X (>2-D viewed as ``(shape[0], -1)``) the difference
``D = X_hi - X_lo`` (hi, lo: the larger and smaller rank of the edge, the same orientation at both ends) is
approximated by power iteration, one half-step per iteration, alternating sides:

    even iteration:  q = orthogonalize(v)   (cols x r)     odd iteration:  p = orthogonalize(v)  (rows x r)
                     send X_i q                                            send X_i^T p
                     P = X_hi q - X_lo q = D q                             Q = X_hi^T p - X_lo^T p = D^T p
                     X_lo += W_ij P q^T,  X_hi -= W_ij P q^T               X_lo += W_ij p Q^T, X_hi -= ...
                     v = P                                                 v = Q

Both ends hold both projections (their own and the received one), so they compute the same ``P`` or ``Q``
bit for bit: the vectors ``v`` stay identical at both ends without being sent, and the two moves are exactly
opposite, so the pair's sum and the global average are kept. The first ``v`` is drawn from a generator seeded
by the edge and the parameter name; with warm start the projection just received seeds the next iteration
(power iteration across steps), without it every iteration draws a fresh ``v`` from the edge's generator.
1-D parameters are gossiped uncompressed with the D-PSGD rule, once per step. No hyperparameter to tune.
"""

from __future__ import annotations

import zlib
from typing import Any

import torch
from torch import nn

from gradzip.compress.lowrank import orthogonalize
from gradzip.config import check
from gradzip.gossip.base import Gossip


def edge_generator(i: int, j: int, name: str, draw: int = 0) -> torch.Generator:
    """A generator both ends of edge (i, j) seed identically for parameter ``name`` (and ``draw``)."""
    lo, hi = min(i, j), max(i, j)
    seed = (lo * 1_000_003 + hi) * 0x9E3779B1 + zlib.crc32(name.encode()) * 0x85EBCA77 + draw
    return torch.Generator().manual_seed(seed % (1 << 63))


class PowerGossip(Gossip):
    method = "powergossip"

    def __init__(
        self,
        model: nn.Module,
        topology: Any = "ring",
        *,
        rank: int = 1,
        iterations: int = 1,
        warm_start: bool = True,
        **common: Any,
    ) -> None:
        """``common``: the options every gossip method takes (``process_group``, ``metrics``, ``timeout``,
        ``nan_policy``)."""
        super().__init__(model, topology, **common)
        for key, value in (("rank", rank), ("iterations", iterations)):
            ok = isinstance(value, int) and not isinstance(value, bool) and value >= 1
            check(ok, key, value, "an integer >= 1")
        self.rank_r, self.iterations, self.warm_start = rank, iterations, warm_start
        self.matrices = [name for name, p in self.params.items() if self.is_matrix(p)]
        self.vectors_1d = [name for name, p in self.params.items() if not self.is_matrix(p)]
        # The power-iteration vector of every (neighbour, matrix): identical at both ends of the edge.
        self.vectors: dict[int, dict[str, torch.Tensor]] = {j: {} for j in self.neighbours}
        self.iteration = 0  # power-iteration half-steps so far; its parity says which side v is on

    def _rank(self, x: torch.Tensor) -> int:
        return min(self.rank_r, *x.shape)

    def _draw(self, j: int, name: str, x: torch.Tensor, right: bool, draw: int) -> torch.Tensor:
        rows, cols = x.shape
        g = edge_generator(self.rank, j, name, draw)
        v = torch.randn(cols if right else rows, self._rank(x), generator=g, dtype=torch.float64)
        return v.to(dtype=x.dtype, device=x.device)

    def _vector(self, j: int, name: str, x: torch.Tensor, right: bool) -> torch.Tensor:
        """This iteration's orthonormal vector for edge (i, j) and matrix ``name``."""
        v = self.vectors[j].get(name) if self.warm_start else None
        if v is not None and (v.device != x.device or v.dtype != x.dtype):
            v = v.to(device=x.device, dtype=x.dtype)  # e.g. a checkpoint loaded with map_location="cpu"
        if v is None or not bool(v.any()):
            # First use, no warm start, or a zero projection (identical models): a fresh draw, the same at
            # both ends since it depends only on the edge, the parameter and the iteration.
            v = self._draw(j, name, x, right, self.iteration)
        return orthogonalize(v)

    def _mix(self) -> None:
        for it in range(self.iterations):
            self._power_step(raw=it == 0)

    def _power_step(self, raw: bool) -> None:
        right = self.iteration % 2 == 0  # even: v is the right vector q; odd: the left vector p
        xs = {name: self.as_matrix(self.params[name]) for name in self.matrices}
        basis = {j: {n: self._vector(j, n, x, right) for n, x in xs.items()} for j in self.neighbours}
        # Every projection is taken before any move, so all edges see the same X_i.
        own = {
            j: [x @ basis[j][n] if right else x.T @ basis[j][n] for n, x in xs.items()]
            for j in self.neighbours
        }
        ones = [self.params[n].detach().clone() for n in self.vectors_1d] if raw else []
        received = self.comm.exchange({j: [*own[j], *ones] for j in self.neighbours})

        moves = {name: torch.zeros_like(x) for name, x in xs.items()}
        for j in self.neighbours:
            w = self.weight(j)
            # Oriented hi minus lo at both ends; the lower end moves up the difference, the higher down.
            sign = 1.0 if self.rank < j else -1.0
            for k, name in enumerate(self.matrices):
                mine, theirs = own[j][k], received[j][k]
                proj = theirs - mine if self.rank < j else mine - theirs
                b = basis[j][name]
                moves[name].add_(proj @ b.T if right else b @ proj.T, alpha=sign * w)
                self.vectors[j][name] = proj
            for k, name in enumerate(self.vectors_1d if raw else []):
                p = self.params[name]
                p.add_(received[j][len(self.matrices) + k] - ones[k], alpha=w)
        for name, x in xs.items():
            x.add_(moves[name])
        self.iteration += 1

    def _state(self) -> dict[str, Any]:
        return {
            "iteration": self.iteration,
            "vectors": {j: {k: v.clone() for k, v in vs.items()} for j, vs in self.vectors.items()},
        }

    def _load_state(self, state: dict[str, Any]) -> None:
        self.iteration = int(state["iteration"])
        self.vectors = {int(j): {k: v.clone() for k, v in vs.items()} for j, vs in state["vectors"].items()}
