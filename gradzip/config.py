"""Method options as dataclasses: one docstring (``help``) per field, validation in ``__post_init__``.

Every option a user can set, on the command line or in ``gradzip.ddp_hook(name, **options)``, is a field of
one of these classes; the CLI builds its flags from them, so a field's ``help`` is its documentation.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any


def opt(default: Any, help: str) -> Any:
    """A config field with its documentation attached (read back by the CLI and ``gradzip methods``)."""
    return field(default=default, metadata={"help": help})


def _check(ok: bool, name: str, value: Any, valid: str) -> None:
    if not ok:
        raise ValueError(f"{name}={value!r} is invalid: {name} must be {valid}")


def _check_type(name: str, annotation: Any, value: Any) -> Any:
    """The value of a bool, int, float or str field (or ``X | None``), type-checked (ints are accepted for
    floats)."""
    kind = annotation if isinstance(annotation, str) else getattr(annotation, "__name__", "")
    if kind.endswith(" | None"):
        if value is None:
            return None
        kind = kind.removesuffix(" | None")
    if kind == "str":
        _check(isinstance(value, str), name, value, "a string")
    if kind == "bool":
        _check(isinstance(value, bool), name, value, "true or false")
    elif kind == "int":
        _check(isinstance(value, int) and not isinstance(value, bool), name, value, "an integer")
    elif kind == "float":
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        _check(ok, name, value, "a finite number")
        return float(value)
    return value


@dataclass
class MethodConfig:
    """Options shared by every method."""

    def __post_init__(self) -> None:
        # Types first, so every later check compares numbers, and a wrong type is a ValueError naming it.
        for f in dataclasses.fields(self):
            setattr(self, f.name, _check_type(f.name, f.type, getattr(self, f.name)))

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
        _check(self.min_compression_rate >= 0, "min_compression_rate", self.min_compression_rate, ">= 0")


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
        _check(0.0 < self.density <= 1.0, "density", self.density, "in (0, 1]")
        _check(
            0.0 <= self.momentum_correction < 1.0,
            "momentum_correction",
            self.momentum_correction,
            "in [0, 1)",
        )


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
        _check(1 <= self.levels <= 127, "levels", self.levels, "an integer in 1..127")


@dataclass
class LowRankConfig(CompressedConfig):
    rank: int = opt(4, "rank r of the low-rank factors; >= 1")
    warmup_steps: int = opt(0, "steps of plain uncompressed all-reduce before compression starts; >= 0")

    def __post_init__(self) -> None:
        super().__post_init__()
        _check(self.rank >= 1, "rank", self.rank, "an integer >= 1")
        _check(self.warmup_steps >= 0, "warmup_steps", self.warmup_steps, ">= 0")


PLACEMENTS = ("sharded", "server")


@dataclass
class DoubleSqueezeConfig(MethodConfig):
    """DoubleSqueeze (Tang et al. 2019): both passes through the parameter server compressed, with error
    compensation on the workers and on the server. The compressor's own options are passed through."""

    compressor: str = opt(
        "signsgd", "compressor of both passes: identity, fp16, signsgd, topk, randomk, qsgd"
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
    density: float | None = opt(
        None, "the compressor's density (topk, randomk); default: the compressor's own"
    )
    levels: int | None = opt(None, "the compressor's levels (qsgd); default: the compressor's own")
    seed: int = opt(0, "seed of the compressor's own torch.Generator")
    momentum_correction: float = opt(
        0.0,
        "momentum accumulated on the workers before compression (DGC), in [0, 1); the optimizer then runs "
        "without momentum (gradzip train arranges this)",
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        _check(
            0.0 <= self.momentum_correction < 1.0,
            "momentum_correction",
            self.momentum_correction,
            "in [0, 1)",
        )
        _check(self.placement in PLACEMENTS, "placement", self.placement, " or ".join(PLACEMENTS))
        _check(self.servers >= 1, "servers", self.servers, "an integer >= 1")
        self.make_compressor()  # refuses an unknown compressor, or an option it does not take, here

    def compressor_options(self) -> dict[str, Any]:
        from gradzip.registry import compressor_options

        valid = compressor_options(self.compressor)
        given = {"density": self.density, "levels": self.levels, "seed": self.seed}
        wrong = [k for k, v in given.items() if v is not None and k not in valid and k != "seed"]
        if wrong:
            raise ValueError(
                f"compressor {self.compressor!r} has no option {wrong[0]!r}; "
                f"its options: {', '.join(valid) or '(none)'}"
            )
        return {k: v for k, v in given.items() if v is not None and k in valid}

    def make_compressor(self) -> Any:
        from gradzip.registry import make_compressor

        return make_compressor(self.compressor, **self.compressor_options())


@dataclass
class DoubleSqueezeAsyncConfig(DoubleSqueezeConfig):
    """Asynchronous DoubleSqueeze: dedicated servers hold the model and apply each push as it arrives."""

    placement: str = opt("server", "always server: the asynchronous variant needs dedicated servers")
    max_staleness: int = opt(
        4, "a worker may run at most this many steps ahead of the slowest one; further ahead, it waits"
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        _check(self.placement == "server", "placement", self.placement, "server (asynchronous needs servers)")
        _check(self.max_staleness >= 0, "max_staleness", self.max_staleness, "an integer >= 0")
