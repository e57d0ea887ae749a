"""The collectives every method uses, with this worker's byte accounting.

Bytes are counted from the tensors actually handed to the collective, independent of the collective's
internal algorithm (ring, tree): an all-reduce sends this worker's contribution and receives one aggregate;
an all-gather sends this worker's payload and receives the other workers' payloads.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
import torch.distributed as dist
from torch.futures import Future

from gradzip.comm.finite import flag_vector

# torch 2.13 renamed all_gather_into_tensor to all_gather_single (the old name warns); torch < 2.13 (the
# CUDA builds GPU users install) has only the old one.
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


@dataclass
class CommStats:
    """Cumulative traffic of this worker."""

    steps: int = 0
    bytes_sent: int = 0
    bytes_received: int = 0
    bytes_uncompressed: int = 0
    """What a plain all-reduce of the same gradients would have sent."""
    collectives: int = 0

    def to_dict(self) -> dict[str, int]:
        return asdict(self)


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

    def _record(self, op: str, t: torch.Tensor, received: int) -> None:
        self.stats.collectives += 1
        self.stats.bytes_sent += t.nbytes
        self.stats.bytes_received += received
        if self.trace is not None:
            self.trace.append((op, tuple(t.shape), t.dtype))

    def all_reduce(self, t: torch.Tensor) -> Future[torch.Tensor]:
        """Sum ``t`` over workers, in place, asynchronously; the future holds ``t``."""
        self._record("all_reduce", t, t.nbytes)
        return self._all_reduce(t)

    def all_to_all(self, t: torch.Tensor) -> Future[torch.Tensor]:
        """Row ``j`` of ``t`` (``[world, ...]``) goes to worker ``j``; row ``i`` of the result came from
        worker ``i``. A worker's own row never leaves it, so it is not counted."""
        row = t[0].nbytes if len(t) else 0
        self._record("all_to_all", t, row * (self.world - 1))
        self.stats.bytes_sent -= row  # _record counted the whole tensor; the own row stays here
        return self._all_to_all(t)

    def all_gather(self, t: torch.Tensor) -> Future[torch.Tensor]:
        """Every worker's ``t`` stacked as ``[world, *t.shape]``, asynchronously."""
        self._record("all_gather", t, t.nbytes * (self.world - 1))
        return self._all_gather(t)

    def vote_nonfinite(self, bad: torch.Tensor | bool, device: torch.device) -> Future[torch.Tensor]:
        """The step's agreement on non-finite gradients (:mod:`gradzip.comm.finite`): one all-reduce of
        ``world`` floats that every worker makes once per step (``flagged`` reads it). Control traffic: not
        counted in ``stats``."""
        return self._all_reduce(flag_vector(bad, self.rank, self.world, device))

    def isend(self, t: torch.Tensor, dst: int) -> dist.Work:
        """Send ``t`` to global rank ``dst`` (point-to-point, parameter servers)."""
        self.stats.bytes_sent += t.nbytes
        if self.trace is not None:
            self.trace.append(("send", tuple(t.shape), t.dtype))
        work = dist.isend(t, dst, group=self.group)
        assert work is not None
        return work

    def irecv(self, t: torch.Tensor, src: int | None = None) -> dist.Work:
        """Receive into ``t`` from global rank ``src`` (None: from whichever rank sends first)."""
        self.stats.bytes_received += t.nbytes
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
