"""Error feedback: what compression dropped is added back next time. Workers and servers use the same piece.

p = g + e;   send C(p);   e = p - decode(C(p))
"""

from __future__ import annotations

import torch


class ErrorFeedback:
    def __init__(self) -> None:
        self.residuals: dict[str, torch.Tensor] = {}

    def compensate(self, key: str, g: torch.Tensor) -> torch.Tensor:
        """The compressor's input ``g + e`` (a new tensor; ``g`` is left alone)."""
        e = self.residuals.get(key)
        return g.clone() if e is None else g + e

    def update(self, key: str, p: torch.Tensor, approx: torch.Tensor) -> None:
        """Keep ``p - approx``: exactly what the transmitted approximation missed."""
        e = self.residuals.get(key)
        if e is None or e.shape != p.shape:
            self.residuals[key] = p - approx
        else:
            torch.sub(p, approx, out=e)

    def set(self, key: str, residual: torch.Tensor) -> None:
        self.residuals[key] = residual

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {k: v.clone() for k, v in self.residuals.items()}

    def load_state_dict(self, sd: dict[str, torch.Tensor]) -> None:
        self.residuals = {k: v.clone() for k, v in sd.items()}
