"""The method registry: a dict from public names to what builds them.

Unknown names and options fail here, when a method is built, with the valid ones listed.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from gradzip.config import (
    LowRankConfig,
    MethodConfig,
    QSGDConfig,
    RandomKConfig,
    SignConfig,
    TopKConfig,
)

if TYPE_CHECKING:
    from gradzip.comm.collectives import Comm
    from gradzip.reducer import Reducer


@dataclass(frozen=True)
class MethodSpec:
    name: str
    config_cls: type[MethodConfig]
    summary: str
    wire: str
    aggregation: str
    build: Callable[[Any, Comm], Reducer]


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


def _powersgd(cfg: LowRankConfig, comm: Comm) -> Reducer:
    from gradzip.compress.powersgd import PowerSGD

    return PowerSGD(cfg, comm)


def _acpsgd(cfg: LowRankConfig, comm: Comm) -> Reducer:
    from gradzip.compress.acpsgd import ACPSGD

    return ACPSGD(cfg, comm)


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
    ]
}


def methods() -> list[str]:
    """The public method names, sorted."""
    return sorted(METHODS)


def get_spec(name: str) -> MethodSpec:
    try:
        return METHODS[name]
    except KeyError:
        raise ValueError(f"unknown method {name!r}; valid methods: {', '.join(methods())}") from None


def make_config(name: str, **options: Any) -> MethodConfig:
    """Validated options of method ``name``; ValueError names an unknown option or a bad value."""
    return get_spec(name).config_cls.from_options(name, options)
