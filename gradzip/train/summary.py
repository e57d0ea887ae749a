"""What a training run reports: a typed summary (:class:`RunSummary`), written as JSON by ``--json`` and
printed by ``gradzip train``, and the collectives after the loop that it is made from."""

from __future__ import annotations

import dataclasses
import math
import statistics
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from gradzip.comm.collectives import CommStats, ring_all_reduce_bytes
from gradzip.train.records import EvalRecord, StepRecord
from gradzip.util import format_bytes

# Steps excluded from the median step time: the first iterations build DDP's buckets, warm the allocator and
# (for low-rank methods) allocate factors, so they are not representative.
TIMING_WARMUP_STEPS = 5

# The final loss is averaged over this many last steps (and over all workers): one mini-batch loss is noisy.
FINAL_LOSS_WINDOW = 10


@dataclass
class TargetResult:
    """Training time and steps until the test accuracy first reached ``target_accuracy`` (None: never)."""

    target_accuracy: float
    time_to_target_s: float | None
    steps_to_target: int | None

    @classmethod
    def of(cls, evals: list[EvalRecord], target: float) -> TargetResult:
        hit = next((e for e in evals if e.accuracy >= target), None)
        return cls(target, hit.train_time_s if hit else None, hit.step if hit else None)


@dataclass
class ServerSection:
    """Runs with dedicated parameter servers: what each server sent and received, and for the asynchronous
    variant its staleness (updates applied between a worker's pull and its push)."""

    servers: int
    server_bytes_sent_per_step: float
    server_bytes_received_per_step: float
    server_stats: list[dict[str, Any]]
    staleness: dict[int, int] | None = None
    mean_staleness: float | None = None
    max_lead: int | None = None
    max_staleness: int | None = None

    @classmethod
    def of(cls, stats: list[dict[str, Any]], servers: int, steps: int) -> ServerSection:
        section = cls(
            servers,
            sum(s["bytes_sent"] for s in stats) / (len(stats) * steps),
            sum(s["bytes_received"] for s in stats) / (len(stats) * steps),
            stats,
        )
        if "staleness" in stats[0]:
            hist = {int(k): int(v) for k, v in stats[0]["staleness"].items()}  # every server sees every push
            section.staleness = hist
            section.mean_staleness = sum(k * v for k, v in hist.items()) / max(1, sum(hist.values()))
            section.max_lead = max(int(s["max_lead"]) for s in stats)
            section.max_staleness = int(stats[0]["max_staleness"])
        return section

    def rows(self) -> list[tuple[str, str]]:
        rows = [
            (
                "servers",
                f"{self.servers}, each sending {format_bytes(self.server_bytes_sent_per_step)} "
                f"and receiving {format_bytes(self.server_bytes_received_per_step)} per step",
            )
        ]
        if self.staleness is not None:
            hist = ", ".join(f"{k}: {v}" for k, v in self.staleness.items())
            rows.append(("staleness", f"mean {self.mean_staleness:.2f} updates; histogram {{{hist}}}"))
            rows.append(
                ("max lead", f"{self.max_lead} steps ahead of the slowest (bound {self.max_staleness})")
            )
        return rows


@dataclass
class GossipSection:
    """Decentralized runs: the graph, and how far apart the workers' own models ended."""

    topology: str
    spectral_gap: float
    worker_accuracies: list[float]
    """Each worker's own model's test accuracy (``test_accuracy`` is the averaged model's)."""
    consensus_distance: float
    """``mean_i |x_i - x_mean|^2`` after the last step."""

    def rows(self) -> list[tuple[str, str]]:
        acc = self.worker_accuracies
        return [
            ("topology", f"{self.topology} (spectral gap {self.spectral_gap:.3f})"),
            ("consensus distance", f"{self.consensus_distance:.3g} (mean_i |x_i - x_mean|^2, final)"),
            ("worker accuracy", f"{100 * min(acc):.2f}% to {100 * max(acc):.2f}% (each worker's own model)"),
        ]


@dataclass
class RunSummary:
    """The summary of one training run (rank 0). ``to_dict()`` is what ``--json`` writes, ``rows()`` what
    ``gradzip train`` prints."""

    method: str
    options: dict[str, Any]
    model: str
    dataset: str
    workers: int
    backend: str
    batch_size: int
    lr: float
    momentum: float
    seed: int
    steps: int
    epochs: float
    data_split: str
    final_loss: float
    """Mean over the workers and the last ``FINAL_LOSS_WINDOW`` steps that went ahead."""
    test_accuracy: float
    time_per_step_s: float
    """Median over the steps after ``TIMING_WARMUP_STEPS`` (rank 0's)."""
    total_train_time_s: float
    bytes_sent_per_step: float
    """Per worker per step, averaged over workers; likewise the next two."""
    bytes_received_per_step: float
    bytes_uncompressed_per_step: float
    """What a plain fp32 all-reduce of the same gradients would send (for gossip: D-PSGD's model to every
    neighbour)."""
    params_identical: bool
    params_max_abs_diff: float
    worker_train_time_s: list[float]
    skipped_steps: int = 0
    """Steps skipped for a NaN or an Inf in some worker's gradient (``--nan-policy skip``; rank 0's count)."""
    accuracy_history: list[EvalRecord] = field(default_factory=list)
    target: TargetResult | None = None
    servers: ServerSection | None = None
    gossip: GossipSection | None = None
    history: list[StepRecord] = field(default_factory=list)
    """Per step: rank 0's time and bytes, the loss averaged over the workers whose step went ahead (NaN, and
    null in the JSON, for a step every worker skipped)."""
    ring_bytes_per_step: float | None = None
    """What ring algorithms move out of each worker per step for its collectives (``CommStats.ring_bytes``:
    an all-reduce of B bytes ``2(n-1)/n·B``, an all-gather of a B-byte payload ``(n-1)·B``, all-to-all and
    point-to-point as sent), averaged over the workers; None where not counted."""
    ring_bytes_uncompressed_per_step: float | None = None
    """The same for the uncompressed reference: a ring all-reduce of the fp32 gradients (``2(n-1)/n`` of
    ``bytes_uncompressed_per_step``) for the DDP-hook methods; the parameter servers' fp32 push and gossip's
    D-PSGD messages as sent."""

    @property
    def compression_ratio(self) -> float | None:
        """``ring_bytes_uncompressed_per_step / ring_bytes_per_step``: the bytes a ring algorithm moves per
        worker for the uncompressed reference (ssgd's fp32 all-reduce for the DDP-hook methods) against those
        it moves for the method, both averaged over the workers. None when either is unknown or nothing was
        sent.

        Not the payload ratio (:attr:`payload_compression_ratio`): an all-gather hands one payload to the
        collective but moves ``n-1`` of them through every worker, where a ring all-reduce moves ``2(n-1)/n``
        of its tensor. At 8 workers Sign-SGD hands over 1/32 of the gradient (32x in payload), but its ring
        moves 7/32 of it against ssgd's 14/8: 8x. At 2 workers both ratios agree."""
        ring, reference = self.ring_bytes_per_step, self.ring_bytes_uncompressed_per_step
        if ring is None or reference is None or ring <= 0:
            return None  # rather than inf: JSON has no infinity
        return reference / ring

    @property
    def payload_compression_ratio(self) -> float | None:
        """``bytes_uncompressed_per_step / bytes_sent_per_step``: the bytes handed to the collectives against
        the reference's (one copy of the payload each, whatever the collective moves; None when nothing was
        sent)."""
        if self.bytes_sent_per_step <= 0:
            return None
        return self.bytes_uncompressed_per_step / self.bytes_sent_per_step

    def to_dict(self) -> dict[str, Any]:
        """The JSON of ``--json``: one flat object; the family's sections' fields are top-level keys."""
        out: dict[str, Any] = {
            f.name: getattr(self, f.name)
            for f in dataclasses.fields(self)
            if f.name not in ("accuracy_history", "target", "servers", "gossip", "history")
        }
        out["options"] = dict(self.options)
        out["compression_ratio"] = self.compression_ratio
        out["payload_compression_ratio"] = self.payload_compression_ratio
        out["accuracy_history"] = [dataclasses.asdict(e) for e in self.accuracy_history]
        if self.target is not None:  # "not reached" stays in as None
            out.update(dataclasses.asdict(self.target))
        if self.servers is not None:  # the synchronous servers have no staleness
            out.update({k: v for k, v in dataclasses.asdict(self.servers).items() if v is not None})
        if self.gossip is not None:
            out.update(dataclasses.asdict(self.gossip))
        keys = ["step", "loss", "time", "bytes_sent", "skipped"] + (
            ["consensus_distance"] if self.gossip else []
        )
        out["history"] = [{k: getattr(r, k) for k in keys} for r in self.history]
        for h in out["history"]:  # JSON has no NaN
            h["loss"] = h["loss"] if math.isfinite(h["loss"]) else None
        return out

    def rows(self) -> list[tuple[str, str]]:
        """The human summary, one (label, text) per line."""
        options = ", ".join(f"{k}={v}" for k, v in self.options.items()) or "none"
        rows = [
            ("method", f"{self.method} ({options})"),
            ("model / dataset", f"{self.model} on {self.dataset}"),
            ("workers", f"{self.workers} ({self.backend}), batch {self.batch_size} per worker"),
            ("steps", f"{self.steps} ({self.epochs:.1f} epochs)"),
            ("final train loss", f"{self.final_loss:.4f}"),
            ("test accuracy", f"{100 * self.test_accuracy:.2f}%"),
            ("time per step", f"{1000 * self.time_per_step_s:.2f} ms (median)"),
            ("sent per step", self._sent_text()),
            ("compression vs ssgd", self._compression_text()),
            (
                "params identical",
                "yes"
                if self.params_identical
                else f"NO: workers differ by up to {self.params_max_abs_diff:.3g}",
            ),
        ]
        if self.skipped_steps:
            rows.append(
                (
                    "skipped steps",
                    f"{self.skipped_steps} (a NaN or an Inf in some worker's gradient: no update)",
                )
            )
        if self.servers is not None:
            rows += self.servers.rows()
        if len(self.worker_train_time_s) > 1:
            lo, hi = min(self.worker_train_time_s), max(self.worker_train_time_s)
            rows.append(("worker time", f"{lo:.2f} s to {hi:.2f} s of training per worker"))
        if self.gossip is not None:
            rows += self.gossip.rows()
            rows.append(("data split", self.data_split))
        if self.target is not None:
            hit = self.target.time_to_target_s
            reached = (
                "not reached"
                if hit is None
                else f"{hit:.2f} s of training ({self.target.steps_to_target} steps)"
            )
            rows.append((f"time to {100 * self.target.target_accuracy:.0f}%", reached))
        return rows

    def _sent_text(self) -> str:
        sent, ring = self.bytes_sent_per_step, self.ring_bytes_per_step
        text = f"{format_bytes(sent)} per worker"
        if ring is None or abs(ring - sent) <= 0.01 * max(ring, sent):
            return text
        return f"{text} handed to collectives; a ring moves {format_bytes(ring)} through each worker"

    def _compression_text(self) -> str:
        ring, payload = self.compression_ratio, self.payload_compression_ratio
        if ring is None:
            return (
                "n/a (nothing sent)"
                if payload is None
                else f"{payload:.1f}x in payload handed to collectives"
            )
        if payload is None or abs(payload - ring) <= 0.01 * ring:
            return f"{ring:.1f}x"
        # They differ for all-gathers: say which is which.
        return (
            f"{ring:.1f}x in bytes moved per worker (ring); {payload:.1f}x in payload handed to collectives"
        )


def ring_bytes(stats: CommStats, world: int, reference: str) -> tuple[float, float]:
    """This worker's ring bytes (``CommStats.ring_bytes``) and its uncompressed reference's, given how the
    reference travels: ``"all_reduce"`` (a plain fp32 all-reduce of ``bytes_uncompressed``) or ``"sent"``
    (point-to-point, moved as counted)."""
    if reference not in ("all_reduce", "sent"):
        raise ValueError(f"reference={reference!r} is invalid: use 'all_reduce' or 'sent'")
    uncompressed = stats.bytes_uncompressed
    return stats.ring_bytes(world), (
        ring_all_reduce_bytes(uncompressed, world) if reference == "all_reduce" else float(uncompressed)
    )


def final_loss(losses: list[float]) -> float:
    """The mean of the last ``FINAL_LOSS_WINDOW`` losses that are numbers (skipped steps have none)."""
    window = [x for x in losses if math.isfinite(x)][-FINAL_LOSS_WINDOW:]
    return sum(window) / len(window) if window else math.nan


def median_step_time(records: list[StepRecord]) -> float:
    """The median step time, leaving out the first steps (see ``TIMING_WARMUP_STEPS``) and skipped ones
    (no optimizer step: not what a step costs)."""
    times = [r.time for r in records if not r.skipped] or [r.time for r in records]
    n = len(times)
    timed = times[TIMING_WARMUP_STEPS:] if n > 2 * TIMING_WARMUP_STEPS else times[n // 2 :]
    return statistics.median(timed)


def reduce_metrics(
    records: list[StepRecord],
    stats: CommStats,
    device: torch.device,
    group: dist.ProcessGroup | None = None,
    reference: str = "all_reduce",
) -> tuple[list[float], list[float], list[float]]:
    """After the timed loop: the per-step losses averaged over the workers whose step went ahead (NaN where
    none did); the mean bytes sent, received and uncompressed, and the ring bytes of the method and of its
    uncompressed reference (:func:`ring_bytes`, ``reference`` as there), per worker per step; and each
    worker's training time.

    One collective each after the loop rather than one per step. NCCL only reduces CUDA tensors: metrics
    travel on the training device and come back."""
    world, n_steps = dist.get_world_size(group), len(records)
    # Per step, the sum of the losses of the workers whose step went ahead and their count.
    went = [not r.skipped and math.isfinite(r.loss) for r in records]
    sums = torch.tensor(
        [[r.loss if ok else 0.0, float(ok)] for r, ok in zip(records, went, strict=True)], dtype=torch.float64
    ).reshape(-1, 2)
    sums = sums.to(device)
    dist.all_reduce(sums, group=group)
    ring, ring_uncompressed = ring_bytes(stats, world, reference)
    mine = torch.tensor(
        [
            stats.bytes_sent,
            stats.bytes_received,
            stats.bytes_uncompressed,
            ring,
            ring_uncompressed,
            sum(r.time for r in records),
        ],
        dtype=torch.float64,
        device=device,
    )
    every = [torch.zeros_like(mine) for _ in range(world)]
    dist.all_gather(every, mine, group=group)
    totals = torch.stack(every).sum(0).cpu()[:5] / (world * n_steps)
    losses = [total / count if count else math.nan for total, count in sums.cpu().tolist()]
    return losses, [float(v) for v in totals], [float(t[5]) for t in every]


def _params_checksum(model: nn.Module) -> torch.Tensor:
    """A few float64 numbers per parameter tensor that differ between ranks if the parameters differ.

    Identical tensors reduce identically on the same hardware, so identical parameters give bit-identical
    checksums; comparing the element-wise max and min across ranks is then an exact test for them being equal
    and costs one tiny all-reduce instead of shipping the model.
    """
    parts = []
    for p in model.parameters():
        v = p.detach().reshape(-1).double()
        parts.append(torch.stack([v.sum(), (v * v).sum(), v[0], v[-1], v[v.numel() // 2]]))
    return torch.cat(parts) if parts else torch.zeros(1, dtype=torch.float64)


def params_agreement(
    model: nn.Module, device: torch.device, group: dist.ProcessGroup | None = None
) -> tuple[bool, float]:
    """Whether every worker holds bit-identical parameters, and otherwise the largest difference."""
    checksum = _params_checksum(model).to(device)
    high, low = checksum.clone(), checksum.clone()
    dist.all_reduce(high, op=dist.ReduceOp.MAX, group=group)
    dist.all_reduce(low, op=dist.ReduceOp.MIN, group=group)
    if torch.equal(high, low):
        return True, 0.0
    # Worth a number: how far apart are they? The full vector travels only in this case (every rank takes
    # this branch, as the all-reduced checksums are the same everywhere).
    vec = torch.cat([p.detach().reshape(-1).double() for p in model.parameters()])
    high, low = vec.clone(), vec
    dist.all_reduce(high, op=dist.ReduceOp.MAX, group=group)
    dist.all_reduce(low, op=dist.ReduceOp.MIN, group=group)
    return False, float((high - low).max())
