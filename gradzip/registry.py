"""The method registry: a dict from public names to what builds them.

Unknown names and options fail here, when a method is built, with the valid ones listed. Nothing below this
module needs it: the methods are built from their configs, and the integrations, the training loop, the CLI
and the benchmark find them by name here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import nn

from gradzip.comm.collectives import Comm
from gradzip.config import (
    COMPRESSORS,
    ChocoConfig,
    DoubleSqueezeAsyncConfig,
    DoubleSqueezeConfig,
    DPSGDConfig,
    LowRankConfig,
    MethodConfig,
    PowerGossipConfig,
    QSGDConfig,
    RandomKConfig,
    SignConfig,
    TopKConfig,
)
from gradzip.gossip import DPSGD, Choco, PowerGossip
from gradzip.gossip.base import Gossip
from gradzip.reducers.acpsgd import ACPSGD
from gradzip.reducers.allreduce import HalfAllReduce, PlainAllReduce
from gradzip.reducers.doublesqueeze import DoubleSqueezeSharded
from gradzip.reducers.elementwise import ElementwiseReducer
from gradzip.reducers.powersgd import PowerSGD
from gradzip.reducers.reducer import Reducer


def _elementwise(name: str) -> Callable[[Any, Comm], Reducer]:
    """The reducer of an element-wise method: the compressor of the same name, built from the method's own
    config (the compressor reads its options from it), inside the all-reduce or all-gather pattern."""

    def build(cfg: Any, comm: Comm) -> Reducer:
        compressor = COMPRESSORS[name].make(cfg)
        error_feedback = getattr(cfg, "error_feedback", True)  # QSGD is unbiased: optional there
        momentum = getattr(cfg, "momentum_correction", 0.0)
        return ElementwiseReducer(compressor, comm, cfg.min_compression_rate, error_feedback, momentum)

    return build


def _doublesqueeze(cfg: DoubleSqueezeConfig, comm: Comm) -> Reducer:
    if cfg.placement == "server":
        raise ValueError(
            "doublesqueeze with placement='server' runs dedicated server processes, which a DDP hook cannot "
            "start: use gradzip train --placement server, or gradzip.integrations.paramserver (docs/doublesqueeze.md)"
        )
    return DoubleSqueezeSharded(cfg, comm)


def _servers_only(cfg: MethodConfig, comm: Comm) -> Reducer:
    raise ValueError(
        "doublesqueeze-async runs on dedicated servers, not as a DDP hook: use gradzip train, or "
        "gradzip.integrations.paramserver (docs/doublesqueeze.md)"
    )


def _not_a_hook(cfg: MethodConfig, comm: Comm) -> Reducer:
    # The config class names the gossip class: DPSGDConfig -> gradzip.gossip.DPSGD, and so on.
    cls = type(cfg).__name__.removesuffix("Config")
    raise ValueError(
        "this method is decentralized (gossip with neighbours, no gradient all-reduce), not a DDP hook: use "
        f"gradzip.gossip.{cls}(model, topology=...) and call .step() after optimizer.step(), or gradzip train"
    )


def _dpsgd(model: nn.Module, cfg: DPSGDConfig, **common: Any) -> Gossip:
    return DPSGD(model, cfg.topology, metrics=cfg.metrics, **common)


def _choco(model: nn.Module, cfg: ChocoConfig, **common: Any) -> Gossip:
    return Choco(
        model, cfg.topology, compressor=cfg.compressor, gamma=cfg.gamma, metrics=cfg.metrics,
        **cfg.compressor_options(), **common,
    )  # fmt: skip


def _powergossip(model: nn.Module, cfg: PowerGossipConfig, **common: Any) -> Gossip:
    return PowerGossip(
        model, cfg.topology, rank=cfg.rank, iterations=cfg.iterations, warm_start=cfg.warm_start,
        metrics=cfg.metrics, **common,
    )  # fmt: skip


@dataclass(frozen=True)
class MethodSpec:
    name: str
    config_cls: type[MethodConfig]
    summary: str
    wire: str
    aggregation: str
    build: Callable[[Any, Comm], Reducer] = _not_a_hook
    """The reducer of one DDP bucket (hook methods); the others raise, saying what to use instead."""
    kind: str = "hook"
    """How it trains: "hook" (a DDP communication hook), "server" (parameter servers, DoubleSqueeze) or
    "gossip" (decentralized, no gradient all-reduce)."""
    gossip: Callable[..., Gossip] | None = None
    """``gossip(model, cfg, process_group=..., timeout=...)``: the gossip object (gossip methods)."""


METHODS: dict[str, MethodSpec] = {
    spec.name: spec
    for spec in [
        MethodSpec(
            "ssgd", MethodConfig, "plain all-reduce, the baseline", "fp32", "all-reduce",
            lambda cfg, comm: PlainAllReduce(comm),
        ),
        MethodSpec(
            "fp16", MethodConfig, "gradient cast to half for the wire", "fp16", "all-reduce",
            lambda cfg, comm: HalfAllReduce(comm),
        ),
        MethodSpec(
            "signsgd", SignConfig, "EF-SignSGD: scaled sign with error feedback",
            "1 bit/element + 1 float/tensor", "all-gather", _elementwise("signsgd"),
        ),
        MethodSpec(
            "topk", TopKConfig, "top-k with error feedback", "values + int32 indices", "all-gather",
            _elementwise("topk"),
        ),
        MethodSpec(
            "randomk", RandomKConfig, "random-k with error feedback, indices agreed through a shared seed",
            "values only", "all-reduce", _elementwise("randomk"),
        ),
        MethodSpec(
            "qsgd", QSGDConfig, "QSGD: unbiased stochastic rounding to s levels", "norm + int8 sign*level",
            "all-gather", _elementwise("qsgd"),
        ),
        MethodSpec(
            "powersgd", LowRankConfig, "PowerSGD: rank-r power iteration, warm start, error feedback",
            "factors P then Q", "two all-reduces", lambda cfg, comm: PowerSGD(cfg, comm),
        ),
        MethodSpec(
            "acpsgd", LowRankConfig,
            "ACP-SGD: alternating P/Q low-rank steps, one fused all-reduce per bucket",
            "one factor per step", "one all-reduce", lambda cfg, comm: ACPSGD(cfg, comm),
        ),
        MethodSpec(
            "dpsgd", DPSGDConfig,
            "D-PSGD: decentralized, each worker averages its model with its neighbours', uncompressed",
            "the whole model, fp32", "gossip with neighbours", kind="gossip", gossip=_dpsgd,
        ),
        MethodSpec(
            "choco", ChocoConfig,
            "Choco-SGD: decentralized, compressed model differences with public copies and a consensus step",
            "the compressor's payload per neighbour", "gossip with neighbours", kind="gossip", gossip=_choco,
        ),
        MethodSpec(
            "powergossip", PowerGossipConfig,
            "PowerGossip: decentralized, model differences compressed by warm-started power iteration",
            "one rank-r projection per matrix per neighbour", "gossip with neighbours", kind="gossip",
            gossip=_powergossip,
        ),
        MethodSpec(
            "doublesqueeze", DoubleSqueezeConfig,
            "DoubleSqueeze: any compressor on both passes through parameter servers, error feedback on both",
            "the compressor's payload, both directions",
            "all-to-all + all-gather (sharded) or dedicated servers", _doublesqueeze,
        ),
        MethodSpec(
            "doublesqueeze-async", DoubleSqueezeAsyncConfig,
            "asynchronous DoubleSqueeze: servers apply pushes as they arrive, bounded staleness",
            "the compressor's payload, both directions", "dedicated servers, point-to-point",
            _servers_only, kind="server",
        ),
    ]
}  # fmt: skip


def methods(kind: str | None = None) -> list[str]:
    """The public method names, sorted; only those of ``kind`` ("hook", "server", "gossip") when given."""
    return sorted(name for name, spec in METHODS.items() if kind is None or spec.kind == kind)


def get_spec(name: str) -> MethodSpec:
    try:
        return METHODS[name]
    except KeyError:
        raise ValueError(f"unknown method {name!r}; valid methods: {', '.join(methods())}") from None


def make_config(name: str, **options: Any) -> MethodConfig:
    """Validated options of method ``name``; ValueError names an unknown option or a bad value."""
    return get_spec(name).config_cls.from_options(name, options)


# Method options whose command-line flag is renamed because the plain name is a training flag already: the
# compressor's seed is not the training seed.
_RENAMED_FLAGS = {"seed": "compressor-seed"}


def option_flag(option: str) -> str:
    """The ``gradzip train`` flag of method option ``option`` (``momentum_correction`` ->
    ``--momentum-correction``, ``seed`` -> ``--compressor-seed``); a bool's negation is ``--no-`` + the rest."""
    return "--" + _RENAMED_FLAGS.get(option, option.replace("_", "-"))


def family(name: str, options: dict[str, Any]) -> str:
    """How a run of method ``name`` with ``options`` trains: "hook" (DDP with a communication hook), "server"
    (dedicated parameter-server processes) or "gossip". DoubleSqueeze is a DDP hook in its sharded placement
    and a parameter-server run with ``placement="server"``."""
    spec = get_spec(name)
    return "server" if spec.kind == "server" or options.get("placement") == "server" else spec.kind


def servers_needed(name: str, options: dict[str, Any]) -> int:
    """Dedicated server processes a run of method ``name`` needs (0: it trains with its workers only)."""
    return int(options.get("servers", 1)) if family(name, options) == "server" else 0


def build_gossip(name: str, model: nn.Module, cfg: MethodConfig, **common: Any) -> Gossip:
    """The gossip object of method ``name`` for ``model`` (``common``: process group, timeout)."""
    spec = get_spec(name)
    if spec.gossip is None:
        raise ValueError(
            f"method {name!r} is not a gossip method; gossip methods: {', '.join(methods('gossip'))}"
        )
    return spec.gossip(model, cfg, **common)
