"""The method registry: a dict from public names to what builds them.

Unknown names and options fail here, when a method is built, with the valid ones listed.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from gradzip.config import (
    DoubleSqueezeAsyncConfig,
    DoubleSqueezeConfig,
    LowRankConfig,
    MethodConfig,
    QSGDConfig,
    RandomKConfig,
    SignConfig,
    TopKConfig,
)
from gradzip.gossip.config import ChocoConfig, DPSGDConfig, PowerGossipConfig

if TYPE_CHECKING:
    from gradzip.comm.collectives import Comm
    from gradzip.compress.base import Compressor
    from gradzip.reducer import Reducer


@dataclass(frozen=True)
class MethodSpec:
    name: str
    config_cls: type[MethodConfig]
    summary: str
    wire: str
    aggregation: str
    build: Callable[[Any, Comm], Reducer]
    kind: str = "hook"
    """How it trains: "hook" (a DDP communication hook), "server" (parameter servers, DoubleSqueeze) or
    "gossip" (decentralized, no all-reduce)."""


def _ssgd(cfg: MethodConfig, comm: Comm) -> Reducer:
    from gradzip.comm.allreduce import PlainAllReduce

    return PlainAllReduce(comm)


def _fp16(cfg: MethodConfig, comm: Comm) -> Reducer:
    from gradzip.comm.allreduce import HalfAllReduce

    return HalfAllReduce(comm)


def _elementwise(make: Callable[[Any], Any], error_feedback: Callable[[Any], bool] = lambda c: True):
    def build(cfg: Any, comm: Comm) -> Reducer:
        from gradzip.comm.elementwise import ElementwiseReducer

        momentum = getattr(cfg, "momentum_correction", 0.0)
        return ElementwiseReducer(make(cfg), comm, cfg.min_compression_rate, error_feedback(cfg), momentum)

    return build


def _sign(cfg: SignConfig) -> Any:
    from gradzip.compress.sign import ScaledSign

    return ScaledSign(majority_vote=cfg.majority_vote)


def _topk(cfg: TopKConfig) -> Any:
    from gradzip.compress.topk import TopK

    return TopK(cfg.density)


def _randomk(cfg: RandomKConfig) -> Any:
    from gradzip.compress.randomk import RandomK

    return RandomK(cfg.density, seed=cfg.seed)


def _qsgd(cfg: QSGDConfig) -> Any:
    from gradzip.compress.qsgd import QSGD

    return QSGD(cfg.levels, seed=cfg.seed)


def _identity(cfg: MethodConfig) -> Any:
    from gradzip.compress.identity import Identity

    return Identity()


def _half(cfg: MethodConfig) -> Any:
    from gradzip.compress.identity import Half

    return Half()


def _powersgd(cfg: LowRankConfig, comm: Comm) -> Reducer:
    from gradzip.compress.powersgd import PowerSGD

    return PowerSGD(cfg, comm)


def _acpsgd(cfg: LowRankConfig, comm: Comm) -> Reducer:
    from gradzip.compress.acpsgd import ACPSGD

    return ACPSGD(cfg, comm)


def _doublesqueeze(cfg: DoubleSqueezeConfig, comm: Comm) -> Reducer:
    if cfg.placement == "server":
        raise ValueError(
            "doublesqueeze with placement='server' runs dedicated server processes, which a DDP hook cannot "
            "start: use gradzip train --placement server, or gradzip.paramserver (see the README)"
        )
    from gradzip.comm.doublesqueeze import DoubleSqueezeSharded

    return DoubleSqueezeSharded(cfg, comm)


def _servers_only(cfg: MethodConfig, comm: Comm) -> Reducer:
    raise ValueError(
        "doublesqueeze-async runs on dedicated servers, not as a DDP hook: use gradzip train, or "
        "gradzip.paramserver (see the README)"
    )


def _gossip(cfg: MethodConfig, comm: Comm) -> Reducer:
    # The config class names the gossip class: DPSGDConfig -> gradzip.gossip.DPSGD, and so on.
    cls = type(cfg).__name__.removesuffix("Config")
    raise ValueError(
        "this method is decentralized (gossip with neighbours, no all-reduce), not a DDP hook: use "
        f"gradzip.gossip.{cls}(model, topology=...) and call .step() after optimizer.step(), or gradzip train"
    )


METHODS: dict[str, MethodSpec] = {
    spec.name: spec
    for spec in [
        MethodSpec("ssgd", MethodConfig, "plain all-reduce, the baseline", "fp32", "all-reduce", _ssgd),
        MethodSpec("fp16", MethodConfig, "gradient cast to half for the wire", "fp16", "all-reduce", _fp16),
        MethodSpec(
            "signsgd",
            SignConfig,
            "EF-SignSGD: scaled sign with error feedback",
            "1 bit/element + 1 float/tensor",
            "all-gather",
            _elementwise(_sign),
        ),
        MethodSpec(
            "topk",
            TopKConfig,
            "top-k with error feedback",
            "values + int32 indices",
            "all-gather",
            _elementwise(_topk),
        ),
        MethodSpec(
            "randomk",
            RandomKConfig,
            "random-k with error feedback, indices agreed through a shared seed",
            "values only",
            "all-reduce",
            _elementwise(_randomk),
        ),
        MethodSpec(
            "qsgd",
            QSGDConfig,
            "QSGD: unbiased stochastic rounding to s levels",
            "norm + int8 sign*level",
            "all-gather",
            _elementwise(_qsgd, lambda c: c.error_feedback),
        ),
        MethodSpec(
            "powersgd",
            LowRankConfig,
            "PowerSGD: rank-r power iteration, warm start, error feedback",
            "factors P then Q",
            "two all-reduces",
            _powersgd,
        ),
        MethodSpec(
            "acpsgd",
            LowRankConfig,
            "ACP-SGD: alternating P/Q low-rank steps, one fused all-reduce per bucket",
            "one factor per step",
            "one all-reduce",
            _acpsgd,
        ),
        MethodSpec(
            "dpsgd",
            DPSGDConfig,
            "D-PSGD: decentralized, each worker averages its model with its neighbours', uncompressed",
            "the whole model, fp32",
            "gossip with neighbours",
            _gossip,
            kind="gossip",
        ),
        MethodSpec(
            "choco",
            ChocoConfig,
            "Choco-SGD: decentralized, compressed model differences with public copies and a consensus step",
            "the compressor's payload per neighbour",
            "gossip with neighbours",
            _gossip,
            kind="gossip",
        ),
        MethodSpec(
            "powergossip",
            PowerGossipConfig,
            "PowerGossip: decentralized, model differences compressed by warm-started power iteration",
            "one rank-r projection per matrix per neighbour",
            "gossip with neighbours",
            _gossip,
            kind="gossip",
        ),
        MethodSpec(
            "doublesqueeze",
            DoubleSqueezeConfig,
            "DoubleSqueeze: any compressor on both passes through parameter servers, error feedback on both",
            "the compressor's payload, both directions",
            "all-to-all + all-gather (sharded) or dedicated servers",
            _doublesqueeze,
        ),
        MethodSpec(
            "doublesqueeze-async",
            DoubleSqueezeAsyncConfig,
            "asynchronous DoubleSqueeze: servers apply pushes as they arrive, bounded staleness",
            "the compressor's payload, both directions",
            "dedicated servers, point-to-point",
            _servers_only,
            kind="server",
        ),
    ]
}


@dataclass(frozen=True)
class CompressorSpec:
    """An element-wise compressor other patterns (DoubleSqueeze, Choco-SGD) can carry: its options are those
    of the method of the same name, less the ones that belong to that method's own pattern."""

    config_cls: type[MethodConfig]
    make: Callable[[Any], Compressor]


COMPRESSORS: dict[str, CompressorSpec] = {
    "identity": CompressorSpec(MethodConfig, _identity),
    "fp16": CompressorSpec(MethodConfig, _half),
    "signsgd": CompressorSpec(SignConfig, _sign),
    "topk": CompressorSpec(TopKConfig, _topk),
    "randomk": CompressorSpec(RandomKConfig, _randomk),
    "qsgd": CompressorSpec(QSGDConfig, _qsgd),
}

# Options of a compressor's method that are not the compressor's: they belong to the pattern around it.
PATTERN_OPTIONS = ("min_compression_rate", "momentum_correction", "error_feedback")


def compressor_options(name: str) -> list[str]:
    """The options compressor ``name`` takes (a subset of its method's)."""
    spec = get_compressor_spec(name)
    return [f for f in spec.config_cls.__dataclass_fields__ if f not in PATTERN_OPTIONS]


def get_compressor_spec(name: str) -> CompressorSpec:
    try:
        return COMPRESSORS[name]
    except KeyError:
        valid = ", ".join(sorted(COMPRESSORS))
        raise ValueError(f"unknown compressor {name!r}; valid compressors: {valid}") from None


def make_compressor(name: str, **options: Any) -> Compressor:
    """Compressor ``name`` (``signsgd``, ``topk``, ...) with its options validated like its method's."""
    spec = get_compressor_spec(name)
    valid = compressor_options(name)
    for key in options:
        if key not in valid:
            raise ValueError(
                f"compressor {name!r} has no option {key!r}; valid options: {', '.join(valid) or '(none)'}"
            )
    compressor: Compressor = spec.make(spec.config_cls.from_options(name, options))
    return compressor


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
