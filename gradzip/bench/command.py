"""``gradzip bench``: its flags and what it prints and writes."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

from gradzip.bench.runner import DEFAULT_METHODS, Grid
from gradzip.util import check_writable, comma_list


def _join(values: list[Any]) -> str:
    return ",".join(str(v) for v in values)


def add_parser(sub: Any, formatter: type[argparse.HelpFormatter]) -> None:
    g = Grid()
    bench = sub.add_parser(
        "bench",
        help="measure methods side by side on an emulated cluster",
        description="Measure methods side by side, in fresh processes, on an emulated cluster: one network "
        "namespace per worker behind rate-limited veth links (root needed for a limited bandwidth). Every "
        "group of configurations also measures the floor (no communication) and ssgd.",
        formatter_class=formatter,
    )
    bench.add_argument(
        "--methods",
        type=comma_list(str),
        default=None,
        help=f"comma-separated methods (default {','.join(DEFAULT_METHODS)}): registry names, floor, "
        "torch-powersgd, each with options as NAME:KEY=VALUE[:KEY=VALUE], e.g. "
        "doublesqueeze:placement=server:servers=2 or powergossip:topology=torus; with --kernels, kernel rows "
        "(default every one; sign-bucket, sign-per-tensor, qsgd-bucket, qsgd-per-tensor on request)",
    )
    bench.add_argument(
        "--models",
        type=comma_list(str),
        default=None,
        help=f"comma-separated models (default {','.join(g.models)}; with --time-to-accuracy, the first one "
        "replaces the default task's model)",
    )
    bench.add_argument(
        "--workers", type=comma_list(int), default=_join(g.workers), help="comma-separated worker counts"
    )
    bench.add_argument(
        "--bandwidth",
        type=comma_list(str),
        default=",".join(g.bandwidths),
        help="comma-separated link bandwidths: 100mbit, 1gbit, 10gbit, unlimited (loopback), or e.g. 250mbit",
    )
    bench.add_argument("--latency", default=g.latency, help="one-way delay added to each link, e.g. 1ms")
    bench.add_argument(
        "--batch-size",
        type=comma_list(int),
        default=_join(g.batch_sizes),
        help="comma-separated batch sizes per worker (with --time-to-accuracy, the first one)",
    )
    bench.add_argument(
        "--rank",
        type=comma_list(int),
        default=_join(g.ranks),
        help="comma-separated ranks for the low-rank methods",
    )
    bench.add_argument(
        "--bucket-cap-mb",
        type=comma_list(float),
        default=_join(g.bucket_caps_mb),
        help="comma-separated DDP bucket sizes (tensor fusion)",
    )
    bench.add_argument("--warmup", type=int, default=g.warmup, help="iterations before measuring")
    bench.add_argument("--iters", type=int, default=g.iters, help="measured iterations per configuration")
    bench.add_argument(
        "--rounds",
        type=int,
        default=g.rounds,
        help="run the grid this many times (fresh processes each time) and report the spread between rounds",
    )
    bench.add_argument(
        "--image-size", type=int, default=g.image_size, help="input height and width for image models"
    )
    bench.add_argument("--seq-len", type=int, default=g.seq_len, help="sequence length for BERT models")
    bench.add_argument("--timeout", type=float, default=g.timeout, help="seconds a configuration may take")
    bench.add_argument(
        "--out",
        type=Path,
        default=Path("runs/bench"),
        help="folder for results.json, results.md and the plots",
    )
    bench.add_argument("--quiet", action="store_true", help="no progress bar")
    bench.add_argument(
        "--kernels",
        action="store_true",
        help="measure compress+decompress throughput of every compressor instead",
    )
    bench.add_argument(
        "--shapes",
        type=comma_list(str),
        default="resnet50",
        help="comma-separated models whose gradient shapes --kernels runs over",
    )
    bench.add_argument(
        "--device",
        default="cpu",
        help="cpu or cuda: where the workers train (cuda: DDP-hook methods, a GPU per worker by local rank, "
        "gloo carrying CUDA tensors); for --kernels, cpu (one thread) or cuda[:N]",
    )
    bench.add_argument(
        "--cleanup", action="store_true", help="remove network namespaces left by a killed run, then exit"
    )
    bench.add_argument(
        "--time-to-accuracy",
        action="store_true",
        help="train the default task (or --dataset with the first of --models) with each registry method of "
        "--methods on the first --workers value, per --bandwidth, and report the training time until "
        "--target-accuracy",
    )
    bench.add_argument(
        "--target-accuracy", type=float, default=0.95, help="test accuracy for --time-to-accuracy, in (0, 1]"
    )
    bench.add_argument(
        "--eval-every", type=int, default=10, help="steps between accuracy checks for --time-to-accuracy"
    )
    bench.add_argument("--steps", type=int, default=600, help="training steps per run for --time-to-accuracy")
    bench.add_argument(
        "--dataset",
        default=None,
        help="dataset for --time-to-accuracy, as gradzip train's --dataset: an embedded name (digits, mnist1d) "
        "or a local path (default: gradzip train's, digits)",
    )
    bench.add_argument(
        "--lr",
        type=float,
        default=None,
        help="SGD learning rate for --time-to-accuracy (default: gradzip train's)",
    )


def run(args: argparse.Namespace, usage_error: type[Exception]) -> int:
    from gradzip.bench.iproute import ClusterError
    from gradzip.bench.netns import remove_leftovers

    if args.cleanup:
        removed = remove_leftovers()
        print(f"removed {len(removed)} namespace(s)" + (f": {', '.join(removed)}" if removed else ""))
        return 0
    try:  # before any configuration runs: a wrong --out must not cost a whole grid
        check_writable(args.out / "results.json", "--out")
    except ValueError as err:
        raise usage_error(str(err)) from None
    if args.kernels:
        from gradzip.bench import kernels

        # One CPU thread, like each worker of the emulated cluster; it also keeps the numbers stable on a
        # shared machine, where a second thread often waits milliseconds for a pre-empted core.
        try:
            timed = [
                row
                for shapes in args.shapes
                # --methods None: every kernel row (kernels.METHODS)
                for row in kernels.run_kernels(shapes, args.methods, device=args.device, threads=1)
            ]
        except (ValueError, RuntimeError) as err:
            raise usage_error(str(err)) from None
        table = kernels.format_table(timed)
        targets = kernels.format_targets(timed)
        table += f"\n\nTargets:\n{targets}\n" if targets else "\n"
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "kernels.md").write_text(table)
        print(table)
        return 0
    if args.methods is None:
        args.methods = list(DEFAULT_METHODS)
    if args.time_to_accuracy:
        return _time_to_accuracy(args, usage_error)
    from gradzip.train.env import under_torchrun

    if under_torchrun():
        return _run_under_torchrun(args, usage_error)
    try:
        _check_network(args)
        grid = _grid(args, workers=args.workers, bandwidths=args.bandwidth, latency=args.latency)
    except (ValueError, ClusterError) as err:
        raise usage_error(str(err)) from None

    from gradzip.bench import report
    from gradzip.bench.runner import run_grid

    print(f"gradzip bench: {len(grid.specs())} configurations -> {args.out}", file=sys.stderr)
    results = run_grid(grid, args.out, progress=not args.quiet)
    _write_outputs(args.out, "results", _table(results, grid.rounds), report.plots(results, args.out))
    return 1 if all("error" in r for r in results) else 0


def _run_under_torchrun(args: argparse.Namespace, usage_error: type[Exception]) -> int:
    """On a real cluster: torchrun's processes and network, no emulation (--bandwidth and --workers are
    what torchrun and the network are)."""
    from gradzip.bench import report
    from gradzip.bench.runner import REAL_NETWORK, run_grid_under_torchrun

    world = int(os.environ["WORLD_SIZE"])
    try:
        grid = _grid(args, workers=[world], bandwidths=[REAL_NETWORK])
    except ValueError as err:
        raise usage_error(str(err)) from None
    if os.environ.get("RANK", "0") == "0":
        print(
            f"gradzip bench: {len(grid.specs())} configurations on torchrun's {world} processes, no emulation "
            f"(--bandwidth and --workers do not apply) -> {args.out}",
            file=sys.stderr,
        )
    results = run_grid_under_torchrun(grid, args.out, progress=not args.quiet)
    if results is None:  # not rank 0
        return 0
    _write_outputs(args.out, "results", _table(results, grid.rounds), report.plots(results, args.out))
    return 1 if all("error" in r for r in results) else 0


def _grid(args: argparse.Namespace, **network: Any) -> Grid:
    """The grid the flags describe; ``network`` (workers, bandwidths, latency) is the emulated cluster's, or
    torchrun's world on its real network."""
    return Grid(
        models=args.models or Grid().models, methods=args.methods, batch_sizes=args.batch_size,
        ranks=args.rank, bucket_caps_mb=args.bucket_cap_mb, warmup=args.warmup, iters=args.iters,
        image_size=args.image_size, seq_len=args.seq_len, timeout=args.timeout, rounds=args.rounds,
        device=args.device, **network,
    )  # fmt: skip


def _table(results: list[dict[str, Any]], rounds: int) -> str:
    """The results table, and with several rounds the spread between them."""
    from gradzip.bench import report

    table = report.markdown(results)
    if rounds > 1:
        table += "\nAcross rounds: median (min–max)\n\n" + report.across_rounds(results)
    return table


def _time_to_accuracy(args: argparse.Namespace, usage_error: type[Exception]) -> int:
    from gradzip.bench import accuracy
    from gradzip.bench.iproute import ClusterError
    from gradzip.bench.runner import RIVALS, parse_method

    try:
        # The floor and torch's hook do not train; a registry method may carry options (NAME:KEY=VALUE).
        chosen = [m for m in args.methods if parse_method(m)[0] not in RIVALS]
        if not chosen:
            raise ValueError(f"no registry method in --methods {','.join(args.methods)}")
        if not 0.0 < args.target_accuracy <= 1.0:
            raise ValueError(f"--target-accuracy {args.target_accuracy} is invalid: it must be in (0, 1]")
        if args.eval_every < 1 or args.steps < 1:
            raise ValueError("--eval-every and --steps must be >= 1")
        _check_task(args)
        _check_network(args)
    except (ValueError, ClusterError) as err:
        raise usage_error(str(err)) from None
    results = accuracy.run_time_to_accuracy(
        chosen, args.workers[0], args.bandwidth, args.out, target=args.target_accuracy,
        eval_every=args.eval_every, steps=args.steps, timeout=args.timeout, progress=not args.quiet,
        latency=args.latency, model=args.models[0] if args.models else None, dataset=args.dataset,
        lr=args.lr, batch_size=args.batch_size[0] if args.batch_size else None,
    )  # fmt: skip
    _write_outputs(args.out, "time_to_accuracy", accuracy.markdown(results), accuracy.plot(results, args.out))
    return 1 if all("error" in r for r in results) else 0


def _check_task(args: argparse.Namespace) -> None:
    """The training settings --time-to-accuracy passes on, checked as gradzip train checks them (the dataset
    readable, the model able to take its samples), before any cluster is built."""
    from gradzip.train.config import TrainConfig
    from gradzip.train.preflight import preflight

    given = {"model": args.models[0] if args.models else None, "dataset": args.dataset, "lr": args.lr}
    batch = args.batch_size[0] if args.batch_size else None
    preflight(
        TrainConfig(
            method="ssgd",
            workers=args.workers[0],
            backend="gloo",
            steps=args.steps,
            batch_size=batch or 32,
            **{k: v for k, v in given.items() if v is not None},
        )
    )


def _check_network(args: argparse.Namespace) -> None:
    """Every --bandwidth and --latency well-formed, and emulable here (root, ip and tc)."""
    from gradzip.bench.network import check_can_emulate, parse_bandwidth, parse_latency

    for b in args.bandwidth:
        parse_bandwidth(b)
    parse_latency(args.latency)
    for b in set(args.bandwidth):
        check_can_emulate(b)


def _write_outputs(out: Path, stem: str, table: str, plots: list[Path]) -> None:
    (out / f"{stem}.md").write_text(table)
    print(table)
    print(
        f"results: {out / (stem + '.json')}, {out / (stem + '.md')}; plots: {', '.join(map(str, plots)) or 'none'}"
    )
