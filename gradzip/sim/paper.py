"""The ACP-SGD paper's grid, predicted: its four models at its batch sizes and ranks, 8 to 64 GPUs, 1, 10 and
100 Gb/s, and ACP-SGD's speed-up over S-SGD and over Power-SGD beside the paper's averages (4.06x, 1.43x).

No GPU was at hand when the shipped profiles were made, so they are **derived**: each model is profiled on
this machine's CPU at a batch that fits the time (``cpu_batch``), then scaled to an RTX 2080 Ti-class GPU
(the paper's testbed as we read it) as :func:`derive` documents. A profile measured on a GPU
(``gradzip profile --device cuda --model M --batch-size B``) replaces a derived one with ``--profile``.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from gradzip.sim.grid import simulate_grid
from gradzip.sim.profile import ModelProfile, measure_profile


@dataclass(frozen=True)
class PaperModel:
    model: str
    batch_size: int
    """The paper's batch per GPU."""
    rank: int
    """The paper's rank for Power-SGD and ACP-SGD."""
    seq_len: int = 64
    image_size: int = 224
    num_classes: int = 1000
    """The head: ImageNet's 1000 classes for the ResNets, a 2-way classifier for BERT."""
    cpu_batch: int = 4
    """The batch profiled on the CPU (forward and backward scale linearly to ``batch_size``)."""


PAPER = (
    PaperModel("resnet50", 64, 4, cpu_batch=8),
    PaperModel("resnet152", 32, 4, cpu_batch=4),
    PaperModel("bert_base", 32, 32, num_classes=2, cpu_batch=8),
    PaperModel("bert_large", 8, 32, num_classes=2, cpu_batch=2),
)
PAPER_SPEEDUP_SSGD, PAPER_SPEEDUP_POWERSGD = 4.06, 1.43
WORKERS = (8, 16, 32, 64)
BANDWIDTHS = ("1gbit", "10gbit", "100gbit")

# The GPU the derived profiles stand for, and the two numbers that scale a CPU profile to it.
GPU = "RTX 2080 Ti (derived)"
GPU_RESNET50_IMAGES_PER_S = 290.0
"""ResNet-50 training throughput (fp32, forward + backward + step) of an RTX 2080 Ti in public benchmarks:
the compute scale of every model is the one that maps our CPU's ResNet-50 step onto it."""
GPU_COPY_BYTES_PER_S = 250e9
"""Input bytes per second of a device-to-device copy on a 616 GB/s card (read + write at ~80%): the memory
scale of the per-element kernel costs, which are memory-bound."""

# Per-message cost of NCCL: over TCP on Ethernet, and over InfiniBand verbs.
MESSAGE_S = {"1gbit": 50e-6, "10gbit": 50e-6, "100gbit": 5e-6}


def measure_cpu(m: PaperModel, repeats: int = 2) -> ModelProfile:
    return measure_profile(
        m.model,
        m.cpu_batch,
        repeats=repeats,
        image_size=m.image_size,
        seq_len=m.seq_len,
        num_classes=m.num_classes,
    )


def derive(cpu: dict[str, ModelProfile]) -> dict[str, ModelProfile]:
    """GPU profiles from CPU ones: compute divided by one factor (ResNet-50's CPU step at the paper's batch
    against ``GPU_RESNET50_IMAGES_PER_S``), per-element work by the copy-rate ratio, batches to the paper's."""
    ref = cpu["resnet50"]
    paper = {m.model: m for m in PAPER}
    per_image_cpu = (ref.forward_s + ref.backward_s) / ref.batch_size
    compute = per_image_cpu * GPU_RESNET50_IMAGES_PER_S
    out = {}
    for name, prof in cpu.items():
        m = paper[name]
        memory = GPU_COPY_BYTES_PER_S / prof.copy_bytes_per_s
        why = (
            f"CPU profile at batch {prof.batch_size} scaled to batch {m.batch_size} and to an RTX 2080 Ti: "
            f"compute / {compute:.0f} (ResNet-50 at {GPU_RESNET50_IMAGES_PER_S:.0f} images/s), kernels / "
            f"{memory:.0f} (copy {GPU_COPY_BYTES_PER_S / 1e9:.0f} GB/s)"
        )
        out[name] = prof.scaled(compute, memory, GPU, m.batch_size, why)
    return out


@dataclass(frozen=True)
class PaperRow:
    model: str
    workers: int
    bandwidth: str
    ssgd_s: float
    powersgd_s: float
    acpsgd_s: float

    @property
    def over_ssgd(self) -> float:
        return self.ssgd_s / self.acpsgd_s

    @property
    def over_powersgd(self) -> float:
        return self.powersgd_s / self.acpsgd_s


def predict_grid(
    profiles: dict[str, ModelProfile],
    workers: Sequence[int] = WORKERS,
    bandwidths: Sequence[str] = BANDWIDTHS,
) -> list[PaperRow]:
    rows: list[PaperRow] = []
    for m in PAPER:
        prof = profiles[m.model]
        for bw in bandwidths:
            methods = [f"powersgd:rank={m.rank}", f"acpsgd:rank={m.rank}"]
            preds = simulate_grid(prof, methods, workers, [bw], message_s=MESSAGE_S.get(bw))
            by = {(p.workers, p.method): p.iteration_s for p in preds}
            rows.extend(
                PaperRow(m.model, n, bw, by[(n, "ssgd")], by[(n, methods[0])], by[(n, methods[1])])
                for n in workers
            )
    return rows


def markdown(rows: Sequence[PaperRow]) -> str:
    lines = [
        "| model | bandwidth | " + " | ".join(f"{n} GPUs" for n in WORKERS) + " |",
        "|---|---|" + "---:|" * len(WORKERS),
    ]
    for model in dict.fromkeys(r.model for r in rows):
        for bw in dict.fromkeys(r.bandwidth for r in rows):
            cells = {r.workers: r for r in rows if r.model == model and r.bandwidth == bw}
            lines.append(
                f"| {model} | {bw} | "
                + " | ".join(f"{cells[n].over_ssgd:.2f}x / {cells[n].over_powersgd:.2f}x" for n in WORKERS)
                + " |"
            )
    s = statistics.fmean(r.over_ssgd for r in rows)
    p = statistics.fmean(r.over_powersgd for r in rows)
    lines += ["", "| mean over | acpsgd / ssgd | acpsgd / powersgd |", "|---|---:|---:|"]
    for bw in dict.fromkeys(r.bandwidth for r in rows):
        sub = [r for r in rows if r.bandwidth == bw]
        lines.append(
            f"| {bw} | {statistics.fmean(r.over_ssgd for r in sub):.2f}x "
            f"| {statistics.fmean(r.over_powersgd for r in sub):.2f}x |"
        )
    for model in dict.fromkeys(r.model for r in rows):
        sub = [r for r in rows if r.model == model]
        lines.append(
            f"| {model} | {statistics.fmean(r.over_ssgd for r in sub):.2f}x "
            f"| {statistics.fmean(r.over_powersgd for r in sub):.2f}x |"
        )
    lines += [
        "",
        f"Mean over the grid: acpsgd **{s:.2f}x** faster than ssgd (paper {PAPER_SPEEDUP_SSGD}x) and "
        f"**{p:.2f}x** faster than powersgd (paper {PAPER_SPEEDUP_POWERSGD}x).",
    ]
    return "\n".join(lines) + "\n"


def ship(out_dir: Path, cpu_dir: Path, repeats: int = 2) -> dict[str, ModelProfile]:
    """Profile the four models on this CPU (written to ``cpu_dir/<model>-cpu.json``), derive their GPU
    profiles and write them to ``out_dir/<model>.json``."""
    cpu = {}
    cpu_dir.mkdir(parents=True, exist_ok=True)
    for m in PAPER:
        cpu[m.model] = measure_cpu(m, repeats)
        cpu[m.model].save(cpu_dir / f"{m.model}-cpu.json")
    derived = derive(cpu)
    for name, prof in derived.items():
        prof.save(out_dir / f"{name}.json")
    return derived
