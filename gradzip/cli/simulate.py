"""``gradzip profile``, ``gradzip simulate`` and ``gradzip advise``: the performance model's commands.

* ``profile --model M``: measure a model's per-layer gradient sizes and backward times, its forward and
  optimizer times and every method's kernel cost on this device, saved as a JSON profile.
* ``simulate``: predicted iteration time and speed-up over ssgd per method on a grid of worker counts and
  link speeds (a table and a plot); ``--validate`` measures every method on the emulated cluster beside its
  prediction instead.
* ``advise``: methods ranked by predicted time for one cluster, with the reason the winner wins.

Where no ``--profile`` file is given, the model's shipped profile is used if there is one (ResNet-50,
ResNet-152, BERT-Base and BERT-Large at the ACP-SGD paper's batch sizes, derived from CPU measurements),
else the model is profiled here first.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from gradzip.cli.common import positive_float, positive_int
from gradzip.util import comma_list


def _profile_options(p: argparse.ArgumentParser) -> None:
    from gradzip.train.models import MODELS

    p.add_argument("--model", default=None, help=f"registry model ({', '.join(MODELS)}); or --profile")
    p.add_argument("--profile", type=Path, default=None, help="a profile file written by gradzip profile")
    p.add_argument(
        "--batch-size",
        type=positive_int,
        default=None,
        help="samples per worker (default: the shipped profile's, else 32); not with --profile, which has its own",
    )


def _cluster_options(p: argparse.ArgumentParser) -> None:
    from gradzip.sim.grid import DEFAULT_METHODS

    p.add_argument(
        "--methods",
        type=comma_list(str),
        default=",".join(DEFAULT_METHODS),
        help="comma-separated methods, each NAME[:KEY=VALUE...] as gradzip bench takes them, e.g. acpsgd:rank=32",
    )
    p.add_argument("--latency", default="0ms", help="one-way delay of each link, e.g. 5us or 1ms")
    p.add_argument("--bucket-cap-mb", type=positive_float, default=25.0, help="DDP's bucket size in MiB")


def add_parsers(sub: Any, formatter: type[argparse.HelpFormatter]) -> None:
    prof = sub.add_parser(
        "profile",
        help="measure a model's per-layer costs for the simulator",
        description="Measure a model's per-layer gradient sizes and backward times, forward and optimizer "
        "times, and each method's kernel cost on this device; write them as a profile for simulate and advise.",
        formatter_class=formatter,
    )
    from gradzip.train.models import MODELS

    prof.add_argument("--model", required=True, help=f"registry model ({', '.join(MODELS)})")
    prof.add_argument("--batch-size", type=positive_int, default=32, help="samples per worker")
    prof.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    prof.add_argument("--image-size", type=positive_int, default=32, help="image side for the image models")
    prof.add_argument("--seq-len", type=positive_int, default=32, help="sequence length for BERT models")
    prof.add_argument("--repeats", type=positive_int, default=5, help="measured iterations (median)")
    prof.add_argument(
        "--processes",
        type=positive_int,
        default=1,
        help="copies of the model measured side by side on this machine (as the emulated cluster's workers run)",
    )
    prof.add_argument("--out", type=Path, default=None, help="profile file (default profile-MODEL.json)")

    sim = sub.add_parser(
        "simulate",
        help="predict each method's iteration time on clusters no one machine can run",
        description="Predict iteration time and speed-up over ssgd per method on a grid of worker counts and "
        "link speeds, from a model's profile (a timeline per iteration: buckets, pipelining, alpha-beta "
        "collectives). --validate instead measures every method on the emulated cluster beside its prediction.",
        formatter_class=formatter,
    )
    _profile_options(sim)
    _cluster_options(sim)
    sim.add_argument(
        "--workers",
        type=comma_list(positive_int),
        default=None,
        help="comma-separated worker counts (default 8,16,32,64; with --validate 2,4)",
    )
    sim.add_argument(
        "--bandwidth",
        type=comma_list(str),
        default=None,
        help="comma-separated link speeds (default 1gbit,10gbit,100gbit; with --validate 100mbit,1gbit,unlimited)",
    )
    sim.add_argument(
        "--out", type=Path, default=Path("simulate-results"), help="directory for the table and plot"
    )
    sim.add_argument(
        "--validate",
        action="store_true",
        help="measure every method on the emulated cluster (2 and 4 workers; 100mbit, 1gbit, unlimited unless "
        "--workers/--bandwidth say otherwise; root needed) beside the prediction, and report each error",
    )
    sim.add_argument("--quiet", action="store_true", help="no progress bar (--validate)")
    sim.add_argument(
        "--paper",
        action="store_true",
        help="the ACP-SGD paper's grid (its four models, batches and ranks; 8-64 workers; 1, 10, 100 Gbit/s): "
        "acpsgd's predicted speed-up over ssgd and powersgd beside the paper's averages, from the shipped profiles",
    )
    sim.add_argument(
        "--measure",
        action="store_true",
        help="with --paper: profile the four models on this CPU again and derive their GPU profiles into --out "
        "(several minutes) instead of using the shipped ones",
    )

    adv = sub.add_parser(
        "advise",
        help="which method to use on a given cluster, and why",
        description="Rank methods by predicted time per iteration on one cluster, with bytes per step, what "
        "is on the winner's critical path and what it would take for the runner-up to win.",
        formatter_class=formatter,
    )
    _profile_options(adv)
    _cluster_options(adv)
    adv.add_argument("--workers", type=positive_int, required=True, help="data-parallel workers")
    adv.add_argument("--bandwidth", required=True, help="link speed per worker, e.g. 10gbit")


def load_profile(args: argparse.Namespace, usage_error: type[Exception]) -> Any:
    """The profile the flags name: a file, a shipped one, or one measured now."""
    from gradzip.sim.profile import ModelProfile, measure_profile
    from gradzip.sim.shipped import shipped_profile
    from gradzip.train.models import MODELS

    if args.profile is not None:
        try:
            return ModelProfile.load(args.profile)
        except ValueError as err:
            raise usage_error(str(err)) from None
    assert args.model in MODELS  # _check_flags
    found = shipped_profile(args.model)
    if found is not None and args.batch_size in (None, found.batch_size):
        return found
    print(
        f"gradzip: profiling {args.model} on this machine's CPU first (save it with gradzip profile)",
        file=sys.stderr,
    )
    try:
        return measure_profile(args.model, args.batch_size or 32, repeats=3)
    except ValueError as err:
        raise usage_error(str(err)) from None


def _check_flags(args: argparse.Namespace, usage_error: type[Exception]) -> None:
    """Flags that contradict each other, or that the chosen mode would ignore: refused before any work."""
    from gradzip.sim.grid import DEFAULT_METHODS
    from gradzip.train.models import MODELS

    validate, paper = getattr(args, "validate", False), getattr(args, "paper", False)
    given = {
        "--profile": args.profile is not None,
        "--model": args.model is not None,
        "--batch-size": args.batch_size is not None,
        "--methods": args.methods != DEFAULT_METHODS,
        "--workers": getattr(args, "workers", None) is not None and args.command == "simulate",
        "--bandwidth": getattr(args, "bandwidth", None) is not None and args.command == "simulate",
    }
    if validate and paper:
        raise usage_error("--validate and --paper are two different runs: choose one")
    if getattr(args, "measure", False) and not paper:
        raise usage_error("--measure applies to --paper only")
    if paper:
        extra = [flag for flag, on in given.items() if on]
        if extra:
            raise usage_error(f"--paper runs the paper's own grid: drop {', '.join(extra)}")
        return
    if validate and given["--profile"]:
        raise usage_error("--validate measures its own profiles: drop --profile")
    if given["--profile"] and given["--batch-size"]:
        raise usage_error(
            "--batch-size does not apply with --profile: the profile was measured at its own batch"
        )
    if not validate and not given["--profile"] and args.model is None:
        raise usage_error("say which model: --model M or --profile FILE")
    if args.model is not None and args.model not in MODELS:
        raise usage_error(f"unknown model {args.model!r}; valid models: {', '.join(MODELS)}")


def run(args: argparse.Namespace, usage_error: type[Exception]) -> int:
    try:
        if args.command == "profile":
            return _profile(args, usage_error)
        _check_flags(args, usage_error)
        if args.command == "advise":
            return _advise(args, usage_error)
        if args.validate:
            return _validate(args, usage_error)
        if args.paper:
            return _paper(args, usage_error)
        return _simulate(args, usage_error)
    except (
        RuntimeError
    ) as err:  # a measurement that failed (a profile's copy, a calibration): not a traceback
        print(f"gradzip: error: {err}", file=sys.stderr)
        return 1


def _paper(args: argparse.Namespace, usage_error: type[Exception]) -> int:
    from gradzip.sim import paper
    from gradzip.sim.shipped import shipped_profile

    _writable(args.out / "paper.md", usage_error)
    if args.measure:
        profiles = paper.ship(args.out / "profiles", args.out / "profiles")
    else:
        found = {m.model: shipped_profile(m.model) for m in paper.PAPER}
        profiles = {k: v for k, v in found.items() if v is not None}
    table = paper.markdown(paper.predict_grid(profiles))
    sources = "\n".join(
        f"- {name}: {p.device}, batch {p.batch_size}; {p.source}" for name, p in profiles.items()
    )
    text = f"acpsgd over ssgd / acpsgd over powersgd (predicted)\n\n{table}\nProfiles:\n{sources}\n"
    (args.out / "paper.md").write_text(text)
    print(text)
    return 0


def _writable(path: Path, usage_error: type[Exception]) -> None:
    from gradzip.util import check_writable

    try:
        check_writable(path, "--out")
    except ValueError as err:
        raise usage_error(str(err)) from None


def _profile(args: argparse.Namespace, usage_error: type[Exception]) -> int:
    import torch

    from gradzip.sim.profile import measure_profile, measure_side_by_side
    from gradzip.train.models import MODELS

    if args.model not in MODELS:
        raise usage_error(f"unknown model {args.model!r}; valid models: {', '.join(MODELS)}")
    if args.device != "cpu" and args.processes > 1:
        raise usage_error("--processes applies to --device cpu only")
    try:
        device = torch.device(args.device)
    except RuntimeError:
        raise usage_error(f"--device {args.device!r} is invalid: use cpu or cuda[:N]") from None
    if device.type not in ("cpu", "cuda"):
        raise usage_error(f"--device {args.device!r} is invalid: use cpu or cuda[:N]")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise usage_error(f"--device {args.device!r}: CUDA is not available here")
    out = args.out or Path(f"profile-{args.model}.json")
    _writable(out, usage_error)
    batch = args.batch_size
    common = dict(repeats=args.repeats, image_size=args.image_size, seq_len=args.seq_len)
    try:
        if args.processes > 1:
            prof = measure_side_by_side(args.model, batch, args.processes, **common)
        else:
            prof = measure_profile(args.model, batch, device=args.device, **common)
    except ValueError as err:
        raise usage_error(str(err)) from None
    prof.save(out)
    print(
        f"{args.model}, batch {batch}, {prof.device}: forward {1e3 * prof.forward_s:.1f} ms, backward "
        f"{1e3 * prof.backward_s:.1f} ms over {len(prof.layers)} gradients ({prof.numel:,} elements), "
        f"optimizer {1e3 * prof.optimizer_s:.1f} ms -> {out}"
    )
    return 0


def _simulate(args: argparse.Namespace, usage_error: type[Exception]) -> int:
    from gradzip.sim import grid

    workers = args.workers or [8, 16, 32, 64]
    bandwidths = args.bandwidth or ["1gbit", "10gbit", "100gbit"]
    try:
        grid.check_inputs(args.methods, workers, bandwidths, args.latency)
    except ValueError as err:
        raise usage_error(str(err)) from None
    _writable(args.out / "simulate.md", usage_error)
    prof = load_profile(args, usage_error)
    try:
        preds = grid.simulate_grid(prof, args.methods, workers, bandwidths, args.latency, args.bucket_cap_mb)
    except ValueError as err:
        raise usage_error(str(err)) from None
    table = grid.markdown(preds, prof)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"simulate-{prof.model}.md").write_text(table)
    png = grid.plot(preds, args.out / f"simulate-{prof.model}.png", f"{prof.model} ({prof.source})")
    print(table)
    print(f"wrote {args.out / f'simulate-{prof.model}.md'} and {png}")
    return 0


def _advise(args: argparse.Namespace, usage_error: type[Exception]) -> int:
    from gradzip.sim import grid
    from gradzip.util import format_bytes

    try:
        grid.check_inputs(args.methods, [args.workers], [args.bandwidth], args.latency, advice=True)
    except ValueError as err:
        raise usage_error(str(err)) from None
    prof = load_profile(args, usage_error)
    try:
        advice = grid.advise(
            prof, args.workers, args.bandwidth, args.methods, args.latency, args.bucket_cap_mb
        )
    except ValueError as err:
        raise usage_error(str(err)) from None
    print(
        f"{prof.model}, batch {prof.batch_size}, {args.workers} workers at {args.bandwidth} (profile: {prof.device}, {prof.source})"
    )
    print()
    print(f"{'':3}{'method':34}{'ms/iter':>9}{'vs ssgd':>9}{'sent/step':>11}")
    ssgd = next(p.iteration_s for p in advice.ranking if p.method == "ssgd")
    for i, p in enumerate(advice.ranking, 1):
        print(
            f"{i:<3}{p.method:34}{1e3 * p.iteration_s:9.0f}{ssgd / p.iteration_s:8.2f}x{format_bytes(p.sent_bytes):>11}"
        )
    print()
    print(advice.reason)
    return 0


def _validate(args: argparse.Namespace, usage_error: type[Exception]) -> int:
    from gradzip.bench.iproute import ClusterError
    from gradzip.bench.network import parse_bandwidth
    from gradzip.sim import grid, validate
    from gradzip.sim.grid import DEFAULT_METHODS

    workers = args.workers or [2, 4]
    bandwidths = args.bandwidth or ["100mbit", "1gbit", "unlimited"]
    methods = args.methods if args.methods != DEFAULT_METHODS else list(validate.METHODS)
    model = args.model or "wide_mlp"
    try:  # everything a user can get wrong, before the first profile
        grid.check_inputs(
            methods, workers, [b for b in bandwidths if b != "unlimited"], "0ms", allow_floor=True
        )
        for b in bandwidths:
            parse_bandwidth(b)
        _writable(args.out / "validation.json", usage_error)
        checks = validate.run_validation(
            model, args.out, workers, bandwidths, methods, batch_size=args.batch_size or 32,
            bucket_cap_mb=args.bucket_cap_mb, progress=not args.quiet,
        )  # fmt: skip
    except (ValueError, ClusterError) as err:
        raise usage_error(str(err)) from None
    table = validate.markdown(checks)
    (args.out / "validation.md").write_text(table)
    print(table)
    return 0 if validate.summary(checks)["holds"] else 1
