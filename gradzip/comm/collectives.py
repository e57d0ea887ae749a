"""The collectives every method uses, with this worker's byte accounting.

Bytes are counted from the tensors actually handed to the collective, independent of the collective's
internal algorithm (ring, tree): an all-reduce sends this worker's contribution and receives one aggregate;
an all-gather sends this worker's payload and receives the other workers' payloads. Those are payload
counts. What the algorithm makes each worker move is another number: :meth:`CommStats.ring_bytes` gives it
for ring algorithms (what gloo runs), from the per-collective counters beside the payload counts.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from datetime import timedelta

import torch
import torch.distributed as dist
from torch.futures import Future

from gradzip.comm.finite import flag_vector

# torch 2.13 renamed all_gather_into_tensor to all_gather_single (the old name warns); torch < 2.13 (the
# CUDA builds GPU users install) has only the old one.
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


def ring_all_reduce_bytes(nbytes: float, world: int) -> float:
    """Bytes a ring all-reduce of an ``nbytes`` tensor sends out of each worker (and receives into it):
    ``2(n-1)/n`` of the tensor, a reduce-scatter then an all-gather of ``n`` chunks."""
    return 2 * (world - 1) / world * nbytes if world > 1 else 0.0


def ring_all_gather_bytes(nbytes: float, world: int) -> float:
    """Bytes a ring all-gather of an ``nbytes`` payload per worker sends out of each worker (and receives):
    every other worker's payload passes through, ``(n-1)`` payloads."""
    return (world - 1) * nbytes


@dataclass
class CommStats:
    """Cumulative traffic of this worker.

    ``bytes_sent`` and ``bytes_received`` are payloads (see the module's docstring). The per-collective
    counters below split ``bytes_sent`` by collective, so that the bytes each one moves on the wire can be
    modelled by its own algorithm (:meth:`ring_bytes`); ``votes`` counts control collectives that carry no
    payload of the method's."""

    steps: int = 0
    bytes_sent: int = 0
    bytes_received: int = 0
    bytes_uncompressed: int = 0
    """What a plain all-reduce of the same gradients would have sent (its payload: one copy of the
    gradients; the gossip and parameter-server families count their own references, see their docs)."""
    collectives: int = 0
    all_reduce_bytes: int = 0
    """Bytes of the tensors handed to all-reduces (this worker's contributions)."""
    all_reduce_calls: int = 0
    all_gather_bytes: int = 0
    """Bytes of this worker's payloads handed to all-gathers (one copy each)."""
    all_gather_calls: int = 0
    all_to_all_bytes: int = 0
    """Bytes sent by all-to-alls: the rows for the other workers (the own row never leaves)."""
    all_to_all_calls: int = 0
    p2p_bytes_sent: int = 0
    """Point-to-point (parameter servers, gossip neighbours): bytes sent and received, and the messages."""
    p2p_bytes_received: int = 0
    p2p_sends: int = 0
    p2p_recvs: int = 0
    votes: int = 0
    """The step's agreement on non-finite gradients: all-reduces of ``world`` floats (control traffic, in
    no byte count above)."""

    def to_dict(self) -> dict[str, int]:
        return asdict(self)

    def ring_bytes(self, world: int) -> float:
        """The bytes ring algorithms move out of this worker for the collectives counted so far: an all-reduce
        of B bytes ``2(n-1)/n·B``, an all-gather of a B-byte payload ``(n-1)·B``, all-to-alls and
        point-to-point messages as sent. Payload only (no framing or TCP/IP headers, no votes); in a ring each
        worker receives as much as it sends. ``world`` is the number of workers in the collectives."""
        return (
            ring_all_reduce_bytes(self.all_reduce_bytes, world)
            + ring_all_gather_bytes(self.all_gather_bytes, world)
            + self.all_to_all_bytes
            + self.p2p_bytes_sent
        )


@dataclass
class Comm:
    """A process group plus the traffic it carried. Knows nothing about what a payload means."""

    group: dist.ProcessGroup | None = None
    stats: CommStats = field(default_factory=CommStats)
    trace: list[tuple[str, tuple[int, ...], torch.dtype]] | None = None
    """When a list, every collective appends (op, shape, dtype): tests count and inspect them."""

    def __post_init__(self) -> None:
        self.world = dist.get_world_size(self.group)
        self.rank = dist.get_rank(self.group)

    def _record(self, op: str, t: torch.Tensor, sent: int, received: int) -> None:
        self.stats.collectives += 1
        self.stats.bytes_sent += sent
        self.stats.bytes_received += received
        if self.trace is not None:
            self.trace.append((op, tuple(t.shape), t.dtype))

    def all_reduce(self, t: torch.Tensor) -> Future[torch.Tensor]:
        """Sum ``t`` over workers, in place, asynchronously; the future holds ``t``."""
        self._record("all_reduce", t, t.nbytes, t.nbytes)
        self.stats.all_reduce_bytes += t.nbytes
        self.stats.all_reduce_calls += 1
        return self._all_reduce(t)

    def all_to_all(self, t: torch.Tensor) -> Future[torch.Tensor]:
        """Row ``j`` of ``t`` (``[world, ...]``) goes to worker ``j``; row ``i`` of the result came from
        worker ``i``. A worker's own row never leaves it, so it is not counted."""
        others = (t[0].nbytes if len(t) else 0) * (self.world - 1)
        self._record("all_to_all", t, others, others)
        self.stats.all_to_all_bytes += others
        self.stats.all_to_all_calls += 1
        return self._all_to_all(t)

    def all_gather(self, t: torch.Tensor) -> Future[torch.Tensor]:
        """Every worker's ``t`` stacked as ``[world, *t.shape]``, asynchronously."""
        self._record("all_gather", t, t.nbytes, t.nbytes * (self.world - 1))
        self.stats.all_gather_bytes += t.nbytes
        self.stats.all_gather_calls += 1
        return self._all_gather(t)

    def vote_nonfinite(self, bad: torch.Tensor | bool, device: torch.device) -> Future[torch.Tensor]:
        """The step's agreement on non-finite gradients (:mod:`gradzip.comm.finite`): one all-reduce of
        ``world`` floats that every worker makes once per step (``flagged`` reads it). Control traffic: not
        in the byte counts, only in ``stats.votes`` (it is on the wire all the same)."""
        self.stats.votes += 1
        return self._all_reduce(flag_vector(bad, self.rank, self.world, device))

    def isend(self, t: torch.Tensor, dst: int) -> dist.Work:
        """Send ``t`` to global rank ``dst`` (point-to-point, parameter servers)."""
        self.stats.bytes_sent += t.nbytes
        self.stats.p2p_bytes_sent += t.nbytes
        self.stats.p2p_sends += 1
        if self.trace is not None:
            self.trace.append(("send", tuple(t.shape), t.dtype))
        work = dist.isend(t, dst, group=self.group)
        assert work is not None
        return work

    def irecv(self, t: torch.Tensor, src: int | None = None) -> dist.Work:
        """Receive into ``t`` from global rank ``src`` (None: from whichever rank sends first)."""
        self.stats.bytes_received += t.nbytes
        self.stats.p2p_bytes_received += t.nbytes
        self.stats.p2p_recvs += 1
        work = dist.irecv(t, src, group=self.group)
        assert work is not None
        return work

    # The transport itself: what a world of one (SoloComm) replaces.
    def _all_reduce(self, t: torch.Tensor) -> Future[torch.Tensor]:
        work = dist.all_reduce(t, group=self.group, async_op=True)
        assert work is not None
        return work.get_future().then(lambda _: t)

    def _all_to_all(self, t: torch.Tensor) -> Future[torch.Tensor]:
        out = torch.empty_like(t)
        work = dist.all_to_all_single(out, t, group=self.group, async_op=True)
        assert work is not None
        return work.get_future().then(lambda _: out)

    def _all_gather(self, t: torch.Tensor) -> Future[torch.Tensor]:
        out = torch.empty((self.world, *t.shape), dtype=t.dtype, device=t.device)
        work = _all_gather_single(out.view(-1), t.reshape(-1), group=self.group, async_op=True)
        assert work is not None
        return work.get_future().then(lambda _: out)


def _done(t: torch.Tensor) -> Future[torch.Tensor]:
    fut: Future[torch.Tensor] = Future()
    fut.set_result(t)
    return fut


@dataclass
class SoloComm(Comm):
    """A world of one without a process group: every collective completes at once with what a one-worker
    group returns, and is counted like any other. The kernel benchmark runs the real reducers through it, so
    it times the code that ships with the collectives left out."""

    def __post_init__(self) -> None:
        self.world, self.rank = 1, 0

    def _all_reduce(self, t: torch.Tensor) -> Future[torch.Tensor]:
        return _done(t)

    def _all_to_all(self, t: torch.Tensor) -> Future[torch.Tensor]:
        return _done(t.clone())

    def _all_gather(self, t: torch.Tensor) -> Future[torch.Tensor]:
        return _done(t.reshape(1, *t.shape).clone())


def workers_group(workers: int, timeout: timedelta) -> dist.ProcessGroup:
    """The group of the training workers (global ranks ``0..workers-1``) beside parameter servers; every
    process of the world takes part in creating it. It gets the run's ``timeout``: torch gives a new group its
    backend's default (30 minutes on gloo), not the world group's, so a peer that dies mid-collective would
    otherwise hold the others for half an hour."""
    group = dist.new_group(list(range(workers)), timeout=timeout)
    assert group is not None  # every rank creates it, so every rank is handed it
    return group
