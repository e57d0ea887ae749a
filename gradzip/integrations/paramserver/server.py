"""The server side of the parameter-server placements: :func:`serve` until every worker has closed."""

from __future__ import annotations

import collections
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from gradzip.comm import wire
from gradzip.comm.collectives import Comm
from gradzip.compress.feedback import ErrorFeedback
from gradzip.config import DoubleSqueezeAsyncConfig, DoubleSqueezeConfig
from gradzip.integrations.paramserver.placement import ASYNC, Setup
from gradzip.reducers.doublesqueeze import AsyncServerPart, make_codec, server_step
from gradzip.reducers.parts import PartCodec
from gradzip.registry import make_config
from gradzip.util import first_line


def serve() -> dict[str, Any]:
    """Run this process as a parameter server until every worker has closed; returns its statistics.

    Everything it needs (method, options, tensor sizes) comes from worker 0."""
    box: list[Any] = [None]
    dist.recv_object_list(box, src=0)
    setup: Setup = box[0]
    world, rank = dist.get_world_size(), dist.get_rank()
    servers = world - setup.workers
    part = rank - setup.workers
    cfg = make_config(setup.method, **setup.options)
    assert isinstance(cfg, DoubleSqueezeConfig)
    codec = make_codec(cfg, servers, rank, setup.method)
    server = (_AsyncServer if setup.method == ASYNC else _SyncServer)(setup, codec, part, cfg)
    stats = server.run()
    stats.update(server=part, rank=rank, **server.comm.stats.to_dict())
    dist.send_object_list([stats], dst=0)
    return {**stats, "state": server.state_dict()}


class _Server:
    def __init__(self, setup: Setup, codec: PartCodec, part: int, cfg: DoubleSqueezeConfig) -> None:
        self.setup, self.codec, self.part = setup, codec, part
        self.numels = tuple(setup.numels)
        self.names = setup.names
        self.width = codec.layout(self.numels, part).nbytes
        self.comm = Comm()
        self.ef = ErrorFeedback() if cfg.server_error_feedback else None
        self.timeout = timedelta(seconds=setup.timeout)

    def _wait(self, worker: int, work: Any) -> None:
        try:
            work.wait(self.timeout)
        except RuntimeError as err:
            raise wire.WorkerLost(
                f"server {self.part} lost worker rank {worker}: {first_line(err)}"
            ) from None

    def _reply(self, worker: int, step: int, payloads: list[torch.Tensor]) -> Any:
        msg = wire.message(self.width, step)
        self.codec.pack(payloads, self.numels, self.part, wire.payload(msg))
        return self.comm.isend(msg, worker)

    def run(self) -> dict[str, Any]:
        raise NotImplementedError

    def state_dict(self) -> dict[str, Any]:
        """The server's residuals of its part, keyed by tensor name (empty without server error feedback)."""
        return {"residuals": self.ef.state_dict() if self.ef is not None else {}}


class _SyncServer(_Server):
    def run(self) -> dict[str, Any]:
        workers, step = self.setup.workers, 0
        while True:
            pending = [wire.message(self.width) for _ in range(workers)]
            works = [self.comm.irecv(buf, i) for i, buf in enumerate(pending)]
            for i, work in enumerate(works):
                self._wait(i, work)
            flags = [wire.header(buf)[1] for buf in pending]
            if any(f & wire.STOP for f in flags):
                if not all(f & wire.STOP for f in flags):
                    late = [i for i, f in enumerate(flags) if not f & wire.STOP]
                    raise wire.WorkerLost(
                        f"server {self.part}: workers {late} sent step {step} after others closed"
                    )
                self.comm.stats.steps = step
                return {}
            rows = torch.stack([wire.payload(buf) for buf in pending])
            received = self.codec.aggregate(rows, self.numels, self.names, self.part, "", step)
            payloads = server_step(self.codec, self.ef, received, self.names, self.part, step)
            sends = [self._reply(i, step, payloads) for i in range(workers)]
            for i, work in enumerate(sends):
                self._wait(i, work)
            step += 1


class _AsyncServer(_Server):
    def __init__(self, setup: Setup, codec: PartCodec, part: int, cfg: DoubleSqueezeConfig) -> None:
        super().__init__(setup, codec, part, cfg)
        assert isinstance(cfg, DoubleSqueezeAsyncConfig)
        self.max_staleness = cfg.max_staleness
        self.model = AsyncServerPart(
            codec, part, self.names, self.numels, setup.initial, setup.workers, setup.lr, setup.momentum,
            error_feedback=cfg.server_error_feedback,
        )  # fmt: skip

    def state_dict(self) -> dict[str, Any]:
        return self.model.state_dict()

    def run(self) -> dict[str, Any]:
        n = self.setup.workers
        clocks = [0] * n
        active = set(range(n))
        waiting: set[int] = set()
        staleness: collections.Counter[int] = collections.Counter()
        max_lead = 0
        buf = wire.message(self.width)
        while active:
            # Pushes are handled in the order they arrive, from whichever worker (a receive from any source:
            # every worker's message to this server has the same size).
            work = self.comm.irecv(buf)
            try:
                work.wait(self.timeout)
            except RuntimeError as err:
                raise wire.WorkerLost(
                    f"server {self.part}: no push from workers {sorted(active)} within "
                    f"{self.timeout.total_seconds():g}s, or one of them died: {first_line(err)}"
                ) from None
            i = int(work._source_rank())
            clock, flags = wire.header(buf)
            if flags & wire.STOP:
                active.discard(i)
            else:
                staleness[self.model.apply(i, wire.payload(buf), clock)] += 1
                clocks[i] = clock + 1
                waiting.add(i)
            for j in sorted(waiting):
                slowest = min((clocks[k] for k in active), default=clocks[j])
                # Stale synchronous parallel: reply (and so let the worker go on) unless it is too far ahead.
                if clocks[j] - slowest <= self.max_staleness:
                    max_lead = max(max_lead, clocks[j] - slowest)
                    self._wait(j, self._reply(j, clocks[j] - 1, self.model.reply(j, clocks[j] - 1)))
                    waiting.discard(j)
        final = torch.cat(self.model.x) if self.model.x else torch.zeros(0)
        for i in range(n):  # every worker ends with the authoritative model
            self._wait(i, dist.isend(final, i))
        self.comm.stats.steps = self.model.version
        return {
            "pushes": self.model.version,
            "staleness": dict(sorted(staleness.items())),
            "max_lead": max_lead,
            "max_staleness": self.max_staleness,
        }
