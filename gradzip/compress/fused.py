"""Fused passes of the low-rank methods: one sweep over memory where torch needs several.

PowerSGD and ACP-SGD spend their local work on three things per matrix: ``M = G + e`` with a projection
(``P = M Q`` or ``Q = M^T P``), and at the end the residual ``e = M - (local approximation)`` together with
the decompressed gradient ``G = (aggregated approximation)``. With torch each is a separate call, and the
rank-r products are GEMMs with an inner dimension of 4, which MKL runs far below memory speed (on one core,
writing a 2048x2048 ``P Q^T`` takes 3.7x as long as a copy of it). The C kernels in ``_fused.c`` do each
group in one pass, a row at a time, so the row stays in cache between the sub-steps.

The kernels serve CPU float32 tensors (what gloo workers train with); anything else (CUDA, float64,
non-contiguous) takes the torch path, which computes the same thing. The C file is compiled once per machine
with the system's C compiler into ``$GRADZIP_CACHE`` (default ``~/.cache/gradzip``); without a compiler, or
with ``GRADZIP_FUSED=0``, everything takes the torch path. ``available()`` says which.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from functools import cache
from pathlib import Path

import torch

__all__ = ["available", "compensate_project_left", "compensate_project_right", "residual_expand"]

SOURCE = Path(__file__).with_name("_fused.c")
# The element-wise compressors' passes (elementwise_kernels.py) live in the same library: one build, one load.
SOURCES = (SOURCE, Path(__file__).with_name("_elementwise.c"))
FLAGS = ["-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-std=c11"]
if platform.machine().lower() in ("x86_64", "amd64"):
    # Where the CPU has AVX-512, let GCC use it in loops (it prefers 256-bit vectors by default): QSGD's
    # hashes run 25% faster. An x86 flag only; other CPUs keep their own defaults.
    FLAGS.insert(2, "-mprefer-vector-width=512")

_I64, _INT, _PTR = ctypes.c_int64, ctypes.c_int, ctypes.c_void_p
_F32, _F64, _U32 = ctypes.c_float, ctypes.c_double, ctypes.c_uint32


def _machine_tag() -> str:
    """The CPU's model and feature flags: ``-march=native`` builds must not travel between machines that
    share a home directory but not a processor."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return sys.platform
    return "\n".join(sorted({ln for ln in lines if ln.startswith(("model name", "flags"))}))


def _compile(target: Path) -> None:
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        raise OSError("no C compiler (cc or gcc) on PATH")
    target.parent.mkdir(parents=True, exist_ok=True)
    # Built beside the target and renamed into place: processes starting together never load half a file.
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        built = Path(tmp) / target.name
        subprocess.run(
            [compiler, *FLAGS, *map(str, SOURCES), "-o", str(built), "-lm"],
            check=True,
            capture_output=True,
            timeout=120,
        )
        os.replace(built, target)


@cache
def _library() -> ctypes.CDLL | None:
    if os.environ.get("GRADZIP_FUSED", "1") == "0":
        return None
    key = hashlib.sha256(b"".join(f.read_bytes() for f in SOURCES) + " ".join(FLAGS).encode())
    key.update(_machine_tag().encode())
    cache_dir = Path(os.environ.get("GRADZIP_CACHE", Path.home() / ".cache" / "gradzip"))
    target = cache_dir / f"fused-{key.hexdigest()[:16]}.so"
    try:
        if not target.exists():
            _compile(target)
        lib = ctypes.CDLL(str(target))
    except (OSError, subprocess.SubprocessError):
        return None  # the torch path computes the same thing, only slower
    # Argument types, in the C prototypes' order: pointers, strides and sizes (int64), the thread count.
    signatures: dict[str, tuple[list[type], type | None]] = {
        "gz_compensate_project_right": ([_PTR] * 5 + [_I64] * 5 + [_INT], None),
        "gz_compensate_project_left": ([_PTR] * 4 + [_I64] * 2 + [_PTR] + [_I64] * 5 + [_INT], _INT),
        "gz_residual_expand": (
            [_PTR, _PTR, _I64, _I64, _PTR, _PTR, _PTR, _I64, _I64, _PTR, _INT, _I64, _I64, _I64, _INT],
            None,
        ),
        # _elementwise.c
        "gz_sign_pack": ([_PTR, _PTR, _PTR, _PTR, _I64, _INT], _F64),
        "gz_sign_residual": ([_PTR, _I64, _F32, _INT], None),
        "gz_sign_accumulate": ([_PTR, _PTR, _I64, _PTR, _I64, _I64, _F32, _I64, _INT, _F32, _INT], None),
        "gz_square_sum": ([_PTR, _I64, _INT], _F64),
        "gz_qsgd_quantize": ([_PTR, _PTR, _I64, _F32, _U32, _U32, _INT], None),
        "gz_qsgd_accumulate": ([_PTR, _PTR, _I64, _PTR, _I64, _I64, _F32, _I64, _F32, _INT], None),
        "gz_select_abs_ge": ([_PTR, _PTR, _PTR, _I64, _F32, _PTR, _PTR, _I64], _I64),
        "gz_keep_top": ([_PTR, _PTR, _I64, _I64, _PTR], _I64),
    }
    for name, (args, result) in signatures.items():
        getattr(lib, name).argtypes = args
        getattr(lib, name).restype = result
    return lib


def available() -> bool:
    """Whether the compiled kernels are in use for CPU float32 tensors."""
    return _library() is not None


# _fused.c takes up to 32, but from rank 16 MKL's GEMMs beat its loops (measured: 2-10x); 8 is on par.
MAX_RANK = 8


def _fusable(rank: int, *ts: torch.Tensor | None) -> ctypes.CDLL | None:
    """The library when every tensor is a CPU float32 tensor the kernels can address, else None."""
    lib = _library()
    if lib is None or rank > MAX_RANK:
        return None
    for t in ts:
        if t is not None and (t.device.type != "cpu" or t.dtype != torch.float32):
            return None
    return lib


def _shapes(
    e: torch.Tensor, like_e: torch.Tensor | None, *want: tuple[torch.Tensor, tuple[int, int]]
) -> None:
    """The C kernels trust their sizes: a mismatch must fail here, not write out of bounds."""
    if e.ndim != 2 or (like_e is not None and like_e.shape != e.shape):
        other = None if like_e is None else tuple(like_e.shape)
        raise ValueError(f"fused kernel: matrix shapes {tuple(e.shape)} and {other} differ")
    for t, shape in want:
        if t.ndim != 2 or any(w not in (-1, n) for w, n in zip(shape, t.shape, strict=True)):
            raise ValueError(f"fused kernel: factor of shape {tuple(t.shape)}, expected {shape} (-1: any)")


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def _compensate(e: torch.Tensor, g: torch.Tensor | None, m: torch.Tensor) -> torch.Tensor:
    """The torch path of ``m = e + g``: ``M``, in ``m`` (which may be ``e``)."""
    if g is None:
        return e
    return e.add_(g) if m is e else torch.add(e, g, out=m)


def compensate_project_right(
    e: torch.Tensor,
    g: torch.Tensor | None,
    qt: torch.Tensor,
    out: torch.Tensor,
    m: torch.Tensor | None = None,
) -> torch.Tensor:
    """``M = e + g`` (when ``g`` is given) written to ``m`` (``e`` itself by default; a second buffer keeps
    ``e`` as it was), then ``out = qt @ M^T``: ``P^T`` (r x rows), for ``qt = Q^T``."""
    m = e if m is None or g is None else m
    lib = _fusable(qt.shape[0], e, g, qt, out, m)
    if lib is None or not (
        e.is_contiguous() and m.is_contiguous() and qt.is_contiguous() and (g is None or g.is_contiguous())
    ):
        return torch.mm(
            qt, _compensate(e, g, m).T, out=out
        )  # with MKL, this form of the skinny GEMM beats M @ q
    rows, cols = e.shape
    _shapes(e, g, (qt, (-1, cols)), (out, (qt.shape[0], rows)), (m, (rows, cols)))
    lib.gz_compensate_project_right(
        _ptr(e), _ptr(g), _ptr(m), _ptr(qt), _ptr(out), *out.stride(), rows, cols, qt.shape[0],
        torch.get_num_threads(),
    )  # fmt: skip
    return out


def compensate_project_left(
    e: torch.Tensor, g: torch.Tensor | None, p: torch.Tensor, out: torch.Tensor, m: torch.Tensor | None = None
) -> torch.Tensor:
    """``M = e + g`` (when ``g`` is given) written to ``m`` (``e`` itself by default), then ``out = p^T @ M``:
    ``Q^T`` (r x cols)."""
    m = e if m is None or g is None else m
    lib = _fusable(p.shape[1], e, g, p, out, m)
    if lib is None or not (e.is_contiguous() and m.is_contiguous() and (g is None or g.is_contiguous())):
        return torch.mm(p.T, _compensate(e, g, m), out=out)
    rows, cols = e.shape
    _shapes(e, g, (p, (rows, -1)), (out, (p.shape[1], cols)), (m, (rows, cols)))
    failed = lib.gz_compensate_project_left(
        _ptr(e), _ptr(g), _ptr(m), _ptr(p), *p.stride(), _ptr(out), *out.stride(), rows, cols, p.shape[1],
        torch.get_num_threads(),
    )  # fmt: skip
    if failed:
        raise MemoryError(f"no memory for the {p.shape[1]} x {cols} partial sums of a projection")
    return out


def residual_expand(
    e: torch.Tensor,
    a: torch.Tensor,
    bt: torch.Tensor,
    out: torch.Tensor,
    c: torch.Tensor | None = None,
    dt: torch.Tensor | None = None,
) -> torch.Tensor:
    """``e -= a @ bt`` and ``out = c @ dt``; without ``c``/``dt``, ``out = a @ bt`` (computed once).

    ``a``, ``c``: rows x r (any strides); ``bt``, ``dt``: r x cols; ``e``, ``out``: rows x cols."""
    same = c is None
    if same:
        c, dt = a, bt
    assert c is not None and dt is not None
    lib = _fusable(a.shape[1], e, a, bt, out, c, dt)
    if lib is None or not all(t.is_contiguous() for t in (e, bt, out, dt)):
        if same:
            torch.mm(a, bt, out=out)
            e.sub_(out)
        else:
            e.addmm_(a, bt, alpha=-1)
            torch.mm(c, dt, out=out)
        return out
    rows, cols = e.shape
    r = a.shape[1]
    _shapes(e, out, (a, (rows, r)), (bt, (r, cols)), (c, (rows, r)), (dt, (r, cols)))
    lib.gz_residual_expand(
        _ptr(e), _ptr(a), *a.stride(), _ptr(bt), _ptr(out), _ptr(c), *c.stride(), _ptr(dt), int(same),
        rows, cols, a.shape[1], torch.get_num_threads(),
    )  # fmt: skip
    return out
