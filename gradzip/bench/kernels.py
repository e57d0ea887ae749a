"""Kernel throughput: one worker's compress + decompress work per step, against the memory-copy bound.

Every compressor runs over the >=2-D parameter shapes of a registry model (built on the meta device, so
reading even BERT-large's shapes allocates nothing), filled with seeded normal noise, through the code the
reducers ship, in the order they call it:

* element-wise (``sign``, ``topk``, ``randomk``, ``qsgd``, ``fp16``), per tensor: ``select_stream``, the
  error-feedback ``compensate``, ``encode``, ``residual_``, then the decode the reducer uses (``decode`` of
  the sum for summable payloads, ``aggregate`` over a world of one for all-gathered ones) into a gradient
  buffer. Error feedback follows each method's defaults: on for sign, topk and randomk, off for qsgd
  (unbiased) and fp16 (a plain all-reduce).
* low-rank (``powersgd``, ``acpsgd``), per matrix viewed as ``shape[0] x rest``: the passes of
  :mod:`gradzip.compress.fused` (its C kernels where they are built) as the reducers use them, message
  slots included; the collectives are
  left out (a world of one), so only local work is timed. ACP-SGD is timed on its P-step.
* ``torch.topk``: ``torch.topk(x.abs(), k, sorted=False)`` alone, the call inside ``TopK.encode``, so the
  table shows what top-k costs beyond the selection itself.

One pass over the whole set is timed with ``time.perf_counter`` after a warm-up pass (the first pass
allocates residuals and factors); the median of ``repeats`` is reported as input fp32 bytes per second and
as a fraction of ``copy_`` over the same tensors. Any compressor must read its input and write the decoded
gradient at least once, which is what a copy does, so the copy is the bound; error feedback adds a
read-modify-write of the residual on top, so ~0.3-0.5 of the copy is already good for those rows.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from gradzip.compress.base import Compressor
from gradzip.compress.fused import compensate_project_left, compensate_project_right, residual_expand
from gradzip.compress.identity import Half
from gradzip.compress.lowrank import orthogonalize
from gradzip.compress.qsgd import QSGD
from gradzip.compress.randomk import RandomK
from gradzip.compress.sign import ScaledSign
from gradzip.compress.topk import TopK, k_of
from gradzip.config import LowRankConfig, QSGDConfig, RandomKConfig, SignConfig, TopKConfig
from gradzip.feedback import ErrorFeedback
from gradzip.reducer import is_matrix_worth_it, split_message
from gradzip.train.models import MODELS, build_model

__all__ = [
    "METHODS",
    "REFERENCE",
    "KernelResult",
    "format_table",
    "run_kernels",
    "shape_sets",
]

REFERENCE = "torch.topk"
METHODS: tuple[str, ...] = ("sign", "topk", "randomk", "qsgd", "fp16", "powersgd", "acpsgd", REFERENCE)

# A method whose warm-up pass over the set takes longer than this is timed on a subset of the tensors: the
# default run (ResNet-50 shapes, every method, 5 repeats) then stays around a minute on a 2-core CPU.
PASS_BUDGET_S = 1.0

Pass = Callable[[Sequence[int]], None]
"""Runs one method's per-step work over the tensors at the given indices of the set."""


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


def _elementwise_pass(
    comp: Compressor,
    error_feedback: bool,
    keys: list[str],
    grads: list[torch.Tensor],
    outs: list[torch.Tensor],
) -> Pass:
    ef = ErrorFeedback() if error_feedback else None
    gathered = not comp.caps.summable  # all-gathered payloads are decoded through ``aggregate``
    step = 0

    def run(idx: Sequence[int]) -> None:
        nonlocal step
        for i in idx:
            g = grads[i].reshape(-1)
            p = ef.compensate(keys[i], g) if ef is not None else g
            comp.select_stream(keys[i], step)
            payload, ctx = comp.encode(p)
            if ef is not None:
                comp.residual_(p, payload, ctx)
            if gathered:
                dense = comp.aggregate([t.unsqueeze(0) for t in payload], g.numel())
            else:
                dense = comp.decode(payload, ctx, g.numel())
            outs[i].copy_(dense.view_as(outs[i]))
        step += 1

    return run


@dataclass(frozen=True)
class _Matrix:
    key: str
    rows: int
    cols: int
    rank: int
    compressed: bool  # else it travels raw, as the low-rank plans send matrices that would not shrink


def _matrices(keys: list[str], grads: list[torch.Tensor], cfg: LowRankConfig) -> list[_Matrix]:
    mats = []
    for key, g in zip(keys, grads, strict=True):
        rows, cols = g.shape[0], g.numel() // g.shape[0]
        r = min(cfg.rank, rows, cols)
        sent = r * (rows + cols) * g.element_size()
        worth = is_matrix_worth_it(g.shape, sent, cfg.min_compression_rate, g.element_size())
        mats.append(_Matrix(key, rows, cols, r, worth))
    return mats


def _initial_factors(mats: list[_Matrix], like: torch.Tensor, seed: int) -> dict[int, torch.Tensor]:
    # As LowRankReducer.initial_factor: drawn in float32 on the CPU, then moved.
    gen = torch.Generator().manual_seed(seed)
    return {
        i: torch.randn(m.cols, m.rank, generator=gen).to(device=like.device, dtype=like.dtype)
        for i, m in enumerate(mats)
        if m.compressed
    }


def _split(idx: Sequence[int], mats: list[_Matrix]) -> tuple[list[int], list[int]]:
    return [i for i in idx if mats[i].compressed], [i for i in idx if not mats[i].compressed]


def _acpsgd_pass(
    cfg: LowRankConfig, keys: list[str], grads: list[torch.Tensor], outs: list[torch.Tensor]
) -> Pass:
    """ACP-SGD's P-step (see ``ACPSGD.launch``): Q^ = orth(Q); P^T = Q^T M^T into the message; e = M - P Q^T;
    gradient = P Q^T. Only the P-step is timed: Q stays fixed, so every pass does the same work."""
    mats = _matrices(keys, grads, cfg)
    ef = ErrorFeedback()
    q = _initial_factors(mats, grads[0], cfg.seed)
    p: dict[int, torch.Tensor] = {}

    def run(idx: Sequence[int]) -> None:
        comp, raw = _split(idx, mats)
        sizes = [mats[i].rank * mats[i].rows for i in comp] + [grads[i].numel() for i in raw]
        parts = split_message(grads[0].new_empty(sum(sizes)), sizes)
        work = []
        for part, i in zip(parts, comp, strict=False):
            mat = mats[i]
            e = ef.residual(mat.key, grads[i]).view(mat.rows, mat.cols)
            basis_t = orthogonalize(q[i]).T.contiguous()
            slot = compensate_project_right(e, grads[i].view(e.shape), basis_t, part.view(mat.rank, mat.rows))
            work.append((e, basis_t, slot.clone()))
        for part, i in zip(parts[len(comp) :], raw, strict=True):
            part.copy_(grads[i].reshape(-1))
        # (the all-reduce of the message would run here)
        for part, (e, basis_t, mine), i in zip(parts, work, comp, strict=False):
            mat = mats[i]
            slot = part.view(mat.rank, mat.rows)
            p[i] = slot.T.clone()
            residual_expand(e, mine.T, basis_t, outs[i].view(mat.rows, mat.cols), slot.T, basis_t)
        for part, i in zip(parts[len(comp) :], raw, strict=True):
            outs[i].copy_(part.view_as(outs[i]))

    return run


def _powersgd_pass(
    cfg: LowRankConfig, keys: list[str], grads: list[torch.Tensor], outs: list[torch.Tensor]
) -> Pass:
    """PowerSGD's step (see ``PowerSGD.launch`` and ``_finish_step``): P = M Q; P^ = orth(P); Q = M^T P^;
    gradient = P^ Q^T; e = M - P^ Q^T; Q kept as the next warm start."""
    mats = _matrices(keys, grads, cfg)
    ef = ErrorFeedback()
    q = _initial_factors(mats, grads[0], cfg.seed)

    def run(idx: Sequence[int]) -> None:
        comp, raw = _split(idx, mats)
        sizes = [mats[i].rank * mats[i].rows for i in comp] + [grads[i].numel() for i in raw]
        parts = split_message(grads[0].new_empty(sum(sizes)), sizes)
        ms = []
        for part, i in zip(parts, comp, strict=False):
            mat = mats[i]
            m = ef.residual(mat.key, grads[i]).view(mat.rows, mat.cols)
            compensate_project_right(
                m, grads[i].view(m.shape), q[i].T.contiguous(), part.view(mat.rank, mat.rows)
            )
            ms.append(m)
        for part, i in zip(parts[len(comp) :], raw, strict=True):
            part.copy_(grads[i].reshape(-1))
        # (round 1: the all-reduce of P)
        for part, i in zip(parts[len(comp) :], raw, strict=True):
            outs[i].copy_(part.view_as(outs[i]))
        phats = [
            orthogonalize(part.view(mats[i].rank, mats[i].rows).T)
            for part, i in zip(parts, comp, strict=False)
        ]
        q_sizes = [mats[i].cols * mats[i].rank for i in comp]
        q_slots = [
            compensate_project_left(m, None, ph, part.view(mats[i].rank, mats[i].cols))
            for part, m, ph, i in zip(
                split_message(grads[0].new_empty(sum(q_sizes)), q_sizes), ms, phats, comp, strict=True
            )
        ]
        # (round 2: the all-reduce of Q)
        for q_t, ph, m, i in zip(q_slots, phats, ms, comp, strict=True):
            residual_expand(m, ph, q_t, outs[i].view(m.shape))
            q[i] = q_t.T.clone()

    return run


def _topk_reference_pass(density: float, grads: list[torch.Tensor]) -> Pass:
    def run(idx: Sequence[int]) -> None:
        for i in idx:
            x = grads[i].reshape(-1)
            torch.topk(x.abs(), k_of(density, x.numel()), sorted=False)

    return run


def _copy_pass(grads: list[torch.Tensor], outs: list[torch.Tensor]) -> Pass:
    # Into preallocated buffers: the pure memory traffic, no allocator in the way.
    def run(idx: Sequence[int]) -> None:
        for i in idx:
            outs[i].copy_(grads[i])

    return run


def _make_pass(
    method: str, keys: list[str], grads: list[torch.Tensor], outs: list[torch.Tensor]
) -> tuple[Pass, str]:
    """The pass of ``method`` and its note, with the options every method has by default."""
    if method == REFERENCE:
        density = TopKConfig().density
        return _topk_reference_pass(density, grads), f"selection only, k = ceil({density:g} numel)"
    if method in ("powersgd", "acpsgd"):
        cfg = LowRankConfig()
        if method == "powersgd":
            return _powersgd_pass(cfg, keys, grads, outs), f"rank {cfg.rank}, EF, both rounds"
        return _acpsgd_pass(cfg, keys, grads, outs), f"rank {cfg.rank}, EF, P-step"
    comp: Compressor
    if method == "sign":
        comp, ef, note = ScaledSign(SignConfig().majority_vote), True, "EF, all-gather aggregate"
    elif method == "topk":
        density = TopKConfig().density
        comp, ef, note = TopK(density), True, f"density {density:g}, EF, all-gather aggregate"
    elif method == "randomk":
        density = RandomKConfig().density
        comp, ef, note = RandomK(density), True, f"density {density:g}, EF, summed decode"
    elif method == "qsgd":
        cfg_q = QSGDConfig()
        ef = cfg_q.error_feedback
        ef_note = "EF" if ef else "no EF (default)"
        comp, note = QSGD(cfg_q.levels), f"{cfg_q.levels} levels, {ef_note}, all-gather aggregate"
    elif method == "fp16":
        comp, ef, note = Half(), False, "no EF (plain all-reduce)"
    else:  # run_kernels validated the name
        raise AssertionError(method)
    return _elementwise_pass(comp, ef, keys, grads, outs), note


# ------------------------------------------------------------------------------------------------ timing


def _sync(device: torch.device) -> None:
    # Kernels are asynchronous on CUDA: without this the clock would time the launches, not the work.
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(run: Pass, idx: Sequence[int], device: torch.device) -> float:
    _sync(device)
    t0 = time.perf_counter()
    run(idx)
    _sync(device)
    return time.perf_counter() - t0


def _measure(
    run: Pass, numels: list[int], repeats: int, device: torch.device, budget_s: float | None
) -> tuple[float, str]:
    """Median seconds of one pass over the whole set, and a note if it was extrapolated from a subset."""
    everything = list(range(len(numels)))
    warm = _timed(run, everything, device)  # also allocates every tensor's residual and factors
    if budget_s is None or warm <= budget_s or len(numels) == 1:
        return statistics.median(_timed(run, everything, device) for _ in range(repeats)), ""
    # Every stride-th tensor (deterministic, and spread over the model's depth), scaled by element count.
    subset = everything[:: max(2, math.ceil(warm / budget_s))]
    sub_numel, total = sum(numels[i] for i in subset), sum(numels)
    seconds = statistics.median(_timed(run, subset, device) for _ in range(repeats)) * total / sub_numel
    note = (
        f"timed on {len(subset)} of {len(numels)} tensors ({100 * sub_numel / total:.0f}% of elements), "
        "scaled by element count"
    )
    return seconds, note


def _resolve_methods(methods: Sequence[str] | None) -> list[str]:
    if methods is None:
        return list(METHODS)
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ValueError(f"unknown method {unknown[0]!r}; valid methods: {', '.join(METHODS)}")
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
        run, note = _make_pass(method, keys, grads, outs)
        seconds, sub_note = _measure(run, numels, repeats, dev, pass_budget_s)
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
            )
        )
        del run  # frees the method's residuals and factors before the next one allocates its own
    return results


def format_table(results: Sequence[KernelResult]) -> str:
    """A markdown table, one row per result."""
    lines = [
        "| method | shapes | numel | ms/pass | GB/s | copy GB/s | of copy | note |",
        "|---|---|---:|---:|---:|---:|---:|---|",
    ]
    for r in results:
        lines.append(
            f"| {r.method} | {r.shapes} | {r.numel:,} | {1e3 * r.seconds:.2f} | {r.gbytes_per_s:.2f} "
            f"| {r.copy_gbytes_per_s:.2f} | {r.fraction_of_copy:.3f} | {r.note} |"
        )
    return "\n".join(lines)
