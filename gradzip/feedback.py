"""Error feedback: what compression dropped is added back next time. Workers and servers use the same piece.

    p = g + e;   send C(p);   e = p - decode(C(p))

On the hot path it allocates nothing after the first step: ``compensate`` forms ``p`` inside the residual's
own buffer, and the caller turns that buffer into the new residual in place (``Compressor.residual_``, or a
low-rank method's ``M -= P Q^T``).
"""

from __future__ import annotations

import torch


class ErrorFeedback:
    def __init__(self) -> None:
        self.residuals: dict[str, torch.Tensor] = {}

    def compensate(self, key: str, g: torch.Tensor) -> torch.Tensor:
        """``p = g + e``, held in the residual's buffer: the caller must leave the new residual in it."""
        e = self.residuals.get(key)
        if e is None or e.shape != g.shape:
            e = self.residuals[key] = g.detach().clone()
            return e
        return e.add_(g)

    def set(self, key: str, residual: torch.Tensor) -> None:
        self.residuals[key] = residual

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {k: v.clone() for k, v in self.residuals.items()}

    def load_state_dict(self, sd: dict[str, torch.Tensor]) -> None:
        self.residuals = {k: v.clone() for k, v in sd.items()}
