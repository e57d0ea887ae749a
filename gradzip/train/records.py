"""What the training loop records: every step of this worker, timed in parts, and every evaluation."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class StepRecord:
    """One step of one worker, timed in parts (seconds)."""

    step: int
    loss: float
    time: float
    """The whole step, without metric-only work (gossip's consensus distance)."""
    compute: float
    """Forward and backward, without the exchange's own work inside backward (a DDP hook's)."""
    optimizer: float
    exchange: float | None = None
    """Seconds in gradzip's exchange code (compression and waiting); None where it is not measured."""
    wait: float | None = None
    """Of ``exchange``, the seconds blocked on other processes."""
    bytes_sent: int | None = None
    bytes_received: int | None = None
    consensus_distance: float | None = None
    """Gossip with metrics on: ``mean_i |x_i - x_mean|^2`` after the step."""
    skipped: bool = False
    """Skipped for a NaN or an Inf in some worker's gradient: no optimizer step (its loss may be NaN)."""

    @property
    def compress(self) -> float | None:
        """Seconds of the exchange's own work: compression and decompression."""
        return None if self.exchange is None or self.wait is None else self.exchange - self.wait


@dataclass
class EvalRecord:
    step: int
    train_time_s: float
    """Training time up to and including ``step`` (evaluations left out)."""
    accuracy: float


@dataclass
class LoopResult:
    records: list[StepRecord] = field(default_factory=list)
    evals: list[EvalRecord] = field(default_factory=list)

    @property
    def train_time_s(self) -> float:
        return sum(r.time for r in self.records)
