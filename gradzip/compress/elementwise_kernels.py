"""The element-wise compressors' passes in C (``_elementwise.c``), for CPU float32 contiguous tensors.

Sign-SGD, QSGD and top-k spend their time in torch calls that each sweep the tensor and make an
intermediate of its size: packing sign bits spreads every byte over eight entries, QSGD draws a float per
element from a Mersenne twister, and ``torch.topk`` sorts its way to k entries. Each function here is one
sweep instead. It returns None where it does not apply (CUDA, another dtype, a strided view, no compiler,
``GRADZIP_FUSED=0``), and the compressor then takes its torch path, which computes the same bits: the tests
compare the two on odd shapes, empty and one-element tensors.
"""

from __future__ import annotations

import ctypes

import torch

from gradzip.compress import fused

__all__ = [
    "keep_top",
    "select_abs_ge",
    "sign_accumulate",
    "sign_pack",
    "sign_residual",
    "qsgd_accumulate",
    "qsgd_quantize",
]


def _lib(*ts: torch.Tensor) -> ctypes.CDLL | None:
    """The library when every tensor is a contiguous CPU tensor of the float kinds the kernels read."""
    lib = fused._library()  # looked up on each call: tests swap it for the torch path
    if lib is None:
        return None
    for t in ts:
        if t.device.type != "cpu" or not t.is_contiguous():
            return None
    return lib


def serves(x: torch.Tensor) -> bool:
    """Whether the kernels take ``x`` (CPU float32, and the library built)."""
    return x.device.type == "cpu" and x.dtype == torch.float32 and fused._library() is not None


def _rows(t: torch.Tensor) -> tuple[int, int]:
    """(rows, stride of a row in elements) of a payload view that may carry a leading worker dim."""
    if t.ndim == 1:
        return 1, t.numel()
    if t.ndim != 2 or t.stride(-1) != 1:
        raise ValueError(f"payload view of shape {tuple(t.shape)} and strides {t.stride()}: expected rows")
    return t.shape[0], t.stride(0)


def _threads() -> int:
    return torch.get_num_threads()


def _summands(
    x: torch.Tensor, add: tuple[torch.Tensor, torch.Tensor] | None
) -> tuple[int | None, int | None]:
    """Pointers of ``(e, g)`` for a kernel that first sets ``x = e + g`` (None, None: x as it is)."""
    if add is None:
        return None, None
    e, g = add
    if e.shape != x.shape or g.shape != x.shape:
        raise ValueError(f"e + g: shapes {tuple(e.shape)} and {tuple(g.shape)}, into {tuple(x.shape)}")
    return e.data_ptr(), g.data_ptr()


def _applies(x: torch.Tensor, add: tuple[torch.Tensor, torch.Tensor] | None) -> ctypes.CDLL | None:
    ts = (x, *add) if add is not None else (x,)
    if any(t.dtype != torch.float32 for t in ts):
        return None
    return _lib(*ts)


def sign_pack(
    x: torch.Tensor, add: tuple[torch.Tensor, torch.Tensor] | None = None
) -> tuple[float, torch.Tensor] | None:
    """``(sum |x| in float64, bits of x >= 0 packed eight per byte, least significant first)``; with ``add =
    (e, g)``, ``x = e + g`` first, in the same sweep (``x`` may be ``e``)."""
    if (lib := _applies(x, add)) is None:
        return None
    bits = torch.empty(-(-x.numel() // 8), dtype=torch.uint8)
    total = lib.gz_sign_pack(*_summands(x, add), x.data_ptr(), bits.data_ptr(), x.numel(), _threads())
    return float(total), bits


def sign_residual(x: torch.Tensor, scale: float) -> bool:
    """``x -= scale * sign(x)`` in place (sign +1 where x >= 0); False where the kernel does not apply."""
    if x.dtype != torch.float32 or (lib := _lib(x)) is None:
        return False
    lib.gz_sign_residual(x.data_ptr(), x.numel(), scale, _threads())
    return True


def sign_accumulate(
    out: torch.Tensor, scales: torch.Tensor, bits: torch.Tensor, vote_scale: float | None = None
) -> bool:
    """``out = (sum over rows of scale_w * sign_w) * (1 / rows)`` (or, with ``vote_scale``, ``sign(sum_w
    sign_w) * vote_scale``), streaming over the rows; False where the kernel does not apply."""
    if out.dtype != torch.float32 or scales.dtype != torch.float32 or (lib := _lib(out)) is None:
        return False
    if bits.device.type != "cpu" or scales.device.type != "cpu":
        return False
    world, brow = _rows(bits)
    _, srow = _rows(scales)
    lib.gz_sign_accumulate(
        out.data_ptr(), bits.data_ptr(), brow, scales.data_ptr(), srow, world, 1.0 / world, out.numel(),
        int(vote_scale is not None), vote_scale or 0.0, _threads(),
    )  # fmt: skip
    return True


def square_sum(x: torch.Tensor) -> float | None:
    """``sum x^2`` accumulated in float64."""
    if x.dtype != torch.float32 or (lib := _lib(x)) is None:
        return None
    return float(lib.gz_square_sum(x.data_ptr(), x.numel(), _threads()))


def qsgd_quantize(x: torch.Tensor, scale: float, key: tuple[int, int]) -> torch.Tensor | None:
    """QSGD's signed levels of ``x`` (int8) for ``scale = levels / norm``, rounding with the counter-based
    uniforms of ``key``."""
    if x.dtype != torch.float32 or (lib := _lib(x)) is None:
        return None
    q = torch.empty(x.numel(), dtype=torch.int8)
    lib.gz_qsgd_quantize(x.data_ptr(), q.data_ptr(), x.numel(), scale, *key, _threads())
    return q


def qsgd_accumulate(out: torch.Tensor, norms: torch.Tensor, q: torch.Tensor, levels: int) -> bool:
    """``out = (sum over rows of q_w * (norm_w / levels)) * (1 / rows)``, streaming over the rows."""
    if out.dtype != torch.float32 or norms.dtype != torch.float32 or (lib := _lib(out)) is None:
        return False
    if q.device.type != "cpu" or norms.device.type != "cpu":
        return False
    world, qrow = _rows(q)
    _, nrow = _rows(norms)
    lib.gz_qsgd_accumulate(
        out.data_ptr(), q.data_ptr(), qrow, norms.data_ptr(), nrow, world, 1.0 / world, out.numel(),
        float(levels), _threads(),
    )  # fmt: skip
    return True


def select_abs_ge(
    x: torch.Tensor, threshold: float, cap: int, add: tuple[torch.Tensor, torch.Tensor] | None = None
) -> tuple[int, torch.Tensor, torch.Tensor] | None:
    """``(count, indices, values)``: how many entries have ``|x| >= threshold``, and the first ``min(count,
    cap)`` of their indices (int64, increasing) and values; with ``add = (e, g)``, ``x = e + g`` first, in
    the same sweep (all of ``x``, whatever the count)."""
    if (lib := _applies(x, add)) is None:
        return None
    cap = max(cap, 0)
    # One slot more than cap: scratch for the kernel's branch-free writes.
    idx = torch.empty(cap + 1, dtype=torch.int64)
    val = torch.empty(cap + 1, dtype=torch.float32)
    count = int(
        lib.gz_select_abs_ge(
            *_summands(x, add), x.data_ptr(), x.numel(), threshold, idx.data_ptr(), val.data_ptr(), cap
        )
    )
    kept = min(count, cap)
    return count, idx[:kept], val[:kept]


def keep_top(indices: torch.Tensor, values: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Of candidates from ``select_abs_ge``, the ``k`` of largest magnitude (indices and values, in
    increasing order of index); ties at the k-th magnitude go to the lower index. Works in place."""
    lib = _lib(indices, values)
    if lib is None or not 0 <= k <= indices.numel() or indices.numel() != values.numel():
        raise ValueError(f"keep_top: {k} of {indices.numel()} candidates ({values.numel()} values)")
    scratch = torch.empty(indices.numel(), dtype=torch.float32)
    kept = int(lib.gz_keep_top(indices.data_ptr(), values.data_ptr(), indices.numel(), k, scratch.data_ptr()))
    return indices[:kept], values[:kept]
