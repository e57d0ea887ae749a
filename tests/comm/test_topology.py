"""Topologies for decentralized training: mixing weights, spectral gaps, shapes, edge lists and refusals."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch

from gradzip.comm.topology import TOPOLOGIES, make_topology
from gradzip.registry import make_config


# A torus needs a x b with a, b >= 2: 1, 2 and 3 workers are refused (tested below), not skipped.
@pytest.mark.parametrize(
    ("name", "n"),
    [
        (name, n)
        for name in sorted(TOPOLOGIES)
        for n in [1, 2, 3, 4, 6, 8, 9, 16]
        if name != "torus" or n >= 4
    ],
)
def test_mixing_weights_are_symmetric_and_doubly_stochastic(name: str, n: int) -> None:
    t = make_topology(name, n)
    w = t.mixing_matrix
    assert w.dtype == torch.float64
    assert torch.equal(w, w.T)
    ones = torch.ones(n, dtype=torch.float64)
    torch.testing.assert_close(w @ ones, ones, rtol=0, atol=1e-15)
    assert (w >= 0).all()
    # Non-zero off the diagonal exactly on the edges, and every worker's neighbours are the graph's.
    off = {(i, j) for i in range(n) for j in range(i + 1, n) if w[i, j] > 0}
    assert off == set(t.edges)
    for i in range(n):
        assert all(i in t.neighbours(j) for j in t.neighbours(i))
    assert 0 < t.spectral_gap <= 1 + 1e-12


def test_spectral_gaps_match_closed_forms() -> None:
    assert make_topology("complete", 8).spectral_gap == pytest.approx(1.0, abs=1e-12)
    for n in range(3, 13):
        # Ring with MH weights 1/3: eigenvalues (1 + 2 cos(2 pi k / n)) / 3.
        second = max(abs(1 + 2 * math.cos(2 * math.pi * k / n)) / 3 for k in range(1, n))
        assert make_topology("ring", n).spectral_gap == pytest.approx(1 - second, abs=1e-12)
    # Gossip mixes slower on a longer ring, faster on a torus of the same size.
    assert make_topology("ring", 16).spectral_gap < make_topology("torus", 16).spectral_gap < 1


def test_topology_shapes() -> None:
    assert make_topology("ring", 2).edges == ((0, 1),)  # one edge, not two parallel ones
    assert make_topology("ring", 5).neighbours(0) == (1, 4)
    torus = make_topology("torus", 12)  # 3 x 4
    assert all(torus.degree(i) == 4 for i in range(12))
    assert make_topology("torus", 8).degree(0) == 3  # 2 x 4: up and down are the same worker
    assert make_topology("exponential", 8).neighbours(0) == (1, 2, 4, 6, 7)
    assert len(make_topology("complete", 5).edges) == 10
    assert make_topology([(0, 1), (1, 2), (2, 0)], 3).edges == ((0, 1), (0, 2), (1, 2))


def test_edge_list_file(tmp_path: Path) -> None:
    path = tmp_path / "star.txt"
    path.write_text("# a star\n0 1\n0 2\n\n0 3  # the last leaf\n")
    t = make_topology(str(path), 4)
    assert t.edges == ((0, 1), (0, 2), (0, 3))
    assert make_config("powergossip", topology=str(path)).to_dict()["topology"] == str(path)
    (tmp_path / "bad.txt").write_text("0 1\n1 two\n")
    with pytest.raises(ValueError, match="line 2"):
        make_topology(str(tmp_path / "bad.txt"), 3)


@pytest.mark.parametrize(
    ("spec", "n", "needle"),
    [
        ("torus", 7, "cannot take 7 workers.*4, 6, 8, 9"),
        ("nosuch", 4, "unknown topology 'nosuch': valid topologies are ring, torus, exponential, complete"),
        ([(0, 1), (2, 3)], 4, r"disconnected on 4 workers: nodes \[2, 3\]"),
        ([(0, 1), (1, 2)], 4, r"disconnected.*\[3\]"),  # a worker with no edge
        ([(0, 1), (1, 1)], 2, "self-loop"),
        ([(0, 1), (1, 5)], 3, "node 5 is out of range: nodes must be in 0..2"),
    ],
)
def test_bad_topologies_are_refused(spec: Any, n: int, needle: str) -> None:
    with pytest.raises(ValueError, match=needle):
        make_topology(spec, n)
