"""The ``gradzip`` command: ``gradzip train`` (data-parallel training with a compression method) and
``gradzip methods`` (the registry, with every option).

A user's mistake ends in one line ``gradzip: error: ...`` and exit code 2, found before any worker starts;
a failure inside a worker ends in one line naming the rank and exit code 1.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import typing
from pathlib import Path
from typing import Any, NoReturn

from gradzip.registry import METHODS, get_spec, make_config, methods

PROG = "gradzip"

# Method-option fields whose flag is renamed because the plain name is a training flag already:
# the compressor's seed is not the training seed.
_RENAMED = {"seed": "compressor-seed"}

# Attribute prefix of method-option flags in the argparse namespace, to tell them from training flags.
_OPT_PREFIX = "method_option__"


class UsageError(Exception):
    """A user's mistake found after parsing; reported like an argparse error (one line, exit 2)."""


class _Parser(argparse.ArgumentParser):
    """argparse, but an error is one line ``gradzip: error: ...`` (no usage block), exit code 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{PROG}: error: {message} (see '{self.prog} --help')\n")


def _flag(field_name: str) -> str:
    return "--" + _RENAMED.get(field_name, field_name.replace("_", "-"))


def _method_fields() -> dict[str, tuple[dataclasses.Field[Any], type, list[str]]]:
    """Every option of every method: field name -> (first field seen, its Python type, methods that have it)."""
    found: dict[str, tuple[dataclasses.Field[Any], type, list[str]]] = {}
    for name in methods():
        cls = METHODS[name].config_cls
        hints = typing.get_type_hints(
            cls
        )  # resolves the string annotations of `from __future__ import annotations`
        for f in dataclasses.fields(cls):
            typ = hints[f.name]
            # ``float | None`` (an option that defaults to another object's own value) parses as a float.
            args = [a for a in typing.get_args(typ) if a is not type(None)]
            if args and len(args) == 1:
                typ = args[0]
            if f.name in found:
                found[f.name][2].append(name)
                if f.default is not None and found[f.name][0].default is None:
                    found[f.name] = (f, typ, found[f.name][2])  # a real default documents the flag better
            else:
                found[f.name] = (f, typ, [name])
    return found


def _option_help(name: str) -> str:
    """The help of option ``name``: each distinct text (with its default) once, with the methods it has; an
    option several methods share may mean something slightly different to each (a compressor's density)."""
    groups: dict[str, list[str]] = {}
    for method in methods():
        for f in dataclasses.fields(METHODS[method].config_cls):
            if f.name == name:
                groups.setdefault(f"{f.metadata.get('help', '')} (default {f.default!r}", []).append(method)
    return " | ".join(f"{text}; {', '.join(owners)})" for text, owners in groups.items())


def _add_method_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group(
        "method options", "each applies to the methods listed; the defaults are the method's own"
    )
    for name, (_, typ, _) in _method_fields().items():
        help_text = _option_help(name)
        # SUPPRESS: an option not given stays absent, so the method's own default applies and an option the
        # method lacks is detectable (it is present only when the user typed it).
        common: dict[str, Any] = {"dest": _OPT_PREFIX + name, "default": argparse.SUPPRESS, "help": help_text}
        if typ is bool:
            group.add_argument(_flag(name), action=argparse.BooleanOptionalAction, **common)
        else:
            group.add_argument(_flag(name), type=typ, metavar=name.upper(), **common)


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid integer: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid number: {text!r}") from None
    if not (value > 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"must be a number > 0, got {text}")
    return value


class _DefaultsFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows defaults, except the ``None`` of options whose help already says what happens when absent."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.default is None or action.default is argparse.SUPPRESS:
            return action.help or ""
        return super()._get_help_string(action) or ""


def build_parser() -> argparse.ArgumentParser:
    from gradzip.train.data import EMBEDDED
    from gradzip.train.loop import BACKENDS, DATA_SPLITS, DEFAULT_STEPS, TrainConfig
    from gradzip.train.models import MODELS

    # The defaults live in TrainConfig only (gloo: this instance only reads defaults, and nccl needs CUDA).
    d = TrainConfig(backend="gloo")

    parser = _Parser(prog=PROG, description="Communication-efficient distributed training for PyTorch.")
    from gradzip import __version__

    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="{train,bench,methods}")

    train = sub.add_parser(
        "train",
        help="train a model data-parallel with a gradient compression method",
        description="Train a model with DDP and a gradzip communication hook on local worker processes, "
        "or on torchrun's processes when started by torchrun (torchrun ... -m gradzip train ...).",
        formatter_class=_DefaultsFormatter,
    )
    train.add_argument("--method", default=d.method, choices=methods(), help="compression method")
    train.add_argument(
        "--workers",
        type=_positive_int,
        default=None,
        help=f"local worker processes to spawn (default {d.workers}; ignored under torchrun, "
        "which sets the world size)",
    )
    train.add_argument("--model", default=d.model, choices=sorted(MODELS), help="model")
    train.add_argument(
        "--dataset",
        default=d.dataset,
        help=f"embedded dataset ({', '.join(EMBEDDED)}) or a local path",
    )
    train.add_argument(
        "--batch-size", type=_positive_int, default=d.batch_size, help="mini-batch size per worker"
    )
    train.add_argument("--lr", type=_positive_float, default=d.lr, help="SGD learning rate")
    train.add_argument("--momentum", type=float, default=d.momentum, help="SGD momentum, in [0, 1)")
    length = train.add_mutually_exclusive_group()
    length.add_argument(
        "--steps", type=_positive_int, default=None, help=f"optimizer steps (default {DEFAULT_STEPS})"
    )
    length.add_argument("--epochs", type=_positive_float, default=None, help="epochs of the training set")
    train.add_argument("--seed", type=int, default=d.seed, help="seed of the model init and data order")
    train.add_argument(
        "--backend",
        choices=BACKENDS,
        default=None,
        help="torch.distributed backend (default: nccl when every local worker has a GPU, else gloo)",
    )
    train.add_argument(
        "--bucket-cap-mb",
        type=_positive_float,
        default=d.bucket_cap_mb,
        help="DDP bucket size in MB",
    )
    train.add_argument(
        "--timeout",
        type=_positive_float,
        default=d.timeout,
        help="seconds any collective may wait before the run fails",
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
    _add_method_options(train)

    from gradzip.bench import command as bench_command

    bench_command.add_parser(sub, _DefaultsFormatter)

    sub.add_parser(
        "methods",
        help="list the compression methods and their options",
        description="List the compression methods with their wire format, aggregation and options.",
    )
    return parser


def _method_options(args: argparse.Namespace) -> dict[str, Any]:
    """The method options the user typed, checked against the chosen method."""
    given = {k[len(_OPT_PREFIX) :]: v for k, v in vars(args).items() if k.startswith(_OPT_PREFIX)}
    valid = [f.name for f in dataclasses.fields(get_spec(args.method).config_cls)]
    for name in given:
        if name not in valid:
            flags = ", ".join(_flag(v) for v in valid) or "none"
            raise UsageError(f"method {args.method!r} has no option {_flag(name)}; its options: {flags}")
    try:
        make_config(args.method, **given)
    except ValueError as err:
        raise UsageError(str(err)) from None
    return given


def _train_config(args: argparse.Namespace) -> Any:
    """A validated TrainConfig; checks the dataset and the model here, before any worker is started."""
    import torch

    from gradzip.train.data import DatasetError, load_dataset
    from gradzip.train.launch import under_torchrun
    from gradzip.train.loop import TrainConfig, default_backend, steps_per_epoch
    from gradzip.train.models import build_model
    from gradzip.train.paramserver import server_count

    options = _method_options(args)
    workers = TrainConfig(backend="gloo").workers if args.workers is None else args.workers
    if under_torchrun() and "WORLD_SIZE" in os.environ:
        # torchrun has started the processes already: the world is what it says.
        world = int(os.environ["WORLD_SIZE"])
        if args.workers is not None and args.workers != world and os.environ.get("RANK", "0") == "0":
            print(
                f"{PROG}: note: --workers {args.workers} ignored under torchrun (WORLD_SIZE={world})",
                file=sys.stderr,
            )
        # Dedicated parameter servers are part of torchrun's world but do not train.
        workers = world - server_count(args.method, {**make_config(args.method).to_dict(), **options})
    try:
        cfg = TrainConfig(
            method=args.method,
            options=options,
            model=args.model,
            dataset=args.dataset,
            workers=workers,
            batch_size=args.batch_size,
            lr=args.lr,
            momentum=args.momentum,
            steps=args.steps,
            epochs=args.epochs,
            seed=args.seed,
            backend=args.backend or default_backend(workers),
            bucket_cap_mb=args.bucket_cap_mb,
            timeout=args.timeout,
            quiet=args.quiet,
            eval_every=args.eval_every,
            target_accuracy=args.target_accuracy,
            data_split=args.data_split,
            straggler=args.straggler,
        )
    except ValueError as err:
        raise UsageError(str(err)) from None

    try:
        data = load_dataset(cfg.dataset, seed=cfg.seed)
    except DatasetError as err:
        raise UsageError(str(err)) from None
    except OSError as err:  # an unreadable path, a directory, ...
        raise UsageError(f"cannot read dataset {cfg.dataset!r}: {err}") from None
    try:
        steps_per_epoch(len(data.y_train), cfg.workers, cfg.batch_size)
        # On the meta device the model is built without allocating memory: even bert-large costs nothing, and
        # a model that does not fit the dataset's input shape fails here rather than in every worker.
        with torch.device("meta"):
            model = build_model(cfg.model, data.input_shape, data.num_classes)
    except ValueError as err:
        raise UsageError(str(err)) from None
    try:
        # A forward pass on meta tensors checks shapes only, in no time: a model that cannot take this
        # dataset's samples is a usage error, not a crash in every worker.
        with torch.no_grad():
            model(data.x_train[:2].to("meta"))
    except Exception as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UsageError(
            f"model {cfg.model!r} cannot take samples of dataset {cfg.dataset!r} (shape {tuple(data.input_shape)}, "
            f"{data.x_train.dtype}): {first}"
        ) from None
    return cfg


def _format_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def _print_summary(summary: dict[str, Any]) -> None:
    ratio = summary["compression_ratio"]
    options = ", ".join(f"{k}={v}" for k, v in summary["options"].items()) or "none"
    rows = [
        ("method", f"{summary['method']} ({options})"),
        ("model / dataset", f"{summary['model']} on {summary['dataset']}"),
        ("workers", f"{summary['workers']} ({summary['backend']}), batch {summary['batch_size']} per worker"),
        ("steps", f"{summary['steps']} ({summary['epochs']:.1f} epochs)"),
        ("final train loss", f"{summary['final_loss']:.4f}"),
        ("test accuracy", f"{100 * summary['test_accuracy']:.2f}%"),
        ("time per step", f"{1000 * summary['time_per_step_s']:.2f} ms (median)"),
        ("sent per step", f"{_format_bytes(summary['bytes_sent_per_step'])} per worker"),
        ("compression vs ssgd", "n/a (nothing sent)" if ratio is None else f"{ratio:.1f}x"),
        (
            "params identical",
            "yes"
            if summary["params_identical"]
            else f"NO: workers differ by up to {summary['params_max_abs_diff']:.3g}",
        ),
    ]
    if summary.get("servers"):
        rows.append(
            (
                "servers",
                f"{summary['servers']}, each sending {_format_bytes(summary['server_bytes_sent_per_step'])} "
                f"and receiving {_format_bytes(summary['server_bytes_received_per_step'])} per step",
            )
        )
    if summary.get("staleness") is not None:
        hist = ", ".join(f"{k}: {v}" for k, v in summary["staleness"].items())
        rows.append(("staleness", f"mean {summary['mean_staleness']:.2f} updates; histogram {{{hist}}}"))
        rows.append(
            (
                "max lead",
                f"{summary['max_lead']} steps ahead of the slowest (bound {summary['max_staleness']})",
            )
        )
    if len(summary.get("worker_train_time_s", [])) > 1:
        t = summary["worker_train_time_s"]
        rows.append(("worker time", f"{min(t):.2f} s to {max(t):.2f} s of training per worker"))
    if summary.get("topology") is not None:
        rows.append(("topology", f"{summary['topology']} (spectral gap {summary['spectral_gap']:.3f})"))
        rows.append(
            ("consensus distance", f"{summary['consensus_distance']:.3g} (mean_i |x_i - x_mean|^2, final)")
        )
        acc = summary["worker_accuracies"]
        rows.append(
            ("worker accuracy", f"{100 * min(acc):.2f}% to {100 * max(acc):.2f}% (each worker's own model)")
        )
        rows.append(("data split", summary["data_split"]))
    if summary.get("target_accuracy") is not None:
        t = summary["time_to_target_s"]
        reached = (
            "not reached" if t is None else f"{t:.2f} s of training ({summary['steps_to_target']} steps)"
        )
        rows.append((f"time to {100 * summary['target_accuracy']:.0f}%", reached))
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"{key:<{width}}  {value}")


def _cmd_train(args: argparse.Namespace) -> int:
    import os

    from gradzip.train.launch import WorkerError, run, under_torchrun

    cfg = _train_config(args)
    if under_torchrun():
        world = os.environ.get("WORLD_SIZE")
        workers_given = any(a == "--workers" or a.startswith("--workers=") for a in sys.argv[1:])
        if (
            workers_given
            and world is not None
            and int(world) != cfg.workers
            and os.environ.get("RANK") == "0"
        ):
            print(
                f"{PROG}: note: --workers {cfg.workers} ignored under torchrun (WORLD_SIZE={world})",
                file=sys.stderr,
            )
    try:
        summary = run(cfg)
    except WorkerError as err:
        print(f"{PROG}: error: {err}", file=sys.stderr)
        return 1
    if summary is None:  # a torchrun rank other than 0
        return 0
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(summary, indent=2) + "\n")
    _print_summary(summary)
    return 0


def _cmd_methods() -> int:
    for name in methods():
        spec = METHODS[name]
        print(f"{name}: {spec.summary}")
        print(f"    wire: {spec.wire}; aggregation: {spec.aggregation}")
        fields = dataclasses.fields(spec.config_cls)
        if not fields:
            print("    options: none")
        for f in fields:
            print(f"    {_flag(f.name)} (default {f.default!r}): {f.metadata.get('help', '')}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.command == "methods":
            return _cmd_methods()
        if args.command == "bench":
            from gradzip.bench import command

            return command.run(args, UsageError)
        return _cmd_train(args)
    except UsageError as err:
        print(f"{PROG}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
