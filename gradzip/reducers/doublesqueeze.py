"""DoubleSqueeze (Tang et al. 2019): any compressor on both passes through the parameter server, with error
compensation on the workers and on the server.

    worker i:  v_i = g_i + d_i;   send C(v_i);              d_i = v_i - C(v_i)
    server:    v = mean_i C(v_i) + d_s;   send C(v);        d_s = v - C(v)
    everyone:  gradient = C(v)

Server ``j`` owns part ``j`` of every tensor (:mod:`gradzip.reducers.parts`). This file holds the rules and
the sharded placement, where every worker is the server of its own part: per bucket, part ``j`` of every
tensor, compressed, goes to worker ``j`` (one all-to-all); worker ``j`` aggregates what it received, adds its
server residual, compresses again and sends the result to everyone (one all-gather). Both passes carry
compressed payloads only, and every worker applies the same decoded ``C(v)``, so the replicas stay identical.
Dedicated server processes run the same rules over point-to-point messages
(:mod:`gradzip.integrations.paramserver`).

Asynchronous (``doublesqueeze-async``): the servers hold the authoritative model and its optimizer. On a push
from worker ``i``, server ``s`` applies it at once and replies with the compressed change of ``i``'s model::

    x -= lr * momentum_sgd(C(v_i));   u = x - x^_i;   send C(u);   x^_i += C(u)

``x^_i`` is the server's copy of worker i's model, so ``x - x^_i`` carries what earlier replies left out: the
server's error compensation, per worker (without it the reply is the compressed change since the last reply,
and what compression dropped is lost).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch.futures import Future

from gradzip.comm.collectives import Comm
from gradzip.compress.base import check_pairing
from gradzip.compress.feedback import ErrorFeedback, Staged, Velocity
from gradzip.config import DoubleSqueezeConfig
from gradzip.reducers.parts import PartCodec
from gradzip.reducers.reducer import Bucket, Reducer


def make_codec(
    cfg: DoubleSqueezeConfig, parts: int, rank: int, pattern: str, uniform: bool = False
) -> PartCodec:
    """The codec of a DoubleSqueeze process: the configured compressor, checked against ``pattern``, with
    randomness of its own where workers need not agree (``uniform``: see ``PartCodec``)."""
    compressor = cfg.make_compressor()
    check_pairing(compressor, pattern)
    compressor.independent_per_rank(rank)
    return PartCodec(compressor, parts, uniform)


def server_step(
    codec: PartCodec,
    ef: ErrorFeedback | None,
    received: list[torch.Tensor],
    keys: list[str],
    part: int,
    step: int,
) -> list[torch.Tensor]:
    """The server's half on its part: ``v = mean_i C(v_i) + d_s``; returns the payloads of ``C(v)`` and
    leaves ``d_s = v - C(v)`` in the residuals (none without server error feedback)."""
    vs = [ef.compensate(key, agg) if ef is not None else agg for key, agg in zip(keys, received, strict=True)]
    return codec.compress(vs, keys, part, "/server", step, residual=ef is not None)


class AsyncServerPart:
    """The asynchronous server's state and rule on its part: the authoritative model ``x``, its velocity, and
    ``x^_i`` per worker (what worker ``i`` holds of this part; every worker starts from worker 0's model)."""

    def __init__(
        self,
        codec: PartCodec,
        part: int,
        names: list[str],
        numels: tuple[int, ...],
        initial: list[torch.Tensor],
        workers: int,
        lr: float,
        momentum: float,
        error_feedback: bool,
    ) -> None:
        self.codec, self.part, self.names, self.numels = codec, part, names, numels
        # n pushes take the place of one synchronous step's mean of n gradients: each applies 1/n of it, so
        # the run's learning rate means the same in both variants.
        self.lr, self.momentum = lr / workers, momentum
        self.error_feedback = error_feedback
        self.x = [t.clone() for t in initial]
        self.velocity = [torch.zeros_like(t) for t in self.x]
        self.held = [[t.clone() for t in self.x] for _ in range(workers)]
        self.version = 0  # pushes applied
        self.seen = [0] * workers  # the version each worker's model was brought to by its last reply

    def apply(self, worker: int, row: torch.Tensor, clock: int) -> int:
        """Apply worker ``worker``'s push at once; returns its staleness (updates it did not see)."""
        grads = self.codec.decode(row, self.numels, self.names, self.part, f"/from{worker}", clock)
        for x, u, g in zip(self.x, self.velocity, grads, strict=True):
            u.mul_(self.momentum).add_(g)
            x.sub_(u, alpha=self.lr)
        staleness = self.version - self.seen[worker]
        self.version += 1
        return staleness

    def reply(self, worker: int, clock: int) -> list[torch.Tensor]:
        """The payloads of ``C(x - x^_i)`` for worker ``worker``, keeping what compression left out."""
        deltas = [x - h for x, h in zip(self.x, self.held[worker], strict=True)]
        payloads = self.codec.compress(
            deltas, self.names, self.part, f"/to{worker}", clock, residual=self.error_feedback
        )
        for x, h, d in zip(self.x, self.held[worker], deltas, strict=True):
            # With error compensation the worker now holds x - (what was left out); without, the server
            # forgets the loss and treats the worker as up to date.
            h.copy_(x - d if self.error_feedback else x)
        self.seen[worker] = self.version
        return payloads

    def state_dict(self) -> dict[str, Any]:
        # The authoritative model, its velocity, and each worker's copy (the residuals).
        return {
            "x": [t.clone() for t in self.x],
            "velocity": [t.clone() for t in self.velocity],
            "held": [[t.clone() for t in h] for h in self.held],
            "version": self.version,
            "seen": list(self.seen),
        }

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        if len(sd["held"]) != len(self.held) or [t.numel() for t in sd["x"]] != [t.numel() for t in self.x]:
            raise ValueError(
                f"server state of {len(sd['held'])} workers and {len(sd['x'])} tensors; this run has "
                f"{len(self.held)} workers and {len(self.x)} tensors"
            )
        self.x = [t.clone() for t in sd["x"]]
        self.velocity = [t.clone() for t in sd["velocity"]]
        self.held = [[t.clone() for t in h] for h in sd["held"]]
        self.version = int(sd["version"])
        self.seen = [int(v) for v in sd["seen"]]


@dataclass
class _Plan:
    numels: tuple[int, ...]
    width: int


class DoubleSqueezeSharded(Reducer):
    """The sharded placement as a DDP hook: this worker is the server of part ``rank`` of every tensor."""

    def __init__(self, cfg: DoubleSqueezeConfig, comm: Comm) -> None:
        super().__init__(comm)
        # Parts travel as the rows of one all-to-all and one all-gather: one layout for all, batched passes.
        self.codec = make_codec(cfg, comm.world, comm.rank, "doublesqueeze", uniform=True)
        self.worker_ef = ErrorFeedback()
        # The server residual of this worker's part of each tensor (keyed by the tensor's name).
        self.server_ef = ErrorFeedback() if cfg.server_error_feedback else None
        self.velocity = Velocity(cfg.momentum_correction)

    def staged_state(self) -> list[Staged]:
        return [self.worker_ef, self.velocity]  # the server residuals change only in a step that goes ahead

    def generators(self) -> list[torch.Generator]:
        return [self.codec.compressor.generator]

    def _make_plan(self, bucket: Bucket) -> _Plan:
        numels = tuple(g.numel() for g in bucket.grads)
        return _Plan(numels, self.codec.width(numels))

    def start(self, bucket: Bucket) -> Future[torch.Tensor]:
        plan: _Plan = self.plan(bucket, self._make_plan)
        me, world, step, keys = self.comm.rank, self.comm.world, self.step, bucket.keys
        send = torch.zeros((world, plan.width), dtype=torch.uint8, device=bucket.buffer.device)
        self.codec.compress_worker_into(self.worker_ef, self.velocity, bucket.grads, keys, "", step, send)

        def server_pass(rows: torch.Tensor) -> Future[torch.Tensor]:
            received = self.codec.aggregate(rows, plan.numels, keys, me, "", step)
            payloads = server_step(self.codec, self.server_ef, received, keys, me, step)
            msg = torch.zeros(plan.width, dtype=torch.uint8, device=rows.device)
            self.codec.pack(payloads, plan.numels, me, msg)
            return self.comm.all_gather(msg)

        def finish(rows: torch.Tensor) -> None:
            self.codec.decode_into(rows, [g.view(-1) for g in bucket.grads], keys, "/server", step)

        return self.defer(bucket, self.comm.all_to_all(send), finish, server_pass)

    def state_dict(self) -> dict[str, Any]:
        sd = super().state_dict()
        sd["world"] = self.comm.world
        sd["compressor"] = self.codec.compressor.state_dict()
        sd["worker_residuals"] = self.worker_ef.state_dict()
        sd["server_residuals"] = self.server_ef.state_dict() if self.server_ef else {}
        sd["velocity"] = self.velocity.state_dict()
        return sd

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        if sd.get("world") != self.comm.world:
            # A server residual belongs to this worker's part, which depends on the number of workers.
            raise ValueError(
                f"state was saved with {sd.get('world')} workers; this run has {self.comm.world}"
            )
        super().load_state_dict(sd)
        self.codec.compressor.load_state_dict(sd["compressor"])
        self.worker_ef.load_state_dict(sd["worker_residuals"])
        if self.server_ef:
            self.server_ef.load_state_dict(sd["server_residuals"])
        self.velocity.load_state_dict(sd["velocity"])
