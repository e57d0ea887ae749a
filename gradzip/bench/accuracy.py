"""Time to accuracy: training time until each method first reaches a target test accuracy on the default
task (or the default dataset with another model), with every worker on the emulated cluster.

Each run is ``gradzip train`` itself, started as torchrun would start it (one process per host namespace),
so what is measured is exactly what a user runs.
"""

from __future__ import annotations

import json
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from gradzip.registry import methods as registry_methods


def run_time_to_accuracy(
    methods: Sequence[str],
    workers: int,
    bandwidths: Sequence[str],
    out_dir: Path,
    target: float = 0.95,
    eval_every: int = 10,
    steps: int = 600,
    timeout: float = 600.0,
    progress: bool = True,
    latency: str = "0ms",
    model: str | None = None,
) -> list[dict[str, Any]]:
    from gradzip.bench.cluster import EmulatedCluster
    from gradzip.bench.runner import ResultLog, run_in_cluster

    unknown = [m for m in methods if m not in registry_methods()]
    if unknown:
        raise ValueError(
            f"time to accuracy trains with registry methods only; not {unknown[0]!r} "
            f"(valid: {', '.join(registry_methods())})"
        )
    out_dir.mkdir(parents=True, exist_ok=True)
    log = ResultLog(
        out_dir / "time_to_accuracy.json", len(methods) * len(bandwidths), progress, "run", references=False
    )
    with tempfile.TemporaryDirectory(prefix="gradzip-tta-") as tmp, log:
        for bandwidth in bandwidths:
            with EmulatedCluster(workers, bandwidth, latency) as cluster:
                for method in methods:
                    log.start(f"{method} x{workers} @{bandwidth}")
                    out = Path(tmp) / f"{method}-{bandwidth}.json"
                    argv = [
                        sys.executable, "-m", "gradzip", "train", "--method", method,
                        "--steps", str(steps), "--eval-every", str(eval_every),
                        "--target-accuracy", str(target), "--json", str(out), "--quiet",
                        "--backend", "gloo",  # NCCL would bypass the emulated links (shared memory)
                    ]  # fmt: skip
                    if model is not None:
                        argv += ["--model", model]
                    error = run_in_cluster(cluster, workers, argv, timeout, Path(tmp))
                    row: dict[str, Any] = {"method": method, "workers": workers, "bandwidth": bandwidth}
                    if error is None and out.exists():
                        summary = json.loads(out.read_text())
                        summary.pop("history", None)
                        row.update(summary)
                    else:
                        row["error"] = error or "no result written"
                    log.add(row)
    return log.rows


def markdown(results: Sequence[dict[str, Any]]) -> str:
    lines = [
        "| bandwidth | method | time to target (s) | steps to target | final accuracy | time/step (ms) | sent/step |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in results:
        head = f"| {r['bandwidth']} | {r['method']} "
        if "error" in r:
            lines.append(head + f"| failed: {r['error']} | | | | |")
            continue
        t = r.get("time_to_target_s")
        lines.append(
            head + f"| {'not reached' if t is None else f'{t:.2f}'} | {r.get('steps_to_target') or '-'} "
            f"| {100 * r['test_accuracy']:.2f}% | {1000 * r['time_per_step_s']:.1f} "
            f"| {r['bytes_sent_per_step'] / 1e3:.1f} kB |"
        )
    return "\n".join(lines) + "\n"


def plot(results: Sequence[dict[str, Any]], out_dir: Path) -> list[Path]:
    """Test accuracy against training time, one panel per bandwidth."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in results if r.get("accuracy_history")]
    bandwidths = list(dict.fromkeys(r["bandwidth"] for r in ok))
    if not bandwidths:
        return []
    fig, axes = plt.subplots(1, len(bandwidths), figsize=(6 * len(bandwidths) + 2, 4.5), squeeze=False)
    for ax, bandwidth in zip(axes[0], bandwidths, strict=True):
        for r in (r for r in ok if r["bandwidth"] == bandwidth):
            hist = r["accuracy_history"]
            ax.plot([h["train_time_s"] for h in hist], [100 * h["accuracy"] for h in hist], label=r["method"])
        target = ok[0].get("target_accuracy")
        if target:
            ax.axhline(100 * target, color="grey", lw=0.8, ls="--")
        ax.set_title(f"{ok[0]['workers']} workers, {bandwidth}")
        ax.set_xlabel("training time (s)")
        ax.set_ylabel("test accuracy (%)")
        ax.set_ylim(50, 100)
    axes[0][-1].legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    path = out_dir / "time_to_accuracy.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return [path]
