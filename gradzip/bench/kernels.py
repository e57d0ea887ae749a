"""Kernel throughput: one worker's compress + decompress work per step, against the memory-copy bound.

Every method runs over the >=2-D parameter shapes of a registry model (built on the meta device, so reading
even BERT-large's shapes allocates nothing), filled with seeded normal noise, through the reducers that ship:
each is built from the registry with its default options and driven through a world of one
(:class:`~gradzip.comm.collectives.SoloComm`, whose collectives complete at once), so what is timed is the
whole local work of a step (planning aside, which is cached): error feedback, encoding, the fused message,
and the decode the reducer uses (``decode`` of the sum for summable payloads, ``aggregate`` over the gathered
payloads otherwise), written into the gradients. The tensors are fused into buckets of DDP's default size (25
MB), the last one closing the step: PowerSGD's second round and every decompression run there, and ACP-SGD
alternates its P- and Q-steps from one pass to the next, as in training.

* ``torch.topk``: ``torch.topk(x.abs(), k, sorted=False)`` alone, the call inside ``TopK.encode``, so the
  table shows what top-k costs beyond the selection itself.

One pass over the whole set is timed with ``time.perf_counter`` after a warm-up pass (the first pass
allocates residuals and factors); the gradients are restored before each pass, untimed, since a reducer
writes its result over them. The median of ``repeats`` is reported as input fp32 bytes per second and as a
fraction of ``copy_`` over the same tensors. Any compressor must read its input and write the decoded
gradient at least once, which is what a copy does, so the copy is the bound; error feedback adds a
read-modify-write of the residual on top, so ~0.3-0.5 of the copy is already good for those rows.
"""

from __future__ import annotations

import math
import statistics
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from gradzip.comm.collectives import SoloComm
from gradzip.compress.topk import k_of
from gradzip.config import LowRankConfig, QSGDConfig, SignConfig, TopKConfig
from gradzip.reducers.elementwise import ElementwiseReducer
from gradzip.reducers.reducer import Bucket
from gradzip.registry import get_spec, make_config
from gradzip.train.models import MODELS, build_model

__all__ = [
    "FORMS",
    "METHODS",
    "REFERENCE",
    "CallCounter",
    "TARGETS",
    "KernelResult",
    "format_table",
    "format_targets",
    "run_kernels",
    "shape_sets",
]

REFERENCE = "torch.topk"
METHODS: tuple[str, ...] = ("sign", "topk", "randomk", "qsgd", "fp16", "powersgd", "acpsgd", REFERENCE)
# Rows asked for by name only: sign and QSGD in one form whatever the device (each device has its default,
# the CPU per tensor through the C kernels, CUDA per bucket), to compare the two forms on one machine.
FORMS: dict[str, tuple[str, bool]] = {
    "sign-bucket": ("sign", True),
    "sign-per-tensor": ("sign", False),
    "qsgd-bucket": ("qsgd", True),
    "qsgd-per-tensor": ("qsgd", False),
}

# A method whose warm-up pass over the set takes longer than this is timed on a subset of the tensors: the
# default run (ResNet-50 shapes, every method, 5 repeats) then stays around a minute on a 2-core CPU.
PASS_BUDGET_S = 1.0


@dataclass
class KernelResult:
    method: str
    shapes: str
    numel: int
    seconds: float
    gbytes_per_s: float
    copy_gbytes_per_s: float
    fraction_of_copy: float
    note: str = ""
    calls: int | None = None
    """Torch operator calls in one pass over the whole set, views aside (a CUDA kernel launch each, or a
    few; an allocation counts too, without launching anything); what the C kernels do on the CPU is not counted.
    Counted in one more pass over the whole set after the timed ones (for ACP-SGD, whichever of its P- and
    Q-steps that pass falls on)."""


class CallCounter(TorchDispatchMode):
    """Counts the torch operators called while it is active, by name; views (metadata only) are left out."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: Counter[str] = Counter()

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        if not func.is_view:
            self.calls[str(func.overloadpacket)] += 1
        return func(*args, **(kwargs or {}))


# ------------------------------------------------------------------------------------------ shape sets


def _build_args(name: str) -> tuple[tuple[int, ...], int]:
    """Input shape and class count each model is built with: the setting its shapes are usually quoted for."""
    if name.startswith("resnet"):
        return (3, 224, 224), 1000  # ImageNet: the 7x7 stem and the 1000-way head
    if name.startswith("bert"):
        return (128,), 2  # sequence length does not change parameter shapes
    return (3, 32, 32), 10


def _named_shapes(name: str, max_numel: int | None = None) -> list[tuple[str, torch.Size]]:
    """(parameter name, shape) of model ``name``'s >=2-D parameters, in model order.

    With ``max_numel``, shapes are kept in order while the set's total stays within it (a shape that would
    overflow it is skipped), so a small cap still gives real shapes of the model."""
    if name not in MODELS:
        raise ValueError(f"unknown shape set {name!r}; valid shape sets: {', '.join(MODELS)}")
    input_shape, num_classes = _build_args(name)
    # On the meta device parameters have shapes but no storage: BERT-large costs nothing to build.
    with torch.device("meta"):
        model = build_model(name, input_shape, num_classes)
    named = [(n, p.shape) for n, p in model.named_parameters() if p.ndim >= 2]
    if max_numel is None:
        return named
    kept, total = [], 0
    for n, shape in named:
        if total + shape.numel() <= max_numel:
            kept.append((n, shape))
            total += shape.numel()
    return kept


def shape_sets(names: str | Sequence[str], max_numel: int | None = None) -> dict[str, list[torch.Size]]:
    """The >=2-D parameter shapes of each named registry model (``resnet50``, ``bert_base``, ...)."""
    if isinstance(names, str):
        names = [names]
    return {name: [shape for _, shape in _named_shapes(name, max_numel)] for name in names}


# ------------------------------------------------------------------------------------------ the passes

# The methods of the table, by the registry method that ships each one.
SHIPPED = {
    "sign": "signsgd",
    "topk": "topk",
    "randomk": "randomk",
    "qsgd": "qsgd",
    "fp16": "fp16",
    "powersgd": "powersgd",
    "acpsgd": "acpsgd",
}


@dataclass
class Pass:
    """One method's per-step work over the tensors at given indices of the set: ``prepare`` (untimed) then
    ``run`` (timed)."""

    run: Callable[[Sequence[int]], None]
    prepare: Callable[[Sequence[int]], None] = lambda idx: None


# Tensors are fused into buckets of up to this size, as DDP's default bucket_cap_mb does in training.
BUCKET_BYTES = 25 * 2**20


def _buckets_of(idx: Sequence[int], grads: list[torch.Tensor], keys: list[str]) -> list[Bucket]:
    """The tensors at ``idx`` in buckets of up to ``BUCKET_BYTES`` (in order; a larger tensor is a bucket of its
    own), the last one closing the step."""
    groups: list[list[int]] = [[]]
    size = 0
    for i in idx:
        if groups[-1] and size + grads[i].nbytes > BUCKET_BYTES:
            groups.append([])
            size = 0
        groups[-1].append(i)
        size += grads[i].nbytes
    buckets = [Bucket.of([grads[i] for i in g], [keys[i] for i in g], is_last=False) for g in groups]
    buckets[-1].is_last = True
    return buckets


def _reducer_pass(
    method: str, keys: list[str], grads: list[torch.Tensor], bucket_form: bool | None = None
) -> Pass:
    """The registry method's reducer over a world of one, on DDP-sized buckets (see the module docstring);
    ``bucket_form`` forces an element-wise compressor's form (None: the device's default)."""
    # With the NaN policy that ddp_hook and gradzip train default to: its screen and staged residuals included.
    reducer = get_spec(method).build(make_config(method), SoloComm()).use_nan_policy("skip")
    if bucket_form is not None:
        assert isinstance(reducer, ElementwiseReducer)
        reducer.bucket_form = bucket_form
    cache: dict[tuple[int, ...], list[Bucket]] = {}

    def prepare(idx: Sequence[int]) -> None:
        buckets = cache.get(tuple(idx))
        if buckets is None:
            cache[tuple(idx)] = _buckets_of(idx, grads, keys)
            return
        # The reducer wrote its result over the gradients last time.
        for b in buckets:
            for g, key in zip(b.grads, b.keys, strict=True):
                g.copy_(grads[keys.index(key)])

    def run(idx: Sequence[int]) -> None:
        futures = [reducer.launch(b) for b in cache[tuple(idx)]]
        for fut in futures:
            fut.wait()

    return Pass(run, prepare)


def _topk_reference_pass(density: float, grads: list[torch.Tensor]) -> Pass:
    def run(idx: Sequence[int]) -> None:
        for i in idx:
            x = grads[i].reshape(-1)
            torch.topk(x.abs(), k_of(density, x.numel()), sorted=False)

    return Pass(run)


def _copy_pass(grads: list[torch.Tensor], outs: list[torch.Tensor]) -> Pass:
    # Into preallocated buffers: the pure memory traffic, no allocator in the way.
    def run(idx: Sequence[int]) -> None:
        for i in idx:
            outs[i].copy_(grads[i])

    return Pass(run)


def _note(method: str) -> str:
    """What the row runs: the shipped method's defaults that decide its cost."""
    if method == REFERENCE:
        return f"selection only, k = ceil({TopKConfig().density:g} numel)"
    cfg = make_config(SHIPPED[method])
    if isinstance(cfg, LowRankConfig):
        steps = "both rounds" if method == "powersgd" else "P- and Q-steps alternating"
        return f"rank {cfg.rank}, EF, {steps}"
    if isinstance(cfg, QSGDConfig):
        return (
            f"{cfg.levels} levels, {'EF' if cfg.error_feedback else 'no EF (default)'}, all-gather aggregate"
        )
    if isinstance(cfg, TopKConfig):  # random-k's config is top-k's with another density
        decode = "summed decode" if method == "randomk" else "all-gather aggregate"
        return f"density {cfg.density:g}, EF, {decode}"
    if isinstance(cfg, SignConfig):
        return "EF, all-gather aggregate"
    return "no EF (plain all-reduce)"


def _make_pass(method: str, keys: list[str], grads: list[torch.Tensor]) -> tuple[Pass, str]:
    """The pass of ``method`` and its note, with the options every method has by default."""
    if method == REFERENCE:
        return _topk_reference_pass(TopKConfig().density, grads), _note(method)
    if method in FORMS:
        base, bucket_form = FORMS[method]
        form = "one set of calls per bucket" if bucket_form else "per tensor"
        return _reducer_pass(SHIPPED[base], keys, grads, bucket_form), f"{_note(base)}; {form}"
    return _reducer_pass(SHIPPED[method], keys, grads), _note(method)


def _count_calls(work: Pass, n: int) -> int:
    """Torch operator calls in one (untimed) pass over the whole set."""
    everything = list(range(n))
    work.prepare(everything)
    counter = CallCounter()
    with counter:
        work.run(everything)
    return sum(counter.calls.values())


# ------------------------------------------------------------------------------------------------ timing


def _sync(device: torch.device) -> None:
    # Kernels are asynchronous on CUDA: without this the clock would time the launches, not the work.
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(work: Pass, idx: Sequence[int], device: torch.device) -> float:
    work.prepare(idx)
    _sync(device)
    t0 = time.perf_counter()
    work.run(idx)
    _sync(device)
    return time.perf_counter() - t0


def _measure(
    work: Pass, numels: list[int], repeats: int, device: torch.device, budget_s: float | None
) -> tuple[float, str]:
    """Median seconds of one pass over the whole set, and a note if it was extrapolated from a subset."""
    everything = list(range(len(numels)))
    warm = _timed(work, everything, device)  # also allocates every tensor's residual and factors
    if budget_s is None or warm <= budget_s or len(numels) == 1:
        return statistics.median(_timed(work, everything, device) for _ in range(repeats)), ""
    # Every stride-th tensor (deterministic, and spread over the model's depth), scaled by element count.
    subset = everything[:: max(2, math.ceil(warm / budget_s))]
    sub_numel, total = sum(numels[i] for i in subset), sum(numels)
    seconds = statistics.median(_timed(work, subset, device) for _ in range(repeats)) * total / sub_numel
    note = (
        f"timed on {len(subset)} of {len(numels)} tensors ({100 * sub_numel / total:.0f}% of elements), "
        "scaled by element count"
    )
    return seconds, note


def _resolve_methods(methods: Sequence[str] | None) -> list[str]:
    if methods is None:
        return list(METHODS)
    unknown = [m for m in methods if m not in METHODS and m not in FORMS]
    if unknown:
        raise ValueError(f"unknown method {unknown[0]!r}; valid methods: {', '.join([*METHODS, *FORMS])}")
    chosen = list(dict.fromkeys(methods))
    # top-k is read against the bare selection it is built on: the reference row comes along.
    if "topk" in chosen and REFERENCE not in chosen:
        chosen.insert(chosen.index("topk") + 1, REFERENCE)
    return chosen


def run_kernels(
    shape_set: str = "resnet50",
    methods: Sequence[str] | None = None,
    repeats: int = 5,
    device: str = "cpu",
    max_numel: int | None = None,
    pass_budget_s: float | None = PASS_BUDGET_S,
    threads: int | None = None,
) -> list[KernelResult]:
    """Time every method's compress + decompress pass over ``shape_set``'s gradient shapes (see the module
    docstring). ``methods`` defaults to all of ``METHODS``; asking for ``topk`` brings the ``torch.topk``
    reference row along. A method whose warm-up pass exceeds ``pass_budget_s`` is timed on a subset of the
    tensors and scaled up (said in its note); ``None`` always times the whole set. ``threads`` sets torch's
    intra-op threads for the run (restored afterwards): on a busy machine, ``threads=1`` keeps an op from
    waiting a scheduler time slice for a preempted OpenMP worker, which can swamp small kernels."""
    chosen = _resolve_methods(methods)
    named = _named_shapes(shape_set, max_numel)
    if not named:
        raise ValueError(f"shape set {shape_set!r} has no >=2-D shape within max_numel={max_numel}")
    if repeats < 1:
        raise ValueError(f"repeats={repeats} is invalid: repeats must be >= 1")
    try:
        dev = torch.device(device)
    except RuntimeError:
        dev = None
    if dev is None or dev.type not in ("cpu", "cuda"):
        raise ValueError(f"device {device!r} is invalid: use cpu or cuda[:N]")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} requested but CUDA is not available")
    if threads is not None and threads < 1:
        raise ValueError(f"threads={threads} is invalid: threads must be >= 1")
    previous = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        return _run(shape_set, chosen, named, repeats, dev, pass_budget_s)
    finally:
        torch.set_num_threads(previous)


def _run(
    shape_set: str,
    chosen: list[str],
    named: list[tuple[str, torch.Size]],
    repeats: int,
    dev: torch.device,
    pass_budget_s: float | None,
) -> list[KernelResult]:
    """``run_kernels`` once its arguments are checked and the thread count is set."""
    keys = [n for n, _ in named]
    gen = torch.Generator().manual_seed(0)
    # Drawn on the CPU from a seeded generator, so every device times the same numbers.
    grads = [torch.randn(shape, generator=gen).to(dev) for _, shape in named]
    outs = [torch.empty_like(g) for g in grads]
    numels = [g.numel() for g in grads]
    total = sum(numels)
    nbytes = total * 4  # input fp32 bytes: the same numerator for every row and for the copy

    copy_seconds, _ = _measure(_copy_pass(grads, outs), numels, repeats, dev, None)
    copy_gbps = nbytes / copy_seconds / 1e9
    results = []
    for method in chosen:
        work, note = _make_pass(method, keys, grads)
        seconds, sub_note = _measure(work, numels, repeats, dev, pass_budget_s)
        calls = _count_calls(work, len(numels))  # over the whole set, even where the timing took a subset
        gbps = nbytes / seconds / 1e9
        results.append(
            KernelResult(
                method=method,
                shapes=shape_set,
                numel=total,
                seconds=seconds,
                gbytes_per_s=gbps,
                copy_gbytes_per_s=copy_gbps,
                fraction_of_copy=gbps / copy_gbps,
                note="; ".join(n for n in (note, sub_note) if n),
                calls=calls,
            )
        )
        del work  # frees the method's residuals and factors before the next one allocates its own
    return results


def format_table(results: Sequence[KernelResult]) -> str:
    """A markdown table, one row per result."""
    lines = [
        "| method | shapes | numel | ms/pass | GB/s | copy GB/s | of copy | torch calls | note |",
        "|---|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in results:
        calls = "" if r.calls is None else f"{r.calls:,}"
        lines.append(
            f"| {r.method} | {r.shapes} | {r.numel:,} | {1e3 * r.seconds:.2f} | {r.gbytes_per_s:.2f} "
            f"| {r.copy_gbytes_per_s:.2f} | {r.fraction_of_copy:.3f} | {calls} | {r.note} |"
        )
    return "\n".join(lines)


# The element-wise compressors' targets (issue 13): a fraction of copy speed, on ResNet-50's shapes, one thread.
TARGETS = {"sign": 0.25, "qsgd": 0.25, "topk": 0.10}
TOPK_SPEEDUP = 3.0
"""Top-k's whole step (selection, error feedback, decode) against ``torch.topk``'s selection alone."""


def format_targets(results: Sequence[KernelResult]) -> str:
    """One line per target and shape set: the measured value, the target, and whether it holds."""
    lines = []
    for shapes in dict.fromkeys(r.shapes for r in results):
        rows = {r.method: r for r in results if r.shapes == shapes}
        for method, target in TARGETS.items():
            if method in rows:
                got = rows[method].fraction_of_copy
                mark = "holds" if got >= target else "MISSED"
                lines.append(f"- {shapes} {method}: {got:.3f} of copy speed (target >= {target:.2f}): {mark}")
        if "topk" in rows and REFERENCE in rows:
            ratio = rows[REFERENCE].seconds / rows["topk"].seconds
            mark = "holds" if ratio >= TOPK_SPEEDUP else "MISSED"
            lines.append(
                f"- {shapes} topk: {ratio:.2f}x faster than {REFERENCE} alone (target >= {TOPK_SPEEDUP:g}x): {mark}"
            )
    return "\n".join(lines)
