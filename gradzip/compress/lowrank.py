"""Low-rank maths that PowerSGD, ACP-SGD and PowerGossip share: matrix views, ranks, orthogonalization.

A parameter's gradient (or a model difference) ``G`` is viewed as ``M = G.view(shape[0], -1)`` (conv kernels
included) and approximated at rank ``r' = min(r, rows, cols)``. The fused local passes (compensate and
project, residual and expand) are in :mod:`gradzip.compress.fused`.
"""

from __future__ import annotations

import torch


def orthogonalize(m: torch.Tensor) -> torch.Tensor:
    """Orthonormal columns spanning ``m``'s columns. Householder QR stays orthonormal for rank-deficient
    input (a zero gradient, a batch smaller than r), where Gram-Schmidt would divide by zero."""
    return torch.linalg.qr(m, mode="reduced").Q


def matrix_shape(shape: torch.Size, rank: int) -> tuple[int, int, int]:
    """``(rows, cols, effective rank)`` of a >=2-D tensor viewed as ``shape[0] x rest``."""
    rows = shape[0]
    cols = shape.numel() // rows
    return rows, cols, min(rank, rows, cols)
