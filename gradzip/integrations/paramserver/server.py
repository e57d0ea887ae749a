"""The server side of the parameter-server placements: :func:`serve` until every worker has closed."""

from __future__ import annotations

import collections
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from gradzip.comm import wire
from gradzip.comm.collectives import Comm
from gradzip.comm.finite import NonFiniteGradient
from gradzip.compress.feedback import ErrorFeedback
from gradzip.config import DoubleSqueezeAsyncConfig, DoubleSqueezeConfig
from gradzip.integrations.paramserver.placement import ASYNC, Setup
from gradzip.reducers.doublesqueeze import AsyncServerPart, make_codec, server_step
from gradzip.reducers.parts import PartCodec
from gradzip.registry import make_config
from gradzip.util import first_line


def serve(state: dict[str, Any] | None = None) -> dict[str, Any]:
    """Run this process as a parameter server until every worker has closed; returns its statistics and its
    final ``state``.

    Everything it needs (method, options, tensor sizes) comes from worker 0, and so does the state to
    continue from when a resumed run's worker 0 passed ``server_states``; ``state`` (this server's
    ``state_dict()``, e.g. from a file of its own) is used where worker 0 sent none."""
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
    resumed = setup.state if setup.state is not None else state
    if resumed is not None:
        server.load_state_dict(resumed)
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

    def _reply(
        self, worker: int, step: int, payloads: list[torch.Tensor] | None, poisoned: list[int] | None = None
    ) -> Any:
        """Send ``payloads`` (None: zeros) to ``worker``; flagged ``NONFINITE`` with ``poisoned`` workers."""
        if poisoned:
            msg = wire.message(self.width, step, wire.NONFINITE, (poisoned[0], len(poisoned)))
        else:
            msg = wire.message(self.width, step)
        if payloads is not None:
            self.codec.pack(payloads, self.numels, self.part, wire.payload(msg))
        return self.comm.isend(msg, worker)

    def _stop_on(self, poisoned: list[int], step: int) -> None:
        """Under ``nan_policy="raise"``, once every worker has been told: stop like them."""
        if self.setup.nan_policy == "raise":
            raise NonFiniteGradient(poisoned, step)

    def run(self) -> dict[str, Any]:
        raise NotImplementedError

    def state_dict(self) -> dict[str, Any]:
        """The server's residuals of its part, keyed by tensor name (empty without server error feedback), its
        codec's random state and traffic."""
        return {
            "residuals": self.ef.state_dict() if self.ef is not None else {},
            "compressor": self.codec.compressor.state_dict(),
            "stats": self.comm.stats.to_dict(),
        }

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        if self.ef is not None:
            self.ef.load_state_dict(sd["residuals"])
        self.codec.compressor.load_state_dict(sd["compressor"])
        for k, v in sd["stats"].items():
            setattr(self.comm.stats, k, int(v))


class _SyncServer(_Server):
    def run(self) -> dict[str, Any]:
        workers = self.setup.workers
        while True:
            pending = [wire.message(self.width) for _ in range(workers)]
            works = [self.comm.irecv(buf, i) for i, buf in enumerate(pending)]
            for i, work in enumerate(works):
                self._wait(i, work)
            headers = [wire.header(buf) for buf in pending]
            # The step is the workers' (random-k's indices are drawn per step: a server counting on its own
            # would disagree with them after a resume); every worker must be at the same one.
            step, flags = headers[0][0], [f for _, f in headers]
            if any(f & wire.STOP for f in flags):
                if not all(f & wire.STOP for f in flags):
                    late = [i for i, f in enumerate(flags) if not f & wire.STOP]
                    raise wire.WorkerLost(
                        f"server {self.part}: workers {late} sent step {step} after others closed"
                    )
                self.comm.stats.steps = step
                return {}
            if any(s != step for s, _ in headers):
                raise wire.WorkerLost(
                    f"server {self.part}: the workers sent different steps {[s for s, _ in headers]}: their "
                    "states do not belong to the same run"
                )
            # A worker that saw a NaN or an Inf pushed zeros: every worker skips the step, and the server
            # residuals stay as they were (comm.finite).
            poisoned = [i for i, f in enumerate(flags) if f & wire.NONFINITE]
            payloads = None
            if not poisoned:
                rows = torch.stack([wire.payload(buf) for buf in pending])
                received = self.codec.aggregate(rows, self.numels, self.names, self.part, "", step)
                payloads = server_step(self.codec, self.ef, received, self.names, self.part, step)
            sends = [self._reply(i, step, payloads, poisoned) for i in range(workers)]
            for i, work in enumerate(sends):
                self._wait(i, work)
            if poisoned:
                self._stop_on(poisoned, step)  # under "raise", before any state: the workers stop too
            if any(f & wire.CHECKPOINT for f in flags):
                dist.send_object_list([self.state_dict()], dst=0)  # worker 0 writes it into its checkpoint


class _AsyncServer(_Server):
    def __init__(self, setup: Setup, codec: PartCodec, part: int, cfg: DoubleSqueezeConfig) -> None:
        super().__init__(setup, codec, part, cfg)
        assert isinstance(cfg, DoubleSqueezeAsyncConfig)
        self.max_staleness = cfg.max_staleness
        self.model = AsyncServerPart(
            codec, part, self.names, self.numels, setup.initial, setup.workers, setup.lr, setup.momentum,
            error_feedback=cfg.server_error_feedback,
        )  # fmt: skip
        self.clocks = [0] * setup.workers  # the next step each worker will push
        self.staleness: collections.Counter[int] = collections.Counter()
        self.max_lead = 0

    def state_dict(self) -> dict[str, Any]:
        """The authoritative model, its velocity, each worker's copy, the clocks and the statistics so far;
        taken at a checkpoint's barrier (see ``run``), where it agrees with every worker's own checkpoint."""
        return {
            **self.model.state_dict(),
            "clocks": list(self.clocks),
            "staleness": dict(self.staleness),
            "max_lead": self.max_lead,
            "compressor": self.codec.compressor.state_dict(),
            "stats": self.comm.stats.to_dict(),
        }

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        self.model.load_state_dict(sd)
        self.clocks = [int(c) for c in sd["clocks"]]
        self.staleness = collections.Counter({int(k): int(v) for k, v in sd["staleness"].items()})
        self.max_lead = int(sd["max_lead"])
        self.codec.compressor.load_state_dict(sd["compressor"])
        for k, v in sd["stats"].items():
            setattr(self.comm.stats, k, int(v))

    def _answer(self, worker: int, dropped: set[int]) -> None:
        """Reply to ``worker``'s last push with the compressed change of its model (flagged when that push
        was dropped for a NaN or an Inf)."""
        clock = self.clocks[worker] - 1
        flag = [worker] if worker in dropped else None
        self._wait(worker, self._reply(worker, clock, self.model.reply(worker, clock), flag))
        dropped.discard(worker)

    def run(self) -> dict[str, Any]:
        """Serve pushes in arrival order, each worker at most ``max_staleness`` steps ahead of the slowest.

        A push flagged ``CHECKPOINT`` is a barrier: it is applied, but its reply waits until every worker has
        pushed its flagged step (the same step on every worker). Every worker has then pushed exactly the
        steps up to it; the replies go out (bringing each worker's copy up to date), then the state goes to
        worker 0: a state that every worker's checkpoint of that step agrees with."""
        n = self.setup.workers
        clocks, staleness = self.clocks, self.staleness
        active = set(range(n))
        waiting: set[int] = set()
        at_barrier: set[int] = set()
        buf = wire.message(self.width)
        poisoned: list[int] = []  # under nan_policy "raise": the worker whose push stops the run
        dropped: set[int] = set()  # workers whose last push was dropped (told so in their next reply)
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
                if flags & wire.NONFINITE:  # a NaN or an Inf in its gradient: dropped, never applied
                    dropped.add(i)
                    if self.setup.nan_policy == "raise" and not poisoned:
                        poisoned = [i]
                else:
                    staleness[self.model.apply(i, wire.payload(buf), clock)] += 1
                clocks[i] = clock + 1
                (at_barrier if flags & wire.CHECKPOINT else waiting).add(i)
            if poisoned:  # under "raise": every worker is told at its next push (or now), then stop
                waiting |= at_barrier
                at_barrier.clear()
                for j in sorted(waiting):
                    self._wait(j, self._reply(j, clocks[j] - 1, None, poisoned))
                    active.discard(j)
                waiting.clear()
                continue
            if at_barrier and at_barrier >= active:  # every worker pushed the checkpoint's step
                for j in sorted(at_barrier):
                    self._answer(j, dropped)
                at_barrier.clear()
                dist.send_object_list([self.state_dict()], dst=0)  # worker 0 writes it into its checkpoint
            for j in sorted(waiting):
                slowest = min((clocks[k] for k in active), default=clocks[j])
                # Stale synchronous parallel: reply (and so let the worker go on) unless it is too far ahead.
                if clocks[j] - slowest <= self.max_staleness:
                    self.max_lead = max(self.max_lead, clocks[j] - slowest)
                    self._answer(j, dropped)
                    waiting.discard(j)
        if poisoned:
            self._stop_on(poisoned, clocks[poisoned[0]] - 1)
        final = torch.cat(self.model.x) if self.model.x else torch.zeros(0)
        for i in range(n):  # every worker ends with the authoritative model
            self._wait(i, dist.isend(final, i))
        self.comm.stats.steps = self.model.version
        return {
            "pushes": self.model.version,
            "staleness": dict(sorted(staleness.items())),
            "max_lead": self.max_lead,
            "max_staleness": self.max_staleness,
        }
