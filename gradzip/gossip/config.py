"""Options of the decentralized methods (``dpsgd``, ``choco``, ``powergossip``), validated on construction.

``topology`` is a registry name or the path to an edge-list file; whether it can take the run's worker count
(a torus of 7 cannot) is checked when the topology is built with ``n``, which ``gradzip train`` does before
starting any worker.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gradzip.config import MethodConfig, _check, opt
from gradzip.gossip.topology import TOPOLOGIES

_TOPOLOGY_HELP = (
    f"who talks to whom: {', '.join(TOPOLOGIES)}, or the path to an edge-list file ('i j' per line); "
    "Metropolis-Hastings mixing weights"
)


@dataclass
class GossipConfig(MethodConfig):
    topology: str = opt("ring", _TOPOLOGY_HELP)
    metrics: bool = opt(
        True,
        "all-reduce the consensus distance after every step (metrics only; false: neighbour messages only)",
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        _check(
            self.topology in TOPOLOGIES or Path(self.topology).is_file(),
            "topology",
            self.topology,
            f"one of {', '.join(TOPOLOGIES)} or the path to an existing edge-list file",
        )


@dataclass
class DPSGDConfig(GossipConfig):
    pass


@dataclass
class ChocoConfig(GossipConfig):
    compressor: str = opt(
        "signsgd",
        "compressor of the gossiped model differences: identity, fp16, signsgd, topk, randomk, qsgd",
    )
    gamma: float = opt(
        0.4,
        "Choco's consensus step size, in (0, 1]: 1 with identity (= dpsgd), smaller for coarser compressors",
    )
    density: float | None = opt(
        None, "the compressor's density (topk, randomk); default: the compressor's own"
    )
    levels: int | None = opt(None, "the compressor's levels (qsgd); default: the compressor's own")
    seed: int = opt(0, "seed of the compressor's own torch.Generator (streams differ per worker and tensor)")

    def __post_init__(self) -> None:
        super().__post_init__()
        _check(0.0 < self.gamma <= 1.0, "gamma", self.gamma, "in (0, 1]")
        from gradzip.registry import make_compressor

        make_compressor(self.compressor, **self.compressor_options())  # an unknown name or option fails here

    def compressor_options(self) -> dict[str, Any]:
        """The compressor's options to pass through: those set, refused if the compressor lacks them (the
        seed goes to every compressor that takes one)."""
        from gradzip.registry import compressor_options

        valid = compressor_options(self.compressor)
        for key, value in (("density", self.density), ("levels", self.levels)):
            if value is not None and key not in valid:
                raise ValueError(
                    f"compressor {self.compressor!r} has no option {key!r}; its options: {', '.join(valid) or '(none)'}"
                )
        given = {"density": self.density, "levels": self.levels, "seed": self.seed}
        return {k: v for k, v in given.items() if v is not None and k in valid}

    def to_dict(self) -> dict[str, Any]:
        # Options left to the compressor's default are left out: they were never set.
        return {k: v for k, v in super().to_dict().items() if v is not None}


@dataclass
class PowerGossipConfig(GossipConfig):
    rank: int = opt(1, "rank r of the low-rank factors; >= 1 (PowerGossip: of each edge's power iteration)")
    iterations: int = opt(1, "power-iteration half-steps (neighbour exchanges) per training step; >= 1")
    warm_start: bool = opt(True, "seed each power iteration with the last projection (false: a fresh draw)")

    def __post_init__(self) -> None:
        super().__post_init__()
        _check(self.rank >= 1, "rank", self.rank, "an integer >= 1")
        _check(self.iterations >= 1, "iterations", self.iterations, "an integer >= 1")


def build_gossip(method: str, model: Any, cfg: MethodConfig, **kwargs: Any) -> Any:
    """The gossip object of ``method`` for ``model`` with options ``cfg`` (``kwargs``: process group, timeout)."""
    from gradzip.gossip.choco import Choco
    from gradzip.gossip.dpsgd import DPSGD
    from gradzip.gossip.powergossip import PowerGossip

    if isinstance(cfg, ChocoConfig):
        return Choco(
            model, cfg.topology, compressor=cfg.compressor, gamma=cfg.gamma, metrics=cfg.metrics,
            **cfg.compressor_options(), **kwargs,
        )  # fmt: skip
    if isinstance(cfg, PowerGossipConfig):
        return PowerGossip(
            model, cfg.topology, rank=cfg.rank, iterations=cfg.iterations, warm_start=cfg.warm_start,
            metrics=cfg.metrics, **kwargs,
        )  # fmt: skip
    if isinstance(cfg, DPSGDConfig):
        return DPSGD(model, cfg.topology, metrics=cfg.metrics, **kwargs)
    raise ValueError(f"method {method!r} is not a gossip method")
