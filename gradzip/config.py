"""What a user can configure: every method's options as dataclasses (one docstring, ``help``, per field;
validation in ``__post_init__``), and the compressors that other patterns carry, by name.

Every option a user can set, on the command line or in ``gradzip.ddp_hook(name, **options)``, is a field of
one of these classes; the CLI builds its flags from them, so a field's ``help`` is its documentation. The
method registry (:mod:`gradzip.registry`) pairs each method's name with its class here.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gradzip.comm.topology import TOPOLOGIES
from gradzip.compress.base import Compressor
from gradzip.compress.identity import Half, Identity
from gradzip.compress.qsgd import QSGD
from gradzip.compress.randomk import RandomK
from gradzip.compress.sign import ScaledSign
from gradzip.compress.topk import TopK


def opt(default: Any, help: str) -> Any:
    """A config field with its documentation attached (read back by the CLI and ``gradzip methods``)."""
    return field(default=default, metadata={"help": help})


def check(ok: bool, name: str, value: Any, valid: str) -> None:
    """Raise ValueError naming the bad value and what is valid, unless ``ok``."""
    if not ok:
        raise ValueError(f"{name}={value!r} is invalid: {name} must be {valid}")


def check_type(name: str, annotation: Any, value: Any) -> Any:
    """The value of a bool, int, float or str field (or ``X | None``), type-checked (ints are accepted for
    floats)."""
    kind = annotation if isinstance(annotation, str) else getattr(annotation, "__name__", "")
    if kind.endswith(" | None"):
        if value is None:
            return None
        kind = kind.removesuffix(" | None")
    if kind == "str":
        check(isinstance(value, str), name, value, "a string")
    if kind == "bool":
        check(isinstance(value, bool), name, value, "true or false")
    elif kind == "int":
        check(isinstance(value, int) and not isinstance(value, bool), name, value, "an integer")
    elif kind == "float":
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        check(ok, name, value, "a finite number")
        return float(value)
    return value


def check_momentum_correction(value: float) -> None:
    check(0.0 <= value < 1.0, "momentum_correction", value, "in [0, 1)")


@dataclass
class MethodConfig:
    """Options shared by every method."""

    def __post_init__(self) -> None:
        # Types first, so every later check compares numbers, and a wrong type is a ValueError naming it.
        for f in dataclasses.fields(self):
            setattr(self, f.name, check_type(f.name, f.type, getattr(self, f.name)))

    @classmethod
    def from_options(cls, method: str, options: dict[str, Any]) -> MethodConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(options) - known)
        if unknown:
            valid = ", ".join(sorted(known)) or "(none)"
            raise ValueError(f"method {method!r} has no option {unknown[0]!r}; valid options: {valid}")
        return cls(**options)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class CompressedConfig(MethodConfig):
    """Options of every method that compresses matrices (1-D tensors always travel uncompressed)."""

    min_compression_rate: float = opt(
        2.0,
        "a >=2-D tensor is compressed only if raw bytes / compressed bytes is at least this; else sent raw",
    )
    seed: int = opt(
        0, "seed of the compressor's own torch.Generator (identical on all workers where they must agree)"
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        check(self.min_compression_rate >= 0, "min_compression_rate", self.min_compression_rate, ">= 0")


@dataclass
class SignConfig(CompressedConfig):
    majority_vote: bool = opt(
        False, "aggregate by majority vote, sign(sum of signs) scaled by the mean scale, instead of the mean"
    )


@dataclass
class TopKConfig(CompressedConfig):
    density: float = opt(0.01, "fraction of each tensor's entries sent, k = ceil(density * numel); in (0, 1]")
    momentum_correction: float = opt(
        0.0,
        "DGC momentum correction: momentum accumulated before sparsifying, sent entries masked; in [0, 1). "
        "The optimizer must then run without momentum (gradzip train arranges this)",
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        check(0.0 < self.density <= 1.0, "density", self.density, "in (0, 1]")
        check_momentum_correction(self.momentum_correction)


@dataclass
class RandomKConfig(TopKConfig):
    # Random selection needs about ten times top-k's density: with error feedback every entry waits about
    # 1/density steps to be sent, and at 0.01 training on the default task diverges.
    density: float = opt(0.1, "fraction of each tensor's entries sent, k = ceil(density * numel); in (0, 1]")


@dataclass
class QSGDConfig(CompressedConfig):
    levels: int = opt(16, "quantization levels s per sign (1..127); each element travels as one int8")
    error_feedback: bool = opt(False, "add error feedback (QSGD is unbiased and does not need it)")

    def __post_init__(self) -> None:
        super().__post_init__()
        check(1 <= self.levels <= 127, "levels", self.levels, "an integer in 1..127")


@dataclass
class LowRankConfig(CompressedConfig):
    rank: int = opt(4, "rank r of the low-rank factors; >= 1")
    warmup_steps: int = opt(0, "steps of plain uncompressed all-reduce before compression starts; >= 0")

    def __post_init__(self) -> None:
        super().__post_init__()
        check(self.rank >= 1, "rank", self.rank, "an integer >= 1")
        check(self.warmup_steps >= 0, "warmup_steps", self.warmup_steps, ">= 0")


# ------------------------------------------------------------------------------ compressors by name


@dataclass(frozen=True)
class CompressorSpec:
    """An element-wise compressor that other patterns (DoubleSqueeze, Choco-SGD) can carry: its options are
    those of the method of the same name, less the ones that belong to that method's own pattern."""

    config_cls: type[MethodConfig]
    make: Callable[[Any], Compressor]


COMPRESSORS: dict[str, CompressorSpec] = {
    "identity": CompressorSpec(MethodConfig, lambda cfg: Identity()),
    "fp16": CompressorSpec(MethodConfig, lambda cfg: Half()),
    "signsgd": CompressorSpec(SignConfig, lambda cfg: ScaledSign(majority_vote=cfg.majority_vote)),
    "topk": CompressorSpec(TopKConfig, lambda cfg: TopK(cfg.density)),
    "randomk": CompressorSpec(RandomKConfig, lambda cfg: RandomK(cfg.density, seed=cfg.seed)),
    "qsgd": CompressorSpec(QSGDConfig, lambda cfg: QSGD(cfg.levels, seed=cfg.seed)),
}

# Options of a compressor's method that are not the compressor's: they belong to the pattern around it.
PATTERN_OPTIONS = ("min_compression_rate", "momentum_correction", "error_feedback")


def get_compressor_spec(name: str) -> CompressorSpec:
    try:
        return COMPRESSORS[name]
    except KeyError:
        valid = ", ".join(sorted(COMPRESSORS))
        raise ValueError(f"unknown compressor {name!r}; valid compressors: {valid}") from None


def compressor_options(name: str) -> list[str]:
    """The options compressor ``name`` takes (a subset of its method's)."""
    spec = get_compressor_spec(name)
    return [f for f in spec.config_cls.__dataclass_fields__ if f not in PATTERN_OPTIONS]


def make_compressor(name: str, **options: Any) -> Compressor:
    """Compressor ``name`` (``signsgd``, ``topk``, ...) with its options validated like its method's."""
    spec = get_compressor_spec(name)
    valid = compressor_options(name)
    for key in options:
        if key not in valid:
            raise ValueError(
                f"compressor {name!r} has no option {key!r}; valid options: {', '.join(valid) or '(none)'}"
            )
    return spec.make(spec.config_cls.from_options(name, options))


def carried_options(name: str, density: float | None, levels: int | None, seed: int) -> dict[str, Any]:
    """The options a pattern passes to the compressor ``name`` it carries: those set, refused if the compressor
    lacks them (the seed goes to every compressor that takes one)."""
    valid = compressor_options(name)
    for key, value in (("density", density), ("levels", levels)):
        if value is not None and key not in valid:
            raise ValueError(
                f"compressor {name!r} has no option {key!r}; its options: {', '.join(valid) or '(none)'}"
            )
    given = {"density": density, "levels": levels, "seed": seed}
    return {k: v for k, v in given.items() if v is not None and k in valid}


_COMPRESSOR_NAMES = ", ".join(COMPRESSORS)


@dataclass
class CarriedCompressorConfig(MethodConfig):
    """Options of a pattern that carries any element-wise compressor (DoubleSqueeze, Choco-SGD): which one,
    and the options passed through to it (refused when it lacks them)."""

    compressor: str = opt("signsgd", f"the compressor carried: {_COMPRESSOR_NAMES}")
    density: float | None = opt(
        None, "the compressor's density (topk, randomk); default: the compressor's own"
    )
    levels: int | None = opt(None, "the compressor's levels (qsgd); default: the compressor's own")
    seed: int = opt(0, "seed of the compressor's own torch.Generator")

    def __post_init__(self) -> None:
        super().__post_init__()
        self.make_compressor()  # refuses an unknown compressor, or an option it does not take, here

    def compressor_options(self) -> dict[str, Any]:
        return carried_options(self.compressor, self.density, self.levels, self.seed)

    def make_compressor(self) -> Compressor:
        return make_compressor(self.compressor, **self.compressor_options())


# ----------------------------------------------------------------------------------- DoubleSqueeze

PLACEMENTS = ("sharded", "server")
DOUBLESQUEEZE_QSGD_LEVELS = 127
"""QSGD's levels under DoubleSqueeze when none are given (QSGD's own default, 16, diverges there)."""


@dataclass
class DoubleSqueezeConfig(CarriedCompressorConfig):
    """DoubleSqueeze (Tang et al. 2019): both passes through the parameter server compressed, with error
    compensation on the workers and on the server. The compressor's own options are passed through."""

    compressor: str = opt("signsgd", f"compressor of both passes: {_COMPRESSOR_NAMES}")
    levels: int | None = opt(
        None,
        f"the compressor's levels (qsgd); default {DOUBLESQUEEZE_QSGD_LEVELS} here: QSGD's own 16 diverge "
        "under error feedback on both passes",
    )
    placement: str = opt(
        "sharded",
        "sharded: every worker serves 1/n of each tensor (a DDP hook); "
        "server: dedicated server processes that do not train",
    )
    server_error_feedback: bool = opt(
        True, "error compensation on the server's pass (false: the ablation the paper argues against)"
    )
    servers: int = opt(1, "dedicated server processes for placement=server (each owns 1/K of each tensor)")
    momentum_correction: float = opt(
        0.0,
        "momentum accumulated on the workers before compression (DGC), in [0, 1); the optimizer then runs "
        "without momentum (gradzip train arranges this)",
    )

    def __post_init__(self) -> None:
        if self.compressor == "qsgd" and self.levels is None:
            # Error feedback on both passes needs a compressor that leaves less behind than it was given. QSGD
            # at its own 16 levels leaves up to sqrt(d)/16 times the tensor (unbiased, not a contraction), and
            # the residuals grew until the runs diverged (BENCHMARKS.md, MNIST-1D); 127 levels trained in every
            # placement for the same bytes, since sign and level travel as one int8 either way.
            self.levels = DOUBLESQUEEZE_QSGD_LEVELS
        super().__post_init__()
        check_momentum_correction(self.momentum_correction)
        check(self.placement in PLACEMENTS, "placement", self.placement, " or ".join(PLACEMENTS))
        check(self.servers >= 1, "servers", self.servers, "an integer >= 1")


@dataclass
class DoubleSqueezeAsyncConfig(DoubleSqueezeConfig):
    """Asynchronous DoubleSqueeze: dedicated servers hold the model and apply each push as it arrives."""

    placement: str = opt("server", "always server: the asynchronous variant needs dedicated servers")
    max_staleness: int = opt(
        4, "a worker may run at most this many steps ahead of the slowest one; further ahead, it waits"
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        check(self.placement == "server", "placement", self.placement, "server (asynchronous needs servers)")
        check(self.max_staleness >= 0, "max_staleness", self.max_staleness, "an integer >= 0")


# ------------------------------------------------------------------------------------------- gossip

_TOPOLOGY_HELP = (
    f"who talks to whom: {', '.join(TOPOLOGIES)}, or the path to an edge-list file ('i j' per line); "
    "Metropolis-Hastings mixing weights"
)


@dataclass
class GossipConfig(MethodConfig):
    """Options of the decentralized methods. Whether ``topology`` can take the run's worker count (a torus of
    7 cannot) is checked when the topology is built with ``n``, which ``gradzip train`` does before starting
    any worker."""

    topology: str = opt("ring", _TOPOLOGY_HELP)
    metrics: bool = opt(
        True,
        "all-reduce the consensus distance after every step (metrics only; false: the gossip sends neighbour messages only)",
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        check(
            self.topology in TOPOLOGIES or Path(self.topology).is_file(),
            "topology",
            self.topology,
            f"one of {', '.join(TOPOLOGIES)} or the path to an existing edge-list file",
        )


@dataclass
class DPSGDConfig(GossipConfig):
    pass


@dataclass
class ChocoConfig(GossipConfig, CarriedCompressorConfig):
    compressor: str = opt("signsgd", f"compressor of the gossiped model differences: {_COMPRESSOR_NAMES}")
    gamma: float = opt(
        0.4,
        "Choco's consensus step size, in (0, 1]: 1 with identity (= dpsgd), smaller for coarser compressors",
    )

    seed: int = opt(0, "seed of the compressor's own torch.Generator (streams differ per worker and tensor)")

    def __post_init__(self) -> None:
        super().__post_init__()
        check(0.0 < self.gamma <= 1.0, "gamma", self.gamma, "in (0, 1]")

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
        check(self.rank >= 1, "rank", self.rank, "an integer >= 1")
        check(self.iterations >= 1, "iterations", self.iterations, "an integer >= 1")
