"""What every decentralized method shares: the model's parameters by name, the topology, the neighbour
exchange, traffic counters, the consensus-distance metric and a state keyed by parameter names.

Use: ``g = Method(model, topology="ring")``, then ``g.step()`` after every ``optimizer.step()``. The local
gradient step has then already been applied, and ``step()`` mixes the models with the neighbours'. With a
``nan_policy`` other than ``off``, call ``g.check_gradients()`` after backward and skip both
``optimizer.step()`` and ``g.step()`` when it returns False (a NaN or an Inf in some worker's gradient).
"""

from __future__ import annotations

import time
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from gradzip.comm.collectives import CommStats
from gradzip.comm.finite import (
    NonFiniteGradient,
    any_nonfinite,
    check_nan_policy,
    first_nonfinite,
    flag_vector,
    flagged,
)
from gradzip.comm.neighbours import NeighbourExchange
from gradzip.comm.topology import Topology, make_topology


class Gossip:
    """Base of the gossip methods; subclasses implement ``_mix()`` (under ``torch.no_grad``)."""

    method = "gossip"

    def __init__(
        self,
        model: nn.Module,
        topology: Any = "ring",
        *,
        process_group: dist.ProcessGroup | None = None,
        metrics: bool = True,
        timeout: timedelta | None = None,
        nan_policy: str = "skip",
    ) -> None:
        if not dist.is_initialized():
            raise RuntimeError(f"gradzip.gossip.{type(self).__name__} needs torch.distributed initialised")
        self.comm = NeighbourExchange(process_group, CommStats(), timeout)
        self.group = process_group
        self.rank, self.world = self.comm.rank, self.comm.world
        self.topology: Topology = make_topology(topology, self.world)
        self.neighbours = self.topology.neighbours(self.rank)
        # A DDP wrapper would prefix "module."; strip it so a state saved one way loads the other way.
        self.params: dict[str, torch.Tensor] = {
            name.removeprefix("module."): p for name, p in model.named_parameters()
        }
        self.metrics = metrics
        """When true, every ``step()`` ends with the consensus distance, two all-reduces used for the metric
        only (``last_consensus_distance``). Set it to False and training sends neighbour messages only."""
        self.last_consensus_distance: float | None = None
        self.metrics_s = 0.0  # seconds spent on the metric, for callers that time the gossip alone
        self.steps = 0
        self.nan_policy = check_nan_policy(nan_policy)
        self.skipped_steps = 0
        self.step_skipped = False

    @property
    def stats(self) -> CommStats:
        return self.comm.stats

    def weight(self, j: int) -> float:
        return self.topology.weight(self.rank, j)

    def check_gradients(self) -> bool:
        """Whether this step goes ahead: call it on every worker after backward, before ``optimizer.step()``.

        False when some worker's gradient holds a NaN or an Inf (``nan_policy="skip"``): then skip both
        ``optimizer.step()`` and ``step()`` on every worker, so every model and the method's state stay as
        they were (the gradients are zeroed). ``raise`` raises ``NonFiniteGradient`` on every worker instead.
        It costs one all-reduce of ``world`` floats over the whole group, the only collective beyond the
        neighbours that training then makes (a NaN anywhere must stop every worker's step, not only its
        neighbours'); ``off`` makes none and always returns True."""
        self.step_skipped = False
        if self.nan_policy == "off":
            return True
        grads = [p.grad for p in self.params.values() if p.grad is not None]
        bad = any_nonfinite(grads)
        device = next(iter(self.params.values())).device
        flags = flag_vector(bad, self.rank, self.world, device)
        dist.all_reduce(flags, group=self.group)
        self.stats.votes += 1  # control traffic: in no byte count, but on the wire (the benchmark's model)
        poisoned = flagged(flags)
        if not poisoned:
            return True
        if self.nan_policy == "raise":
            names = [n for n, p in self.params.items() if p.grad is not None]
            where = first_nonfinite(grads, names) if self.rank in poisoned else None
            raise NonFiniteGradient(poisoned, self.steps + self.skipped_steps, where)
        for g in grads:
            g.zero_()
        self.skipped_steps += 1
        self.step_skipped = True
        return False

    def step(self) -> None:
        """Mix this worker's model with its neighbours' (call it after ``optimizer.step()``)."""
        with torch.no_grad():
            self._mix()
        self.steps += 1
        self.stats.steps += 1
        # What D-PSGD, the uncompressed reference, would send this step: the whole model to every neighbour.
        self.stats.bytes_uncompressed += len(self.neighbours) * sum(p.nbytes for p in self.params.values())
        if self.metrics:
            start = time.perf_counter()
            self.last_consensus_distance = self.consensus_distance()
            self.metrics_s += time.perf_counter() - start

    def _mix(self) -> None:
        raise NotImplementedError

    @torch.no_grad()
    def consensus_distance(self) -> float:
        """``mean_i |x_i - x_mean|^2`` over the workers' flat models, in float64.

        A collective (two all-reduces; every worker must call it), for metrics only: its traffic is not
        counted in ``stats``."""
        x = torch.cat([p.detach().reshape(-1).double() for p in self.params.values()])
        mean = x.clone()
        dist.all_reduce(mean, group=self.group)
        mean /= self.world
        d = ((x - mean) ** 2).sum().reshape(1)
        dist.all_reduce(d, group=self.group)
        return float(d) / self.world

    # ------------------------------------------------------------------------------------------ state
    def _state(self) -> dict[str, Any]:
        """The method's own state, keyed by parameter names (and neighbour ranks)."""
        return {}

    def _load_state(self, state: dict[str, Any]) -> None:
        pass

    def state_dict(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "topology": {
                "name": self.topology.name,
                "n": self.topology.n,
                "edges": list(self.topology.edges),
            },
            "steps": self.steps,
            "skipped": self.skipped_steps,
            "stats": self.stats.to_dict(),
            "state": self._state(),
        }

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        if sd.get("method") != self.method:
            raise ValueError(f"state was saved by method {sd.get('method')!r}; this is {self.method!r}")
        edges = [tuple(e) for e in sd["topology"]["edges"]]
        if sd["topology"]["n"] != self.topology.n or edges != list(self.topology.edges):
            raise ValueError(
                f"state was saved on topology {sd['topology']['name']!r} with {sd['topology']['n']} workers; "
                f"this run has {self.topology.name!r} with {self.topology.n}"
            )
        self.steps = int(sd["steps"])
        self.skipped_steps = int(sd.get("skipped", 0))
        for k, v in sd["stats"].items():
            setattr(self.stats, k, int(v))
        self._load_state(sd["state"])

    # ------------------------------------------------------------------------------------------ helpers
    @staticmethod
    def is_matrix(p: torch.Tensor) -> bool:
        return p.dim() >= 2

    @staticmethod
    def as_matrix(p: torch.Tensor) -> torch.Tensor:
        """``p`` viewed as ``(shape[0], -1)``: conv kernels become matrices, as in PowerSGD."""
        return p.view(p.shape[0], -1)
