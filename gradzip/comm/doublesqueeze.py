"""DoubleSqueeze (Tang et al. 2019), sharded placement: every worker is the parameter server of 1/n of each tensor.

    worker i:  v_i = g_i + d_i;   send C(v_i);              d_i = v_i - C(v_i)
    server:    v = mean_i C(v_i) + d_s;   send C(v);        d_s = v - C(v)
    everyone:  gradient = C(v)

Per bucket: each tensor is cut into n parts; part j of every tensor, compressed, goes to worker j (one
all-to-all); worker j aggregates what it received for its part, adds its server residual, compresses again and
sends the result to everyone (one all-gather). Both passes carry compressed payloads only, and every worker
applies the same decoded ``C(v)``, so the replicas stay identical.

The parts are cut per tensor (not per bucket) so that a worker's share, and the residuals that belong to it,
depend on the tensor's name only: they survive DDP's bucket rebuild and a restart.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import torch
from torch.futures import Future

from gradzip.comm.collectives import Comm
from gradzip.compress.base import Compressor
from gradzip.config import DoubleSqueezeConfig
from gradzip.feedback import ErrorFeedback, Velocity
from gradzip.fusion import ByteLayout
from gradzip.reducer import Bucket, Reducer, new_future


@functools.cache
def part_bounds(numel: int, parts: int) -> tuple[tuple[int, int], ...]:
    """``[start, stop)`` of each of ``parts`` near-equal parts of a flat tensor (the first ones one longer)."""
    q, r = divmod(numel, parts)
    bounds, a = [], 0
    for j in range(parts):
        b = a + q + (1 if j < r else 0)
        bounds.append((a, b))
        a = b
    return tuple(bounds)


def check_pairing(compressor: Compressor, pattern: str) -> None:
    """A compressor this pattern can carry: one round, and a payload size known in advance."""
    if compressor.caps.rounds != 1:
        raise ValueError(
            f"{pattern} needs a one-round compressor; {compressor.name!r} has {compressor.caps.rounds}"
        )
    if not compressor.caps.fixed_size:
        raise ValueError(f"{pattern} needs fixed-size payloads; {compressor.name!r} has variable-size ones")


class PartCodec:
    """Compresses, packs, unpacks and aggregates part ``j`` of a list of tensors.

    Each (tensor, part, pass) draws from its own random stream, so any process can redraw what another
    drew (random-k's indices) without it being sent."""

    def __init__(self, compressor: Compressor, parts: int) -> None:
        self.compressor = compressor
        self.parts = parts
        self._layouts: dict[tuple[tuple[int, ...], int], ByteLayout] = {}

    def layout(self, numels: tuple[int, ...], part: int) -> ByteLayout:
        key = (numels, part)
        lay = self._layouts.get(key)
        if lay is None:
            specs = []
            for n in numels:
                a, b = part_bounds(n, self.parts)[part]
                specs += self.compressor.payload_spec(b - a)
            lay = self._layouts[key] = ByteLayout(specs)
        return lay

    def width(self, numels: tuple[int, ...]) -> int:
        """Bytes of the largest part's message: every part is sent in a row of this width."""
        return max(self.layout(numels, j).nbytes for j in range(self.parts))

    def _stream(self, key: str, part: int, tag: str, step: int) -> None:
        self.compressor.select_stream(f"{key}#{part}{tag}", step)

    def part_of(self, flat: torch.Tensor, part: int) -> torch.Tensor:
        """Part ``part`` of a flat tensor (a view)."""
        a, b = part_bounds(flat.numel(), self.parts)[part]
        return flat[a:b]

    def compress(
        self,
        chunks: list[torch.Tensor],
        keys: list[str],
        part: int,
        tag: str,
        step: int,
        residual: bool,
        velocity: list[torch.Tensor] | None = None,
    ) -> list[torch.Tensor]:
        """Payloads of ``chunks`` (part ``part`` of each tensor); with ``residual`` each chunk becomes, in
        place, what compression left out (``v - C(v)``). A sparsifier zeroes the sent entries of the
        ``velocity`` chunks (DGC's momentum factor masking)."""
        comp, out = self.compressor, []
        for t, (chunk, key) in enumerate(zip(chunks, keys, strict=True)):
            self._stream(key, part, tag, step)
            payload, ctx = comp.encode(chunk)
            if residual:
                comp.residual_(chunk, payload, ctx)
            if velocity is not None and comp.sparsifies:
                comp.mask_sent_(velocity[t], ctx)
            out += payload
        return out

    def compress_worker(
        self,
        ef: ErrorFeedback,
        velocity: Velocity,
        grads: list[torch.Tensor],
        keys: list[str],
        tag: str,
        step: int,
    ) -> list[list[torch.Tensor]]:
        """The worker's half on every part: ``v_i = u_i + d_i`` (``u_i`` the gradient, or its velocity),
        formed in the residual's buffer; compressing each part turns it into ``d_i`` in place. Returns the
        payloads of each part."""
        us = [velocity(k, g.reshape(-1)) for k, g in zip(keys, grads, strict=True)]
        vs = [ef.compensate(k, u) for k, u in zip(keys, us, strict=True)]
        masks = us if velocity.momentum else None
        return [
            self.compress(
                [self.part_of(v, j) for v in vs],
                keys,
                j,
                tag,
                step,
                residual=True,
                velocity=[self.part_of(u, j) for u in masks] if masks is not None else None,
            )
            for j in range(self.parts)
        ]

    def _per_tensor(self, views: list[torch.Tensor], numels: tuple[int, ...]) -> list[list[torch.Tensor]]:
        width = len(views) // len(numels) if numels else 0
        return [views[t * width : (t + 1) * width] for t in range(len(numels))]

    def aggregate(
        self, rows: torch.Tensor, numels: tuple[int, ...], keys: list[str], part: int, tag: str, step: int
    ) -> list[torch.Tensor]:
        """Mean over the rows (one per sender) of the decoded part ``part`` of every tensor."""
        comp, lay = self.compressor, self.layout(numels, part)
        out = []
        for n, key, payload in zip(
            numels, keys, self._per_tensor(lay.views(rows[:, : lay.nbytes]), numels), strict=True
        ):
            a, b = part_bounds(n, self.parts)[part]
            self._stream(key, part, tag, step)
            out.append(comp.aggregate(payload, b - a, comp.shared_context(b - a, rows.device)))
        return out

    def decode(
        self, row: torch.Tensor, numels: tuple[int, ...], keys: list[str], part: int, tag: str, step: int
    ) -> list[torch.Tensor]:
        """Decoded part ``part`` of every tensor from one sender's row."""
        comp, lay = self.compressor, self.layout(numels, part)
        out = []
        for n, key, payload in zip(
            numels, keys, self._per_tensor(lay.views(row[: lay.nbytes]), numels), strict=True
        ):
            a, b = part_bounds(n, self.parts)[part]
            self._stream(key, part, tag, step)
            out.append(comp.decode(payload, comp.shared_context(b - a, row.device), b - a))
        return out

    def pack(
        self, payloads: list[torch.Tensor], numels: tuple[int, ...], part: int, into: torch.Tensor
    ) -> None:
        """Write the payloads straight into ``into`` (a zeroed message row: the padding travels too)."""
        lay = self.layout(numels, part)
        for view, t in zip(lay.views(into[: lay.nbytes]), payloads, strict=True):
            view.copy_(t.reshape(-1))


def server_step(
    codec: PartCodec,
    ef: ErrorFeedback | None,
    received: list[torch.Tensor],
    keys: list[str],
    part: int,
    step: int,
) -> list[torch.Tensor]:
    """The server's half of DoubleSqueeze on its part: ``v = mean_i C(v_i) + d_s``; returns the payloads of
    ``C(v)`` and leaves ``d_s = v - C(v)`` in the residuals (none without server error feedback)."""
    vs = [ef.compensate(key, agg) if ef is not None else agg for key, agg in zip(keys, received, strict=True)]
    return codec.compress(vs, keys, part, "/server", step, residual=ef is not None)


@dataclass
class _Plan:
    numels: tuple[int, ...]
    width: int


@dataclass
class _Pending:
    bucket: Bucket
    plan: _Plan
    first: Future[torch.Tensor]
    out: Future[torch.Tensor]
    second: Future[torch.Tensor] | None = None


class DoubleSqueezeSharded(Reducer):
    def __init__(self, cfg: DoubleSqueezeConfig, comm: Comm) -> None:
        super().__init__(comm)
        compressor = cfg.make_compressor()
        check_pairing(compressor, "doublesqueeze")
        if not compressor.caps.shared_randomness:
            # Independent randomness per worker (QSGD's rounding) keeps the aggregate unbiased.
            compressor.reseed(compressor.seed * 1_000_003 + comm.rank)
        self.codec = PartCodec(compressor, comm.world)
        self.worker_ef = ErrorFeedback()
        # The server residual of this worker's part of each tensor (keyed by the tensor's name).
        self.server_ef = ErrorFeedback() if cfg.server_error_feedback else None
        self.velocity = Velocity(cfg.momentum_correction)
        self._pending: list[_Pending] = []

    def abort_step(self) -> None:
        super().abort_step()
        self._pending = []

    def _make_plan(self, bucket: Bucket) -> _Plan:
        numels = tuple(g.numel() for g in bucket.grads)
        return _Plan(numels, self.codec.width(numels))

    def launch(self, bucket: Bucket) -> Future[torch.Tensor]:
        self.begin(bucket)
        plan: _Plan = self.plan(bucket, self._make_plan)
        parts = self.codec.compress_worker(
            self.worker_ef, self.velocity, bucket.grads, bucket.keys, "", self.step
        )
        send = torch.zeros((self.comm.world, plan.width), dtype=torch.uint8, device=bucket.buffer.device)
        for j, payloads in enumerate(parts):
            self.codec.pack(payloads, plan.numels, j, send[j])
        out = new_future(bucket.buffer)
        self._pending.append(_Pending(bucket, plan, self.comm.all_to_all(send), out))
        if bucket.is_last:
            self._finish_step()
        self.end(bucket)
        return out

    def _finish_step(self) -> None:
        me = self.comm.rank
        # The server pass of every bucket, in bucket order from this thread: every worker issues the same
        # sequence of collectives (see gradzip.compress.powersgd for why not from a completion callback).
        for pd in self._pending:
            rows = self.wait(pd.first)
            keys = pd.bucket.keys
            received = self.codec.aggregate(rows, pd.plan.numels, keys, me, "", self.step)
            payloads = server_step(self.codec, self.server_ef, received, keys, me, self.step)
            msg = torch.zeros(pd.plan.width, dtype=torch.uint8, device=rows.device)
            self.codec.pack(payloads, pd.plan.numels, me, msg)
            pd.second = self.comm.all_gather(msg)
        for pd in self._pending:
            assert pd.second is not None
            rows = self.wait(pd.second)
            flats = [g.view(-1) for g in pd.bucket.grads]
            for s in range(self.comm.world):
                parts = self.codec.decode(rows[s], pd.plan.numels, pd.bucket.keys, s, "/server", self.step)
                for flat, part in zip(flats, parts, strict=True):
                    a, b = part_bounds(flat.numel(), self.comm.world)[s]
                    flat[a:b].copy_(part)
            pd.out.set_result(pd.bucket.buffer)
        self._pending = []

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
