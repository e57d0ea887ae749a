"""Predictions over a grid of clusters (``gradzip simulate``) and the advice for one (``gradzip advise``)."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gradzip.sim.network import Link
from gradzip.sim.plans import PLANS, Cluster
from gradzip.sim.predict import Prediction, predict
from gradzip.sim.profile import ModelProfile

DEFAULT_METHODS = [m for m in PLANS if m != "floor"]


def parse_method(text: str) -> tuple[str, dict[str, Any]]:
    """``NAME[:KEY=VALUE...]`` as ``gradzip bench`` takes it, for the methods the simulator plans."""
    from gradzip.bench.runner import parse_method as bench_parse

    name, options = bench_parse(text)
    if name not in PLANS:
        raise ValueError(f"method {name!r} is not simulated; valid: {', '.join(PLANS)}")
    return name, options


def make_link(bandwidth: str, latency: str = "0ms", message_s: float | None = None) -> Link:
    """A link from the bench's spellings (``1gbit``, ``100gbit``...; ``unlimited`` is not a rate here)."""
    from gradzip.bench.network import parse_bandwidth, parse_latency
    from gradzip.sim.network import DEFAULT_MESSAGE_S

    bits = parse_bandwidth(bandwidth)
    if bits is None:
        raise ValueError(
            f"bandwidth {bandwidth!r} is invalid here: the simulator needs a rate such as 10gbit"
        )
    return Link(bits, parse_latency(latency), DEFAULT_MESSAGE_S if message_s is None else message_s)


def check_inputs(
    methods: Sequence[str],
    workers: Sequence[int],
    bandwidths: Sequence[str],
    latency: str = "0ms",
    allow_floor: bool = False,
    advice: bool = False,
) -> None:
    """Raise ValueError naming the first bad method, worker count, bandwidth, latency or topology: before
    any work. ``floor`` is a measurement's reference, not a method to run, unless ``allow_floor``; advice needs
    two methods to rank (ssgd is always one)."""
    from gradzip.comm.topology import make_topology
    from gradzip.registry import family

    parsed = [parse_method(m) for m in methods]
    if not allow_floor and any(name == "floor" for name, _ in parsed):
        raise ValueError(
            "floor (communication switched off) is the benchmark's reference, not a method to simulate"
        )
    if advice and len({*methods, "ssgd"}) < 2:
        raise ValueError(
            f"--methods {','.join(methods)} leaves nothing to rank against ssgd: give another method"
        )
    for bw in bandwidths:
        link = make_link(bw, latency)
        for n in workers:
            Cluster(n, link)
            for name, options in parsed:
                if name != "floor" and family(name, options) == "gossip":
                    make_topology(str(options.get("topology", "ring")), n)


def simulate_grid(
    profile: ModelProfile,
    methods: Sequence[str],
    workers: Sequence[int],
    bandwidths: Sequence[str],
    latency: str = "0ms",
    bucket_cap_mb: float = 25.0,
    message_s: float | None = None,
) -> list[Prediction]:
    """Every method on every (workers, bandwidth) cluster, ``ssgd`` first in each; each prediction is
    labelled with its method as written."""
    texts = list(methods)
    parsed = [parse_method(m) for m in texts]
    if "ssgd" not in [name for name, _ in parsed]:
        texts.insert(0, "ssgd")
        parsed.insert(0, ("ssgd", {}))
    out: list[Prediction] = []
    for n in workers:
        for bw in bandwidths:
            cluster = Cluster(n, make_link(bw, latency, message_s), bucket_cap_mb)
            out.extend(
                predict(profile, name, cluster, opts, bw, text)
                for (name, opts), text in zip(parsed, texts, strict=True)
            )
    return out


def speedups(preds: Sequence[Prediction], over: str = "ssgd") -> dict[tuple[int, str, str], float]:
    """(workers, bandwidth, method) -> the reference's predicted time over the method's."""
    ref = {(p.workers, p.bandwidth): p.iteration_s for p in preds if p.method == over}
    return {
        (p.workers, p.bandwidth, p.method): ref[(p.workers, p.bandwidth)] / p.iteration_s
        for p in preds
        if (p.workers, p.bandwidth) in ref
    }


def markdown(preds: Sequence[Prediction], profile: ModelProfile) -> str:
    """Predicted ms per iteration and speed-up over ssgd: a row per method, a column per cluster."""
    ups = speedups(preds)
    clusters = list(dict.fromkeys((p.workers, p.bandwidth) for p in preds))
    methods = list(dict.fromkeys(p.method for p in preds))
    by = {(p.workers, p.bandwidth, p.method): p for p in preds}
    head = "| method | " + " | ".join(f"{n} x {bw}" for n, bw in clusters) + " |"
    lines = [
        f"{profile.model}, batch {profile.batch_size} per worker, profile {profile.device} ({profile.source}); "
        "predicted ms per iteration (speed-up over ssgd)",
        "",
        head,
        "|---|" + "---:|" * len(clusters),
    ]
    for m in methods:
        cells = [f"{1e3 * by[(n, bw, m)].iteration_s:.0f} ({ups[(n, bw, m)]:.2f}x)" for n, bw in clusters]
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(preds: Sequence[Prediction], path: Path, title: str) -> Path:
    """Speed-up over ssgd against the worker count, a panel per bandwidth, a line per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ups = speedups(preds)
    bandwidths = list(dict.fromkeys(p.bandwidth for p in preds))
    methods = list(dict.fromkeys(p.method for p in preds))
    fig, axes = plt.subplots(1, len(bandwidths), figsize=(5 * len(bandwidths) + 2, 4.2), squeeze=False)
    for ax, bw in zip(axes[0], bandwidths, strict=True):
        for m in methods:
            pts = sorted(
                (p.workers, ups[(p.workers, bw, m)]) for p in preds if p.bandwidth == bw and p.method == m
            )
            ax.plot([x for x, _ in pts], [y for _, y in pts], marker="o", label=m)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.axhline(1.0, color="grey", lw=0.8)
        ax.set_title(bw)
        ax.set_xlabel("workers")
        ax.set_ylabel("predicted speed-up over ssgd")
    axes[0][-1].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# ------------------------------------------------------------------------------------------ advice


@dataclass(frozen=True)
class Advice:
    """Methods ranked by predicted time per iteration, and why the first one wins."""

    ranking: list[Prediction]
    reason: str


def _critical(p: Prediction) -> str:
    parts = {"compute": p.compute_s, "compression": p.compression_s, "communication not hidden": p.exposed_s}
    return ", ".join(f"{k} {1e3 * v:.0f} ms" for k, v in parts.items())


def advise(
    profile: ModelProfile,
    workers: int,
    bandwidth: str,
    methods: Sequence[str] = DEFAULT_METHODS,
    latency: str = "0ms",
    bucket_cap_mb: float = 25.0,
) -> Advice:
    preds = simulate_grid(profile, methods, [workers], [bandwidth], latency, bucket_cap_mb)
    ranking = sorted(preds, key=lambda p: p.iteration_s)
    best, second = ranking[0], ranking[1]
    lines = [
        f"{best.method} wins: {1e3 * best.iteration_s:.0f} ms per iteration ({_critical(best)}); "
        f"it sends {best.sent_bytes / 1e6:.2f} MB per worker per step ({best.wire}).",
    ]
    gap = second.iteration_s - best.iteration_s
    lines.append(
        f"Runner-up {second.method}: {1e3 * second.iteration_s:.0f} ms ({_critical(second)}), "
        f"{100 * gap / best.iteration_s:.0f}% slower."
    )
    lines.append(_what_it_takes(profile, best, second, workers, bandwidth, latency, bucket_cap_mb))
    return Advice(ranking, "\n".join(lines))


def _what_it_takes(
    profile: ModelProfile,
    best: Prediction,
    second: Prediction,
    workers: int,
    bandwidth: str,
    latency: str,
    bucket_cap_mb: float,
) -> str:
    """The link speed at which the runner-up would overtake (scanned over 1/1000x to 1000x), or the
    compression it would have to shed."""
    name2, opts2 = parse_method(second.method)
    name1, opts1 = parse_method(best.method)
    base = make_link(bandwidth, latency)
    assert base.bandwidth is not None
    # Nearest first: 1.25x faster, 1.25x slower, 1.25^2x faster, ...
    for k in (f for i in range(1, 32) for f in (1.25**i, 0.8**i)):
        link = dataclasses.replace(base, bandwidth=base.bandwidth * k)
        cluster = Cluster(workers, link, bucket_cap_mb)
        t1 = predict(profile, name1, cluster, opts1).iteration_s
        t2 = predict(profile, name2, cluster, opts2).iteration_s
        if t2 < t1:
            return (
                f"{second.method} would overtake on a link {k:.2g}x as fast "
                f"({_rate(base.bandwidth * k)}), where it takes {1e3 * t2:.0f} ms against {1e3 * t1:.0f} ms."
            )
    gap = second.iteration_s - best.iteration_s
    if second.compression_s > gap:
        return (
            f"No link speed from 1/1000x to 1000x changes the order; {second.method} would need to spend "
            f"{1e3 * gap:.0f} ms less on compression ({100 * gap / second.compression_s:.0f}% of its "
            f"{1e3 * second.compression_s:.0f} ms)."
        )
    return "No link speed from 1/1000x to 1000x changes the order, nor could cheaper compression alone."


def _rate(bits: float) -> str:
    return f"{bits / 1e9:.3g} Gbit/s" if bits >= 1e9 else f"{bits / 1e6:.3g} Mbit/s"
