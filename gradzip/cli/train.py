"""``gradzip train``: its flags, the validated run they describe, and what it prints and writes."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from gradzip.cli.common import PROG, UsageError, positive_float, positive_int
from gradzip.cli.options import add_method_options, method_options
from gradzip.comm.finite import NAN_POLICIES
from gradzip.registry import make_config, methods, servers_needed
from gradzip.train.config import BACKENDS, DATA_SPLITS, DEFAULT_STEPS, TrainConfig
from gradzip.train.data import EMBEDDED
from gradzip.train.env import default_backend, under_torchrun
from gradzip.train.models import MODELS
from gradzip.util import check_writable, write_atomic


def add_parser(sub: Any, formatter: type[argparse.HelpFormatter]) -> None:
    # The defaults live in TrainConfig only (gloo: this instance only reads defaults, and nccl needs CUDA).
    d = TrainConfig(backend="gloo")
    train = sub.add_parser(
        "train",
        help="train a model data-parallel with a gradient compression method",
        description="Train a model with DDP and a gradzip communication hook on local worker processes, "
        "or on torchrun's processes when started by torchrun (torchrun ... -m gradzip train ...).",
        formatter_class=formatter,
    )
    train.add_argument("--method", default=d.method, choices=methods(), help="compression method")
    train.add_argument(
        "--workers",
        type=positive_int,
        default=None,
        help=f"local worker processes to spawn (default {d.workers}; ignored under torchrun, "
        "which sets the world size)",
    )
    train.add_argument("--model", default=d.model, choices=sorted(MODELS), help="model")
    train.add_argument(
        "--dataset", default=d.dataset, help=f"embedded dataset ({', '.join(EMBEDDED)}) or a local path"
    )
    train.add_argument(
        "--batch-size", type=positive_int, default=d.batch_size, help="mini-batch size per worker"
    )
    train.add_argument("--lr", type=positive_float, default=d.lr, help="SGD learning rate")
    train.add_argument("--momentum", type=float, default=d.momentum, help="SGD momentum, in [0, 1)")
    length = train.add_mutually_exclusive_group()
    length.add_argument(
        "--steps", type=positive_int, default=None, help=f"optimizer steps (default {DEFAULT_STEPS})"
    )
    length.add_argument("--epochs", type=positive_float, default=None, help="epochs of the training set")
    train.add_argument("--seed", type=int, default=d.seed, help="seed of the model init and data order")
    train.add_argument(
        "--backend",
        choices=BACKENDS,
        default=None,
        help="torch.distributed backend (default: nccl when every local worker has a GPU, else gloo)",
    )
    train.add_argument(
        "--bucket-cap-mb", type=positive_float, default=d.bucket_cap_mb, help="DDP bucket size in MB"
    )
    train.add_argument(
        "--timeout",
        type=positive_float,
        default=d.timeout,
        help="seconds any collective may wait before the run fails",
    )
    train.add_argument(
        "--nan-policy",
        choices=NAN_POLICIES,
        default=d.nan_policy,
        help="a NaN or Inf in any worker's gradient: skip the step on every worker (method state and model "
        "unchanged), raise (every worker stops, naming it), or off (no check)",
    )
    train.add_argument(
        "--json", type=Path, default=None, metavar="PATH", help="write summary and history here"
    )
    train.add_argument("--quiet", action="store_true", help="no progress bar")
    train.add_argument(
        "--eval-every",
        type=int,
        default=0,
        metavar="N",
        help="test accuracy every N steps (0: only at the end)",
    )
    train.add_argument(
        "--target-accuracy",
        type=float,
        default=None,
        metavar="A",
        help="report the training time until the test accuracy first reaches A, in (0, 1]; needs --eval-every",
    )
    train.add_argument(
        "--data-split",
        choices=DATA_SPLITS,
        default=d.data_split,
        help="iid: a fresh disjoint share of the data per worker each epoch; noniid: a fixed label-skewed "
        "shard per worker (each sees one or a few classes)",
    )
    train.add_argument(
        "--straggler",
        default=None,
        metavar="RANK:FACTOR",
        help="emulate a slow worker: RANK's steps take FACTOR times as long (e.g. 1:3)",
    )
    saving = train.add_argument_group(
        "checkpoints", "every worker's and every server's whole state, for an exact resume"
    )
    saving.add_argument(
        "--checkpoint-dir", default=None, metavar="DIR", help="write checkpoints here (and resume from here)"
    )
    saving.add_argument(
        "--checkpoint-every",
        type=int,
        default=d.checkpoint_every,
        metavar="K",
        help="a checkpoint every K steps, and after the last (0: after the last only)",
    )
    saving.add_argument(
        "--resume",
        action="store_true",
        help="continue from the latest checkpoint in --checkpoint-dir that every worker holds (afresh if none)",
    )
    saving.add_argument("--keep", type=positive_int, default=d.keep, metavar="N", help="checkpoints kept")
    saving.add_argument(
        "--max-restarts",
        type=int,
        default=d.max_restarts,
        metavar="R",
        help="when a worker dies, start every worker again up to R times, from the latest checkpoint "
        "(local runs; under torchrun, torchrun's own --max-restarts does this)",
    )
    add_method_options(train)


def _workers(args: argparse.Namespace, options: dict[str, Any]) -> int:
    """The training workers: ``--workers``, or under torchrun its world less any dedicated servers (which are
    part of torchrun's world but do not train)."""
    workers: int = TrainConfig(backend="gloo").workers if args.workers is None else args.workers
    if not under_torchrun() or "WORLD_SIZE" not in os.environ:
        return workers
    world = int(os.environ["WORLD_SIZE"])
    if args.workers is not None and args.workers != world and os.environ.get("RANK", "0") == "0":
        print(
            f"{PROG}: note: --workers {args.workers} ignored under torchrun (WORLD_SIZE={world})",
            file=sys.stderr,
        )
    return world - servers_needed(args.method, {**make_config(args.method).to_dict(), **options})


def train_config(args: argparse.Namespace) -> TrainConfig:
    """A validated TrainConfig; checks the dataset and the model here, before any worker is started."""
    from gradzip.train.preflight import preflight

    options = method_options(args)
    workers = _workers(args, options)
    try:
        cfg = TrainConfig(
            method=args.method, options=options, model=args.model, dataset=args.dataset, workers=workers,
            batch_size=args.batch_size, lr=args.lr, momentum=args.momentum, steps=args.steps,
            epochs=args.epochs, seed=args.seed, backend=args.backend or default_backend(workers),
            bucket_cap_mb=args.bucket_cap_mb, timeout=args.timeout, quiet=args.quiet,
            eval_every=args.eval_every, target_accuracy=args.target_accuracy, data_split=args.data_split,
            straggler=args.straggler, checkpoint_dir=args.checkpoint_dir, checkpoint_every=args.checkpoint_every,
            resume=args.resume, keep=args.keep, max_restarts=args.max_restarts, nan_policy=args.nan_policy,
        )  # fmt: skip
        preflight(cfg)
        # Only rank 0 writes the summary (under torchrun the path may exist on its machine alone).
        if args.json is not None and os.environ.get("RANK", "0") == "0":
            check_writable(args.json, "--json")
    except ValueError as err:
        raise UsageError(str(err)) from None
    return cfg


def run(args: argparse.Namespace) -> int:
    from gradzip.train.launch import WorkerError, run

    cfg = train_config(args)
    try:
        summary = run(cfg)
    except WorkerError as err:
        print(f"{PROG}: error: {err}", file=sys.stderr)
        return 1
    if summary is None:  # a torchrun rank other than 0
        return 0
    if args.json is not None:
        write_atomic(args.json, json.dumps(summary.to_dict(), indent=2) + "\n")
    rows = summary.rows()
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"{key:<{width}}  {value}")
    return 0
