"""The ``gradzip`` command: ``gradzip train`` (distributed training with a compression method), ``gradzip
bench`` (methods measured side by side), ``gradzip methods`` (the registry, with every option), and the
performance model's ``gradzip profile``, ``gradzip simulate`` and ``gradzip advise``.

A user's mistake ends in one line ``gradzip: error: ...`` and exit code 2, found before any worker starts;
a failure inside a worker ends in one line naming the rank and exit code 1.
"""

from __future__ import annotations

import argparse
import sys

from gradzip.cli import simulate, train
from gradzip.cli.common import PROG, DefaultsFormatter, Parser, UsageError
from gradzip.cli.options import print_methods


def build_parser() -> argparse.ArgumentParser:
    from gradzip import __version__
    from gradzip.bench import command as bench_command

    parser = Parser(prog=PROG, description="Communication-efficient distributed training for PyTorch.")
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    sub = parser.add_subparsers(
        dest="command", required=True, metavar="{train,bench,methods,profile,simulate,advise}"
    )
    train.add_parser(sub, DefaultsFormatter)
    bench_command.add_parser(sub, DefaultsFormatter)
    simulate.add_parsers(sub, DefaultsFormatter)
    sub.add_parser(
        "methods",
        help="list the compression methods and their options",
        description="List the compression methods with their wire format, aggregation and options.",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.command == "methods":
            return print_methods()
        if args.command == "bench":
            from gradzip.bench import command

            return command.run(args, UsageError)
        if args.command in ("profile", "simulate", "advise"):
            return simulate.run(args, UsageError)
        return train.run(args)
    except UsageError as err:
        print(f"{PROG}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
