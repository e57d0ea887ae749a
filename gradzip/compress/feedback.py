"""Error feedback: what compression dropped is added back next time. Workers and servers use the same piece.

    p = g + e;   send C(p);   e = p - decode(C(p))

On the hot path it allocates nothing after the first step: ``compensate`` forms ``p`` inside the residual's
own buffer, and the caller turns that buffer into the new residual in place (``Compressor.residual_``, or a
low-rank method's ``M -= P Q^T``).
"""

from __future__ import annotations

from typing import Any

import torch

from gradzip.compress.base import Compressor


def encode_with_feedback(
    compressor: Compressor,
    x: torch.Tensor,
    stream: str,
    step: int,
    *,
    residual: bool,
    sent: torch.Tensor | None = None,
) -> tuple[list[torch.Tensor], Any]:
    """Encode flat ``x`` from the random stream of (``stream``, ``step``): the sequence every pattern runs.

    With ``residual``, ``x``'s buffer becomes the new error-feedback residual ``x - decode(encode(x))`` in
    place (payloads hold copies, so this is safe). ``sent`` is the velocity of DGC's momentum correction: a
    sparsifier zeroes in it the entries this payload carries (momentum factor masking); a compressor that sends
    every entry leaves it alone."""
    compressor.select_stream(stream, step)
    payload, ctx = compressor.encode(x)
    if residual:
        compressor.residual_(x, payload, ctx)
    if sent is not None and compressor.sparsifies:
        compressor.mask_sent_(sent, ctx)
    return payload, ctx


class ErrorFeedback:
    def __init__(self) -> None:
        self.residuals: dict[str, torch.Tensor] = {}

    def compensate(self, key: str, g: torch.Tensor) -> torch.Tensor:
        """``p = g + e``, held in the residual's buffer: the caller must leave the new residual in it."""
        if key not in self.residuals:
            e = self.residuals[key] = g.detach().clone()
            return e
        return self.residual(key, g).add_(g)

    def residual(self, key: str, g: torch.Tensor) -> torch.Tensor:
        """The residual ``e`` kept for ``g`` (zeros the first time), on ``g``'s device and dtype, for a caller
        that adds ``g`` itself (a fused kernel) and leaves the new residual in it."""
        e = self.residuals.get(key)
        if e is None:
            e = self.residuals[key] = torch.zeros_like(g, memory_format=torch.contiguous_format)
            return e
        if e.shape != g.shape:
            raise ValueError(f"residual of {key!r} has shape {tuple(e.shape)}, its gradient {tuple(g.shape)}")
        if e.device != g.device or e.dtype != g.dtype:  # e.g. a checkpoint loaded with map_location="cpu"
            e = self.residuals[key] = e.to(device=g.device, dtype=g.dtype)
        return e

    def set(self, key: str, residual: torch.Tensor) -> None:
        self.residuals[key] = residual

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {k: v.clone() for k, v in self.residuals.items()}

    def load_state_dict(self, sd: dict[str, torch.Tensor]) -> None:
        self.residuals = {k: v.clone() for k, v in sd.items()}


class Velocity:
    """DGC's momentum correction (Lin et al. 2018): momentum accumulated before compression, ``u = m u + g``.

    With error feedback, optimizer momentum applied after decompression amplifies the bursts that the
    residuals release; accumulating it here instead keeps the effective update close to momentum SGD. A
    sparsifier then zeroes the sent entries of ``u`` (``Compressor.mask_sent_``)."""

    def __init__(self, momentum: float) -> None:
        self.momentum = momentum
        self.buffers: dict[str, torch.Tensor] = {}

    def __call__(self, key: str, g: torch.Tensor) -> torch.Tensor:
        """``g`` itself without momentum; else the updated velocity (kept here, keyed by name)."""
        if not self.momentum:
            return g
        u = self.buffers.get(key)
        if u is None:
            u = self.buffers[key] = g.detach().clone()
            return u
        if u.device != g.device or u.dtype != g.dtype:  # e.g. a checkpoint loaded with map_location="cpu"
            u = self.buffers[key] = u.to(device=g.device, dtype=g.dtype)
        return u.mul_(self.momentum).add_(g)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {k: v.clone() for k, v in self.buffers.items()}

    def load_state_dict(self, sd: dict[str, torch.Tensor]) -> None:
        self.buffers = {k: v.clone() for k, v in sd.items()}
