"""The benchmark's outputs: a markdown table and PNG plots, from the results that ``runner`` saves."""

from __future__ import annotations

import json
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from gradzip.util import format_bytes


def _ms(v: float | None) -> str:
    return "-" if v is None else f"{1000 * v:.0f}"


def _ratio(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}x"


def _wire(measured: float | None, modelled: float | None) -> str:
    """Measured wire bytes with the model's in brackets ("-" for what is not available)."""
    if measured is None and modelled is None:
        return "-"
    return f"{format_bytes(measured)} ({format_bytes(modelled)})"


def method_label(spec: dict[str, Any]) -> str:
    opts = ",".join(f"{k}={v}" for k, v in sorted(spec["options"].items()))
    return f"{spec['method']}" + (f" ({opts})" if opts else "")


def markdown(results: Sequence[dict[str, Any]]) -> str:
    """One row per configuration; times in ms (median, and p10-p90 spread over the measured iterations). The
    DDP bucket size gets a column when it varies (a tensor-fusion sweep).

    Bytes are per worker per step: the payload handed to collectives (``CommStats``), then what crossed the
    worker's link, measured, with the model's figure in brackets (``gradzip.bench.wire``). A group in which
    a method beat the floor gets no ratios ("unreliable") and a note below the table saying why."""
    buckets = len({r["spec"]["bucket_cap_mb"] for r in results}) > 1
    rounds = len({r["spec"].get("round", 0) for r in results}) > 1
    head = (
        "| model | workers | bandwidth | batch |"
        + (" bucket MB |" if buckets else "")
        + (" round |" if rounds else "")
        + " method | iteration ms (p10-p90) | vs floor | speed-up vs ssgd "
        "| fwd+bwd | compress | comm wait | optimizer | payload sent/step | payload received/step "
        "| wire sent/step (model) | wire received/step (model) | samples/s |"
    )
    lines = [head, "|" + "---|" * (17 + buckets + rounds)]
    unreliable: dict[str, str] = {}
    for r in results:
        s = r["spec"]
        where = (
            f"| {s['model']} | {s['workers']} | {s['bandwidth']} | {s['batch_size']} "
            + (f"| {s['bucket_cap_mb']:g} " if buckets else "")
            + (f"| {s.get('round', 0)} " if rounds else "")
            + f"| {method_label(s)} "
        )
        if "error" in r:
            lines.append(where + f"| failed: {r['error']} |" + " |" * 11)
            continue
        if r.get("unreliable"):
            vs_floor = speedup = "unreliable"
            unreliable[_group_label(s)] = r["unreliable"]
        else:
            vs_floor, speedup = _ratio(r.get("vs_floor")), _ratio(r.get("speedup_vs_ssgd"))
        sent = _wire(r.get("wire_bytes_sent_per_step"), r.get("model_wire_bytes_sent_per_step"))
        received = _wire(r.get("wire_bytes_received_per_step"), r.get("model_wire_bytes_received_per_step"))
        lines.append(
            where + f"| {_ms(r['median_s'])} ({_ms(r['p10_s'])}-{_ms(r['p90_s'])}) | {vs_floor} | {speedup} "
            f"| {_ms(r['forward_backward_s'])} | {_ms(r['compress_s'])} | {_ms(r['wait_s'])} "
            f"| {_ms(r['optimizer_s'])} | {format_bytes(r['bytes_sent_per_step'])} "
            f"| {format_bytes(r['bytes_received_per_step'])} | {sent} | {received} | {r['samples_per_s']:.0f} |"
        )
    if unreliable:
        lines.append("\nUnreliable groups (their ratios are not shown):\n")
        lines += [f"- {where}: {reason}" for where, reason in unreliable.items()]
    return "\n".join(lines) + "\n"


def _group_label(spec: dict[str, Any]) -> str:
    """A group of configurations (``runner.group_key``) in words."""
    return (
        f"{spec['model']}, {spec['workers']} workers, {spec['bandwidth']}"
        + (f" +{spec['latency']}" if spec.get("latency", "0ms") != "0ms" else "")
        + f", batch {spec['batch_size']}, bucket {spec['bucket_cap_mb']:g} MB, round {spec.get('round', 0)}"
    )


def _config_key(spec: dict[str, Any]) -> str:
    """A configuration without its round."""
    return json.dumps({k: v for k, v in spec.items() if k != "round"}, sort_keys=True)


def median_rounds(results: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """One result per configuration: of its rounds, the one with the median iteration time (the lower
    middle one for an even count), so its parts and ratios stay those of one real run."""
    by: dict[str, list[dict[str, Any]]] = {}
    for r in results:
        if "median_s" in r:
            by.setdefault(_config_key(r["spec"]), []).append(r)
    return [sorted(rs, key=lambda r: r["median_s"])[(len(rs) - 1) // 2] for rs in by.values()]


def across_rounds(results: Sequence[dict[str, Any]]) -> str:
    """The spread between rounds (``--rounds``): per configuration, the median and range over rounds of its
    iteration time, its ratio to the floor and its speed-up over ssgd (each from its own round). Ratios
    leave out unreliable rounds (a method beat the floor there), and say how many they left out."""
    by: dict[str, list[dict[str, Any]]] = {}
    for r in results:
        if "median_s" in r:
            by.setdefault(_config_key(r["spec"]), []).append(r)
    lines = [
        "| model | workers | bandwidth | batch | method | rounds | iteration ms | vs floor | speed-up vs ssgd |",
        "|---|---|---|---|---|---|---|---|---|",
    ]

    def spread(values: list[float | None], fmt: str) -> str:
        vals = sorted(v for v in values if v is not None)
        if not vals:
            return "-"
        return f"{fmt.format(statistics.median(vals))} ({fmt.format(vals[0])}–{fmt.format(vals[-1])})"

    for rs in by.values():
        s = rs[0]["spec"]
        ok = [r for r in rs if not r.get("unreliable")]
        left_out = len(rs) - len(ok)
        note = "" if not left_out else f" ({left_out} of {len(rs)} rounds unreliable)"

        def ratio(key: str, rows: list[dict[str, Any]] = ok, note: str = note) -> str:
            return spread([r.get(key) for r in rows], "{:.2f}x") + note if rows else "unreliable"

        lines.append(
            f"| {s['model']} | {s['workers']} | {s['bandwidth']} | {s['batch_size']} | {method_label(s)} "
            f"| {len(rs)} | {spread([1000 * r['median_s'] for r in rs], '{:.0f}')} "
            f"| {ratio('vs_floor')} | {ratio('speedup_vs_ssgd')} |"
        )
    return "\n".join(lines) + "\n"


def plots(results: Sequence[dict[str, Any]], out_dir: Path) -> list[Path]:
    """PNG plots: iteration time against bandwidth per method, speed-up over ssgd against workers, and the
    time breakdown per method. A plot whose axis has a single value in this run is skipped."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display is needed or assumed
    import matplotlib.pyplot as plt

    ok = median_rounds(results)  # with --rounds, each configuration's median round
    written: list[Path] = []
    bandwidth_order = ["100mbit", "1gbit", "10gbit", "unlimited"]
    bandwidths = sorted(
        {r["spec"]["bandwidth"] for r in ok},
        key=lambda b: (b not in bandwidth_order, bandwidth_order.index(b) if b in bandwidth_order else 0, b),
    )
    methods = list(dict.fromkeys(method_label(r["spec"]) for r in ok))
    workers = sorted({r["spec"]["workers"] for r in ok})

    if len(bandwidths) > 1:
        fig, ax = plt.subplots(figsize=(9, 4.5))
        for m in methods:
            pts = [
                (bandwidths.index(r["spec"]["bandwidth"]), 1000 * r["median_s"])
                for r in ok
                if method_label(r["spec"]) == m and r["spec"]["workers"] == workers[-1]
            ]
            if pts:
                xs, ys = zip(*sorted(pts), strict=True)
                ax.plot(xs, ys, marker="o", label=m)
        ax.set_xticks(range(len(bandwidths)), bandwidths)
        ax.set_xlabel("link bandwidth")
        ax.set_ylabel("iteration time (ms, median)")
        ax.set_yscale("log")
        ax.set_title(f"Iteration time against bandwidth ({workers[-1]} workers)")
        _legend_outside(ax)
        fig.tight_layout()
        written.append(_save(fig, out_dir / "time_vs_bandwidth.png"))

    if len(workers) > 1:
        fig, ax = plt.subplots(figsize=(9, 4.5))
        for m in methods:
            pts = [
                (r["spec"]["workers"], r["speedup_vs_ssgd"])
                for r in ok
                if method_label(r["spec"]) == m
                and r.get("speedup_vs_ssgd") is not None
                and not r.get("unreliable")
                and r["spec"]["bandwidth"] == bandwidths[0]
            ]
            if pts:
                xs, ys = zip(*sorted(pts), strict=True)
                ax.plot(xs, ys, marker="o", label=m)
        ax.axhline(1.0, color="grey", lw=0.8)
        ax.set_xlabel("workers")
        ax.set_ylabel("speed-up over ssgd")
        ax.set_title(f"Speed-up over ssgd against workers ({bandwidths[0]})")
        _legend_outside(ax)
        fig.tight_layout()
        written.append(_save(fig, out_dir / "speedup_vs_workers.png"))

    # Breakdown for the most communication-bound group: the one where ssgd is furthest from the floor.
    bound = max(
        (r for r in ok if r["spec"]["method"] == "ssgd" and r.get("vs_floor") and not r.get("unreliable")),
        key=lambda r: r["vs_floor"],
        default=None,
    )
    if bound is not None:
        from gradzip.bench.runner import group_key

        group = [r for r in ok if group_key(r["spec"]) == group_key(bound["spec"])]
        parts = [
            ("forward_backward_s", "forward+backward"),
            ("compress_s", "compression"),
            ("wait_s", "communication wait"),
            ("optimizer_s", "optimizer"),
        ]
        fig, ax = plt.subplots(figsize=(8, 4.5))
        labels = [method_label(r["spec"]) for r in group]
        bottom = [0.0] * len(group)
        for key, name in parts:
            vals = [1000 * (r.get(key) or 0.0) for r in group]
            ax.bar(labels, vals, bottom=bottom, label=name)
            bottom = [b + v for b, v in zip(bottom, vals, strict=True)]
        ax.plot(
            labels, [1000 * r["median_s"] for r in group], "k_", markersize=20, label="iteration (median)"
        )
        s = bound["spec"]
        ax.set_title(f"Where the time goes: {s['model']}, {s['workers']} workers, {s['bandwidth']}")
        ax.set_ylabel("ms per iteration (mean over workers)")
        ax.tick_params(axis="x", rotation=30, labelsize=8)
        ax.legend(fontsize=8)
        fig.tight_layout()
        written.append(_save(fig, out_dir / "breakdown.png"))
    return written


def _legend_outside(ax: Any) -> None:
    """Beside the axes, so no line is hidden under it."""
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0)


def _save(fig: Any, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
