"""Decentralized training: topologies (unit), the three gossip methods in real processes on gloo (consensus
alone, in float64, against references computed here), training on the default task, and the CLI's refusals.

The multi-process checks are packed into few spawns: each spawn costs a torch import per process.
"""

from __future__ import annotations

import math
import os
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
from torch import nn

from gradzip.gossip import DPSGD, TOPOLOGIES, Choco, PowerGossip, make_topology
from gradzip.gossip.config import ChocoConfig, PowerGossipConfig
from gradzip.registry import get_spec, make_config
from gradzip.train.loop import TrainConfig, run_worker
from tests.distributed import free_port, run_workers

# ------------------------------------------------------------------------------------------- topologies


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


def test_gossip_options_are_validated() -> None:
    assert make_config("choco").to_dict() == {
        "topology": "ring",
        "metrics": True,
        "compressor": "signsgd",
        "gamma": ChocoConfig().gamma,
        "seed": 0,
    }
    assert make_config("choco", compressor="topk", density=0.1).compressor_options() == {
        "density": 0.1,
        "seed": 0,
    }
    cases: list[tuple[str, dict[str, Any], str]] = [
        ("choco", {"gamma": 0.0}, "gamma"),
        ("choco", {"compressor": "nope"}, "unknown compressor 'nope'"),
        ("choco", {"compressor": "signsgd", "levels": 4}, "no option 'levels'"),
        ("powergossip", {"rank": 0}, "rank"),
        ("powergossip", {"iterations": 0}, "iterations"),
        ("dpsgd", {"topology": "moebius"}, "moebius"),
    ]
    for method, options, needle in cases:
        with pytest.raises(ValueError, match=needle):
            make_config(method, **options)
    # A decentralized method is not a DDP hook, and says what to use instead.
    for method in ("dpsgd", "choco", "powergossip"):
        assert get_spec(method).kind == "gossip"
        with pytest.raises(ValueError, match="decentralized.*gradzip.gossip"):
            get_spec(method).build(make_config(method), None)
    assert PowerGossipConfig().rank == 1 and PowerGossipConfig().iterations == 1


def test_a_bad_topology_or_worker_count_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    from gradzip.cli import main

    for argv, needle in [
        (["--method", "powergossip", "--topology", "torus", "--workers", "7"], "cannot take 7 workers"),
        (["--method", "dpsgd", "--topology", "moebius"], "moebius"),
        (["--method", "ssgd", "--topology", "ring"], "--topology"),
        (["--data-split", "sorted"], "sorted"),
    ]:
        try:
            code = main(["train", "--backend", "gloo", *argv])
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
        out, err = capsys.readouterr()
        assert code == 2 and out == ""
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("gradzip: error: ") and needle in lines[0], err


def test_data_split_and_worker_count_are_checked_before_training() -> None:
    from gradzip.train.data import label_skew_epoch, label_skew_indices

    y = torch.arange(100) % 10
    shard = label_skew_epoch(y, 1, 4, seed=0, epoch=0)
    # The same fixed, label-skewed shard every epoch (only its order changes): 25 samples of 3 classes.
    assert sorted(shard.tolist()) == sorted(label_skew_indices(y, 1, 4, seed=0).tolist())
    assert sorted(label_skew_epoch(y, 1, 4, seed=0, epoch=1).tolist()) == sorted(shard.tolist())
    assert not torch.equal(label_skew_epoch(y, 1, 4, seed=0, epoch=1), shard)
    assert len(set(y[shard].tolist())) <= 3
    assert TrainConfig(method="ssgd", data_split="noniid", backend="gloo").data_split == "noniid"
    with pytest.raises(ValueError, match="data_split='sorted'"):
        TrainConfig(method="ssgd", data_split="sorted", backend="gloo")
    with pytest.raises(ValueError, match="cannot take 7 workers"):
        TrainConfig(method="powergossip", options={"topology": "torus"}, workers=7, backend="gloo")


# ---------------------------------------------------------------------------------- consensus, float64


def _models(rank: int) -> nn.Module:
    """Close models, as in training: a common random base plus a random rank-2 difference per worker (and a
    small random difference in the biases)."""
    common = torch.Generator().manual_seed(0)
    own = torch.Generator().manual_seed(100 + rank)
    model = nn.Sequential(nn.Linear(128, 192), nn.Linear(192, 96)).double()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=common, dtype=torch.float64))
            if p.dim() == 2:
                u = torch.randn(p.shape[0], 2, generator=own, dtype=torch.float64)
                v = torch.randn(p.shape[1], 2, generator=own, dtype=torch.float64)
                p.add_(0.1 * u @ v.T)
            else:
                p.add_(0.01 * torch.randn(p.shape, generator=own, dtype=torch.float64))
    return model


def _flat(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def _gathered(model: nn.Module) -> torch.Tensor:
    x = _flat(model)
    out = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(out, x)
    return torch.stack(out)


class _Lopsided(PowerGossip):
    """A broken PowerGossip (negative control): worker 0 moves 1.5 times as far as its neighbours do."""

    def weight(self, j: int) -> float:
        return super().weight(j) * (1.5 if self.rank == 0 else 1.0)


def _run(g: Any, model: nn.Module, steps: int, target: float | None = None) -> dict[str, Any]:
    """Gossip alone for ``steps`` steps; every step's drift of the average from the float64 mean of the start
    (computed here from every worker's model), consensus distance and bytes sent."""
    start = _gathered(model).mean(0)
    d0 = g.consensus_distance()
    drift, distance, sent, vectors = [], [], [], []
    for _ in range(steps):
        g.step()
        drift.append(float((_gathered(model).mean(0) - start).abs().max() / start.abs().max()))
        distance.append(g.last_consensus_distance / d0)
        sent.append(g.stats.bytes_sent)
        if isinstance(g, PowerGossip):
            vectors.append({j: {k: v.clone() for k, v in vs.items()} for j, vs in g.vectors.items()})
        if target is not None and distance[-1] < target:
            break
    return {"drift": drift, "distance": distance, "sent": sent, "vectors": vectors}


TARGET = 1e-3  # consensus distance to reach, relative to the start


def _consensus(rank: int, world: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    makers = {
        "dpsgd": lambda m: DPSGD(m, "ring"),
        # gamma 0.5: the fastest of 0.2, 0.5 and 1 for Choco on this consensus problem (1 does not converge).
        "choco": lambda m: Choco(m, "ring", compressor="signsgd", gamma=0.5),
        "powergossip": lambda m: PowerGossip(m, "ring"),
    }
    for name, make in makers.items():
        model = _models(rank)
        # Choco with signsgd needs many steps; past 150 its bytes already exceed PowerGossip's by far.
        out[name] = _run(make(model), model, 150, TARGET)
    model = _models(rank)
    out["lopsided"] = _run(_Lopsided(model, "ring"), model, 3)

    # D-PSGD on the complete graph is exact averaging in one step; on a ring it is not.
    for topology in ("complete", "ring"):
        model = _models(rank)
        mean = _gathered(model).mean(0)
        DPSGD(model, topology, metrics=False).step()
        out[f"dpsgd_{topology}_error"] = float((_flat(model) - mean).abs().max())

    # Choco with the identity compressor and gamma = 1 is D-PSGD (up to the float32 payload).
    a, b = _models(rank), _models(rank)
    choco, dpsgd = Choco(a, "ring", compressor="identity", gamma=1.0), DPSGD(b, "ring")
    for _ in range(5):
        choco.step()
        dpsgd.step()
    out["choco_identity_vs_dpsgd"] = float((_flat(a) - _flat(b)).abs().max())

    # State round trip: a fresh PowerGossip loaded with the state continues exactly like the original.
    a, b = _models(rank), _models(rank)
    g1, g2 = PowerGossip(a, "ring", metrics=False), PowerGossip(b, "ring", metrics=False)
    for _ in range(3):
        g1.step()
    b.load_state_dict(a.state_dict())
    g2.load_state_dict(g1.state_dict())
    g1.step()
    g2.step()
    out["resumed_equal"] = torch.equal(_flat(a), _flat(b))
    return out


def _bytes_to_reach(run: dict[str, Any]) -> float:
    """Bytes sent until the consensus distance first fell below TARGET (inf if it never did)."""
    hit = next((i for i, d in enumerate(run["distance"]) if d < TARGET), None)
    return math.inf if hit is None else run["sent"][hit]


def test_consensus_keeps_the_average_and_powergossip_needs_fewest_bytes() -> None:
    world = 4
    results = run_workers(_consensus, world, timeout=300)
    r0 = results[0]
    for name in ("dpsgd", "choco", "powergossip"):
        run = r0[name]
        # The global average is kept at every step, to float64 rounding ...
        assert max(run["drift"]) < 1e-13, f"{name} moved the average: {max(run['drift'])}"
        # ... and the models come together.
        assert run["distance"][-1] < 0.1 * run["distance"][0] < 1, name
    # The drift check can fail: a lopsided PowerGossip moves the average at once.
    assert min(r0["lopsided"]["drift"]) > 1e-6

    spent = {name: _bytes_to_reach(r0[name]) for name in ("dpsgd", "choco", "powergossip")}
    steps = {name: len(r0[name]["distance"]) for name in spent}
    print(f"\nbytes per worker to reach consensus distance {TARGET:g} x start (ring of {world}): ", end="")
    print(
        ", ".join(
            f"{n} {b:,.0f} ({steps[n]} steps)"
            if b < math.inf
            else f"{n} > {r0[n]['sent'][-1]:,} (not in {steps[n]} steps)"
            for n, b in spent.items()
        )
    )
    assert spent["powergossip"] < math.inf
    assert spent["powergossip"] < spent["dpsgd"]
    # Choco either reached it with more bytes, or spent more without reaching it.
    assert spent["powergossip"] < min(spent["choco"], r0["choco"]["sent"][-1])

    # Both ends of every edge hold identical power-iteration vectors after every step.
    topology = make_topology("ring", world)
    n_steps = len(r0["powergossip"]["vectors"])
    assert n_steps > 5
    for step in range(n_steps):
        for i, j in topology.edges:
            at_i, at_j = (
                results[i]["powergossip"]["vectors"][step][j],
                results[j]["powergossip"]["vectors"][step][i],
            )
            assert at_i.keys() == at_j.keys() == {"0.weight", "1.weight"}
            for name in at_i:
                assert torch.equal(at_i[name], at_j[name]), f"edge {(i, j)}, {name}, step {step}"
    # Not vacuous: the vectors are non-zero, change from step to step and differ from edge to edge.
    v = results[0]["powergossip"]["vectors"]
    assert all(bool(x.any()) for x in v[-1][1].values())
    assert not torch.equal(v[2][1]["0.weight"], v[4][1]["0.weight"])
    assert v[3][1]["0.weight"].shape == v[3][3]["0.weight"].shape
    assert not torch.equal(v[3][1]["0.weight"], v[3][3]["0.weight"])

    for r in results:
        assert r["dpsgd_complete_error"] < 1e-12, "dpsgd on the complete graph is not exact averaging"
        assert r["dpsgd_ring_error"] > 1e-3  # the negative control: one ring step is not
        assert r["choco_identity_vs_dpsgd"] < 1e-5
        assert r["resumed_equal"]


# ------------------------------------------------------------------------------------- default task


def _train_both(rank: int, world: int, ports: list[int]) -> dict[str, Any]:
    out = {}
    runs = [("ssgd", {}), ("powergossip", {"topology": "ring", "metrics": False})]
    for (method, options), port in zip(runs, ports, strict=True):
        os.environ["MASTER_PORT"] = str(port)  # a fresh rendezvous per run
        cfg = TrainConfig(method=method, options=options, workers=world, quiet=True, backend="gloo")
        summary = run_worker(cfg)
        if rank == 0:
            assert summary is not None
            out[method] = summary
    return out


def test_powergossip_on_a_ring_of_4_trains_within_3_points_of_ssgd() -> None:
    summaries = run_workers(_train_both, 4, [free_port(), free_port()], init=False, timeout=400)[0]
    ssgd, pg = summaries["ssgd"], summaries["powergossip"]
    report = {m: round(s["test_accuracy"], 4) for m, s in summaries.items()}
    assert ssgd["test_accuracy"] > 0.95, f"the baseline itself did not learn: {report}"
    assert pg["test_accuracy"] >= ssgd["test_accuracy"] - 0.03, report
    assert pg["topology"] == "ring" and pg["spectral_gap"] == pytest.approx(2 / 3)
    assert len(pg["worker_accuracies"]) == 4 and min(pg["worker_accuracies"]) > 0.9
    assert 0 < pg["consensus_distance"] < 1
    assert not pg["params_identical"] and pg["params_max_abs_diff"] > 0
    # With metrics off the step sends neighbour messages only; the history says so.
    assert all(h["consensus_distance"] is None for h in pg["history"])
    # Two neighbours, one rank-1 projection per matrix each: far less than the model to each of them.
    assert pg["compression_ratio"] > 10
    assert set(ssgd) - {"worker_train_time_s"} <= set(pg)


def _dead_neighbour(rank: int, world: int) -> str:
    from gradzip.comm.neighbours import NeighbourExchange

    exchange = NeighbourExchange(timeout=timedelta(seconds=1))
    got = exchange.exchange({1 - rank: [torch.full((3,), float(rank)), torch.ones(2, dtype=torch.int64)]})
    assert torch.equal(got[1 - rank][0], torch.full((3,), float(1 - rank)))
    assert exchange.stats.bytes_sent == exchange.stats.bytes_received == 3 * 4 + 4 + 2 * 8  # + alignment
    if rank == 1:
        time.sleep(3)  # alive but silent: rank 0's wait must end with an error, not hang
        return "silent"
    try:
        exchange.exchange({1: [torch.ones(3)]})
    except RuntimeError as err:
        return f"raised: {err}"
    return "returned"


def test_a_silent_neighbour_raises_instead_of_hanging() -> None:
    results = run_workers(_dead_neighbour, 2, timeout=60)
    assert results[0].startswith("raised: "), results
