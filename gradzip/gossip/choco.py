"""Choco-SGD (Koloskova et al. 2019): gossip of compressed model differences with public copies.

Every worker keeps public copies ``x^_j`` of itself and of each neighbour, identical on every worker that
holds them (both ends decode the same payload). After the local step ``x_i' = x_i - lr g_i``:

    q_i   = C(x_i' - x^_i)                            sent to every neighbour
    x^_j += q_j        for j = i and every neighbour j
    x_i   = x_i' + gamma * sum_j W_ij (x^_j - x^_i)

The consensus step ``gamma`` must be tuned to the compressor (1 with ``identity``, which then equals
D-PSGD). 1-D tensors (biases, norms) travel raw, as in every gradzip pattern.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from gradzip.compress.base import check_pairing
from gradzip.config import check, make_compressor
from gradzip.gossip.base import Gossip


class Choco(Gossip):
    method = "choco"

    def __init__(
        self,
        model: nn.Module,
        topology: Any = "ring",
        *,
        compressor: str = "signsgd",
        gamma: float = 0.4,
        process_group: dist.ProcessGroup | None = None,
        metrics: bool = True,
        timeout: timedelta | None = None,
        nan_policy: str = "skip",
        **compressor_options: Any,
    ) -> None:
        """``compressor_options``: the compressor's own (``density``, ``levels``, ``seed``, ``majority_vote``...)."""
        super().__init__(
            model,
            topology,
            process_group=process_group,
            metrics=metrics,
            timeout=timeout,
            nan_policy=nan_policy,
        )
        check(0.0 < gamma <= 1.0, "gamma", gamma, "in (0, 1]")
        self.gamma = gamma
        self.compressor = make_compressor(compressor, **compressor_options)
        check_pairing(self.compressor, "choco")  # the neighbours' receive buffers are laid out in advance
        self.raw = make_compressor("identity")
        # x^ of this worker and of each neighbour, per parameter; all start at zero on every worker.
        self.public: dict[int, dict[str, torch.Tensor]] = {
            j: {name: torch.zeros_like(p) for name, p in self.params.items()}
            for j in (self.rank, *self.neighbours)
        }

    def _codec(self, name: str, sender: int) -> Any:
        """The compressor for parameter ``name`` of worker ``sender``, positioned on that pair's stream: the
        receivers redraw what the payload leaves out (random-k's indices) and senders draw independently."""
        c = self.compressor if self.params[name].dim() >= 2 else self.raw
        c.select_stream(f"{name}@{sender}", self.steps)
        return c

    def _mix(self) -> None:
        mine = self.public[self.rank]
        payloads, decoded = [], {}
        for name, p in self.params.items():
            # Compressors take float32, whatever the model's dtype: the payload is what it declares.
            codec = self._codec(name, self.rank)
            payload, ctx = codec.encode((p - mine[name]).reshape(-1).float())
            payloads.append(payload)
            decoded[name] = codec.decode(payload, ctx, p.numel())
        flat = [t for payload in payloads for t in payload]
        received = self.comm.exchange({j: flat for j in self.neighbours})

        # x^_i += q_i; x^_j += q_j (decoded exactly as j decoded it for itself).
        for name, q in decoded.items():
            mine[name].add_(q.view_as(mine[name]).to(mine[name].dtype))
        for j in self.neighbours:
            parts = iter(received[j])
            for (name, p), payload in zip(self.params.items(), payloads, strict=True):
                theirs = [next(parts) for _ in payload]
                codec = self._codec(name, j)
                q = codec.decode(theirs, codec.shared_context(p.numel(), p.device), p.numel())
                self.public[j][name].add_(q.view_as(p).to(p.dtype))

        # x_i += gamma * sum_j W_ij (x^_j - x^_i): antisymmetric over each edge, so the average is kept.
        for name, p in self.params.items():
            delta = torch.zeros_like(p)
            for j in self.neighbours:
                delta.add_(self.public[j][name] - mine[name], alpha=self.weight(j))
            p.add_(delta, alpha=self.gamma)

    def _state(self) -> dict[str, Any]:
        return {
            "public": {j: {k: v.clone() for k, v in copies.items()} for j, copies in self.public.items()},
            "compressor": self.compressor.state_dict(),
        }

    def _load_state(self, state: dict[str, Any]) -> None:
        for j, copies in state["public"].items():
            for k, v in copies.items():
                self.public[int(j)][k].copy_(v)
        self.compressor.load_state_dict(state["compressor"])
