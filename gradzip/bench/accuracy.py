"""Time to accuracy: training time until each method first reaches a target test accuracy on the default
task (or another embedded dataset and model, e.g. ``mnist1d`` with ``cnn1d``), with every worker on the
emulated cluster.

Each run is ``gradzip train`` itself, started as torchrun would start it (one process per host namespace, and
one more host for each dedicated parameter server), so what is measured is exactly what a user runs. A method
may carry options, ``NAME:KEY=VALUE[:KEY=VALUE]`` as in the rest of the benchmark, e.g. ``topk:density=0.05``;
they become ``gradzip train``'s method flags.
"""

from __future__ import annotations

import json
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from gradzip.bench.runner import parse_method
from gradzip.registry import make_config, option_flag, servers_needed
from gradzip.registry import methods as registry_methods


def train_argv(
    method: str,
    out: Path,
    *,
    steps: int,
    eval_every: int,
    target: float,
    model: str | None = None,
    dataset: str | None = None,
    lr: float | None = None,
    batch_size: int | None = None,
) -> tuple[list[str], int]:
    """The ``gradzip train`` command line of one run of ``method`` (``NAME[:KEY=VALUE...]``), and how many
    servers it needs beside the workers. None leaves a setting at ``gradzip train``'s default."""
    name, options = parse_method(method)
    if name not in registry_methods():
        raise ValueError(
            f"time to accuracy trains with registry methods only; not {name!r} "
            f"(valid: {', '.join(registry_methods())})"
        )
    argv = [
        sys.executable, "-m", "gradzip", "train", "--method", name,
        "--steps", str(steps), "--eval-every", str(eval_every),
        "--target-accuracy", str(target), "--json", str(out), "--quiet",
        "--backend", "gloo",  # NCCL would bypass the emulated links (shared memory)
    ]  # fmt: skip
    for flag, value in (
        ("--model", model),
        ("--dataset", dataset),
        ("--lr", lr),
        ("--batch-size", batch_size),
    ):
        if value is not None:
            argv += [flag, str(value)]
    for key, value in options.items():
        flag = option_flag(key)
        if isinstance(value, bool):
            argv.append(flag if value else "--no-" + flag.removeprefix("--"))
        else:
            argv += [flag, str(value)]
    return argv, servers_needed(name, make_config(name, **options).to_dict())


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
    dataset: str | None = None,
    lr: float | None = None,
    batch_size: int | None = None,
) -> list[dict[str, Any]]:
    """One ``gradzip train`` run per method and bandwidth; ``model``, ``dataset``, ``lr`` and ``batch_size``
    are passed on when given (None: ``gradzip train``'s defaults, the default task)."""
    from gradzip.bench.cluster import EmulatedCluster
    from gradzip.bench.runner import ResultLog, run_in_cluster

    out_dir.mkdir(parents=True, exist_ok=True)
    log = ResultLog(
        out_dir / "time_to_accuracy.json", len(methods) * len(bandwidths), progress, "run", references=False
    )
    with tempfile.TemporaryDirectory(prefix="gradzip-tta-") as tmp, log:
        # Every command line first, so that a bad method fails before any cluster is built.
        runs = []
        for i, method in enumerate(methods):
            out = Path(tmp) / f"run{i}.json"
            argv, servers = train_argv(
                method, out, steps=steps, eval_every=eval_every, target=target, model=model,
                dataset=dataset, lr=lr, batch_size=batch_size,
            )  # fmt: skip
            runs.append((method, out, argv, workers + servers))
        for bandwidth in bandwidths:
            with EmulatedCluster(max(r[3] for r in runs), bandwidth, latency) as cluster:
                for method, out, argv, processes in runs:
                    log.start(f"{method} x{workers} @{bandwidth}")
                    out.unlink(missing_ok=True)
                    error = run_in_cluster(cluster, processes, argv, timeout, Path(tmp))
                    row: dict[str, Any] = {"method": method, "workers": workers, "bandwidth": bandwidth}
                    if error is None and out.exists():
                        summary = json.loads(out.read_text())
                        summary.pop("history", None)
                        row.update(summary)
                    else:
                        row["error"] = error or "no result written"
                    # As given, options included (the summary's own "method" is the bare name).
                    row["method"] = method
                    if "error" in row:  # a summary names them, default or not
                        row.update(model=model, dataset=dataset)
                    log.add(row)
    return log.rows


def markdown(results: Sequence[dict[str, Any]]) -> str:
    """The table: per run, time and steps to the target, the final accuracy and its gap to ssgd's (in
    percentage points, at the same bandwidth; blank without an ssgd run), time and bytes sent per step."""
    lines = [
        "| bandwidth | method | time to target (s) | steps to target | final accuracy | vs ssgd "
        "| time/step (ms) | sent/step |",
        "|---|---|---|---|---|---|---|---|",
    ]
    ssgd = {r["bandwidth"]: r["test_accuracy"] for r in results if r["method"] == "ssgd" and "error" not in r}
    for r in results:
        head = f"| {r['bandwidth']} | {r['method']} "
        if "error" in r:
            lines.append(head + f"| failed: {r['error']} | | | | | |")
            continue
        t = r.get("time_to_target_s")
        ref = ssgd.get(r["bandwidth"])
        gap = "" if ref is None else f"{100 * (r['test_accuracy'] - ref):+.1f}"
        lines.append(
            head + f"| {'not reached' if t is None else f'{t:.2f}'} | {r.get('steps_to_target') or '-'} "
            f"| {100 * r['test_accuracy']:.2f}% | {gap} | {1000 * r['time_per_step_s']:.1f} "
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
        for i, r in enumerate(r for r in ok if r["bandwidth"] == bandwidth):
            hist = r["accuracy_history"]
            # The colour cycle has ten colours: past ten runs, the style tells the lines apart.
            style = ("-", "--", ":")[min(i // 10, 2)]
            ax.plot(
                [h["train_time_s"] for h in hist],
                [100 * h["accuracy"] for h in hist],
                style,
                label=r["method"],
            )
        target = ok[0].get("target_accuracy")
        if target:
            ax.axhline(100 * target, color="grey", lw=0.8, ls="--")
        ax.set_title(f"{ok[0]['workers']} workers, {bandwidth}")
        ax.set_xlabel("training time (s)")
        ax.set_ylabel("test accuracy (%)")
        # From 50% unless a run ends below it (a harder task, or a method that falls behind).
        lowest = min(100 * r["test_accuracy"] for r in ok)
        ax.set_ylim(min(50, max(0, 10 * (int(lowest) // 10) - 10)), 100)
    axes[0][-1].legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    path = out_dir / "time_to_accuracy.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return [path]
