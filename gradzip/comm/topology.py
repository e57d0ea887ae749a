"""Topologies for decentralized training: who talks to whom, and with which mixing weights.

A topology is an undirected connected graph on the workers ``0..n-1`` plus a mixing matrix ``W``:
``W_ij > 0`` only for neighbours (and the diagonal), symmetric and doubly stochastic, so that mixing
``x_i <- sum_j W_ij x_j`` keeps the average of the workers' models. gradzip uses Metropolis-Hastings
weights ``W_ij = 1 / (1 + max(d_i, d_j))``, which need only the degrees of the two ends and are symmetric
and doubly stochastic on any graph. How fast gossip mixes is the spectral gap ``1 - |lambda_2(W)|``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

Edge = tuple[int, int]


@dataclass(frozen=True)
class Topology:
    """An undirected connected graph on ``n`` workers; ``edges`` are ``(i, j)`` with ``i < j``, sorted."""

    name: str
    n: int
    edges: tuple[Edge, ...]
    _neighbours: tuple[tuple[int, ...], ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        adjacent: list[set[int]] = [set() for _ in range(self.n)]
        for i, j in self.edges:
            adjacent[i].add(j)
            adjacent[j].add(i)
        object.__setattr__(self, "_neighbours", tuple(tuple(sorted(a)) for a in adjacent))

    def neighbours(self, i: int) -> tuple[int, ...]:
        """Worker ``i``'s neighbours, ascending: the order every message loop walks them in."""
        return self._neighbours[i]

    def degree(self, i: int) -> int:
        return len(self._neighbours[i])

    def weight(self, i: int, j: int) -> float:
        """Metropolis-Hastings weight of edge (i, j): the same number at both ends, as a Python float."""
        return 1.0 / (1 + max(self.degree(i), self.degree(j)))

    @property
    def mixing_matrix(self) -> torch.Tensor:
        """``W`` in float64: MH weights off the diagonal, the rest of each row on it."""
        w = torch.zeros(self.n, self.n, dtype=torch.float64)
        for i, j in self.edges:
            w[i, j] = w[j, i] = self.weight(i, j)
        w += torch.diag(1.0 - w.sum(1))
        return w

    @property
    def spectral_gap(self) -> float:
        """``1 - max(|lambda_2|, |lambda_n|)`` of ``W``: 1 for the complete graph, O(1/n^2) for a ring."""
        if self.n == 1:
            return 1.0
        eig = torch.linalg.eigvalsh(self.mixing_matrix).abs().sort(descending=True).values
        return float(1.0 - eig[1])


def _ring(n: int) -> list[Edge]:
    # A ring of 2 is a single edge (0, 1), not two parallel ones: the set removes the duplicate.
    return sorted({(min(i, (i + 1) % n), max(i, (i + 1) % n)) for i in range(n) if n > 1})


def torus_shape(n: int) -> tuple[int, int]:
    """``(a, b)`` with ``a * b = n``, ``2 <= a <= b``, ``a`` as large as possible (as square as possible)."""
    for a in range(math.isqrt(n), 1, -1):
        if n % a == 0:
            return a, n // a
    composite = [m for m in range(4, 2 * n + 4) if any(m % a == 0 for a in range(2, math.isqrt(m) + 1))]
    near = sorted(sorted(composite, key=lambda m: (abs(m - n), m))[:4])
    raise ValueError(
        f"topology 'torus' cannot take {n} workers: a 2-D torus needs n = a*b with a, b >= 2 "
        f"(valid worker counts near {n}: {', '.join(map(str, near))})"
    )


def _torus(n: int) -> list[Edge]:
    a, b = torus_shape(n)
    edges = set()
    for r in range(a):
        for c in range(b):
            i = r * b + c
            # Right and down neighbours, wrapping; a side of 2 makes "up" and "down" the same worker.
            for j in (r * b + (c + 1) % b, ((r + 1) % a) * b + c):
                edges.add((min(i, j), max(i, j)))
    return sorted(edges)


def _exponential(n: int) -> list[Edge]:
    # Peers 2^0, 2^1, ... away on both sides (Assran et al. 2019's graph, undirected).
    edges = set()
    k = 1
    while k < n:
        for i in range(n):
            for j in ((i + k) % n, (i - k) % n):
                if j != i:
                    edges.add((min(i, j), max(i, j)))
        k *= 2
    return sorted(edges)


def _complete(n: int) -> list[Edge]:
    return [(i, j) for i in range(n) for j in range(i + 1, n)]


TOPOLOGIES: dict[str, Callable[[int], list[Edge]]] = {
    "ring": _ring,
    "torus": _torus,
    "exponential": _exponential,
    "complete": _complete,
}


def read_edge_list(path: str | Path) -> list[Edge]:
    """Edges from a text file, one ``i j`` pair per line; blank lines and ``#`` comments are skipped."""
    edges = []
    for lineno, line in enumerate(Path(path).read_text().splitlines(), 1):
        text = line.split("#", 1)[0].strip()
        if not text:
            continue
        parts = text.split()
        if len(parts) != 2 or not all(p.lstrip("-").isdigit() for p in parts):
            raise ValueError(
                f"edge list {str(path)!r}, line {lineno}: expected two integers 'i j', got {line!r}"
            )
        edges.append((int(parts[0]), int(parts[1])))
    return edges


def _check_edges(name: str, n: int, pairs: Iterable[Sequence[int]]) -> tuple[Edge, ...]:
    edges = set()
    for pair in pairs:
        if len(pair) != 2:
            raise ValueError(f"topology {name!r}: an edge is a pair (i, j), got {tuple(pair)!r}")
        i, j = int(pair[0]), int(pair[1])
        for v in (i, j):
            if not 0 <= v < n:
                raise ValueError(f"topology {name!r}: node {v} is out of range: nodes must be in 0..{n - 1}")
        if i == j:
            raise ValueError(f"topology {name!r}: self-loop ({i}, {j}); an edge joins two different workers")
        edges.add((min(i, j), max(i, j)))
    # Connected, or the average of the components would never meet: a breadth-first search from node 0.
    adjacent: list[list[int]] = [[] for _ in range(n)]
    for i, j in edges:
        adjacent[i].append(j)
        adjacent[j].append(i)
    seen, frontier = {0}, [0]
    while frontier:
        frontier = [j for i in frontier for j in adjacent[i] if j not in seen]
        seen.update(frontier)
    if len(seen) < n:
        cut = sorted(set(range(n)) - seen)
        raise ValueError(
            f"topology {name!r} is disconnected on {n} workers: nodes {cut[:8]} cannot reach node 0"
        )
    return tuple(sorted(edges))


def make_topology(spec: str | Path | Sequence[Sequence[int]] | Topology, n: int) -> Topology:
    """A topology on ``n`` workers from a registry name (``ring``, ``torus``, ``exponential``,
    ``complete``), a path to an edge-list file, a list of pairs, or a ``Topology`` (checked against ``n``).

    Raises ``ValueError`` naming the bad value: an unknown name, a worker count the topology cannot take, a
    disconnected graph, a self-loop or a node out of range."""
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"n={n!r} is invalid: a topology needs an integer number of workers >= 1")
    if isinstance(spec, Topology):
        if spec.n != n:
            raise ValueError(f"topology {spec.name!r} has {spec.n} workers, but the run has {n}")
        return spec
    if isinstance(spec, (str, Path)):
        name = str(spec)
        if name in TOPOLOGIES:
            return Topology(name, n, _check_edges(name, n, TOPOLOGIES[name](n)))
        if Path(name).is_file():
            return Topology(name, n, _check_edges(name, n, read_edge_list(name)))
        raise ValueError(
            f"unknown topology {name!r}: valid topologies are {', '.join(TOPOLOGIES)} "
            "or the path to an edge-list file ('i j' per line)"
        )
    return Topology("edges", n, _check_edges("edges", n, spec))
