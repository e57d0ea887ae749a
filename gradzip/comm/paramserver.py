"""DoubleSqueeze through dedicated parameter servers (``placement="server"``), synchronous and asynchronous.

The world's last K ranks are servers that do not train; ranks ``0..n-1`` are workers. Server ``s`` owns part
``s`` of K of every tensor (as in BytePS), so the load is even whatever the model's layer sizes. Messages
are point-to-point on the world group: a 32-byte header (step, flags) and the compressor's payloads.

Synchronous (``doublesqueeze``)::

    worker i:  v_i = g_i + d_i;  send C(v_i) part s to server s;  d_i = v_i - C(v_i)
    server s:  v = mean_i C(v_i) + d_s;  send C(v) to every worker;  d_s = v - C(v)
    worker i:  gradient = C(v), assembled from every server's part; then its own optimizer step

Asynchronous (``doublesqueeze-async``): the servers hold the authoritative model and its optimizer. A worker
pushes its compressed, error-compensated gradient and waits only for its own reply::

    server s, on a push from worker i:  x -= lr * momentum_sgd(C(v_i))   (applied at once, no waiting)
                                         u = x - x^_i;  send C(u);  x^_i += C(u)
    worker i:                            x_i += C(u)

``x^_i`` is the server's copy of worker i's model, so ``x - x^_i`` carries what earlier replies left out: it
is the server's error compensation, per worker (with ``server_error_feedback=False`` the reply is the
compressed change since the last reply, and what compression dropped is lost). Stale synchronous parallel
bounds the lag: a worker more than ``max_staleness`` pushes ahead of the slowest waits for its reply.
"""

from __future__ import annotations

import collections
import time
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from gradzip.comm.collectives import Comm
from gradzip.comm.doublesqueeze import PartCodec, check_pairing, part_bounds, server_step
from gradzip.config import DoubleSqueezeConfig
from gradzip.feedback import ErrorFeedback, Velocity
from gradzip.registry import make_config

HEADER_BYTES = 32  # four int64: step (a worker's push count), flags, spare, spare
STOP = 1
SYNC, ASYNC = "doublesqueeze", "doublesqueeze-async"


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


class ServerError(RuntimeError):
    """A parameter server died or did not answer in time; ``rank`` is its global rank."""

    def __init__(self, message: str, rank: int) -> None:
        super().__init__(message)
        self.rank = rank


class WorkerLost(RuntimeError):
    """A server lost a worker (it died, or sent nothing within the timeout)."""


def server_ranks(world: int, servers: int) -> list[int]:
    """The global ranks of the servers: the last ``servers`` of the world."""
    if not 1 <= servers < world:
        raise ValueError(f"servers={servers} is invalid with {world} processes: it must be in 1..{world - 1}")
    return list(range(world - servers, world))


def is_server(servers: int) -> bool:
    """True on the processes that must call :func:`serve` (the world's last ``servers`` ranks)."""
    return dist.get_rank() in server_ranks(dist.get_world_size(), servers)


@dataclass
class _Setup:
    """What worker 0 tells every server at the start, so a server needs no model and no options of its own."""

    method: str
    options: dict[str, Any]
    names: list[str]
    numels: list[int]
    workers: int
    timeout: float
    lr: float = 0.0
    momentum: float = 0.0
    initial: list[torch.Tensor] = field(default_factory=list)  # async: the server's part of the model


def _frame(step: int, flags: int, width: int, codec: PartCodec | None = None, payloads: Any = None,
           numels: tuple[int, ...] = (), part: int = 0) -> torch.Tensor:  # fmt: skip
    msg = torch.zeros(HEADER_BYTES + width, dtype=torch.uint8)
    msg[:HEADER_BYTES].view(torch.int64)[:2] = torch.tensor([step, flags])
    if codec is not None:
        codec.pack(payloads, numels, part, msg[HEADER_BYTES:])
    return msg


def _header(msg: torch.Tensor) -> tuple[int, int]:
    step, flags = msg[:HEADER_BYTES].view(torch.int64)[:2].tolist()
    return int(step), int(flags)


def _codec(
    method: str, options: dict[str, Any], servers: int, rank: int
) -> tuple[DoubleSqueezeConfig, PartCodec]:
    cfg = make_config(method, **options)
    assert isinstance(cfg, DoubleSqueezeConfig)
    compressor = cfg.make_compressor()
    check_pairing(compressor, method)
    if not compressor.caps.shared_randomness:
        compressor.reseed(compressor.seed * 1_000_003 + rank)  # independent rounding noise per process
    return cfg, PartCodec(compressor, servers)


class PSWorker:
    """The worker side: ``ps.step()`` after ``loss.backward()``.

    Synchronous: the gradients are replaced by the servers' aggregate ``C(v)``; run the optimizer after.
    Asynchronous: the servers run the optimizer; ``step()`` applies the servers' update to the parameters
    (no optimizer on the worker). ``close()`` at the end (the servers return once every worker has closed).
    """

    def __init__(
        self,
        model: nn.Module,
        method: str = SYNC,
        *,
        servers: int = 1,
        lr: float | None = None,
        momentum: float = 0.0,
        timeout: float = 300.0,
        **options: Any,
    ) -> None:
        if method not in (SYNC, ASYNC):
            raise ValueError(f"method={method!r} is invalid: it must be {SYNC!r} or {ASYNC!r}")
        options = {**options, "servers": servers}
        if method == SYNC:
            options["placement"] = "server"
        self.asynchronous = method == ASYNC
        if self.asynchronous and lr is None:
            raise ValueError("doublesqueeze-async runs the optimizer on the servers: give lr (and momentum)")
        world, self.rank = dist.get_world_size(), dist.get_rank()
        self.servers = server_ranks(world, servers)
        self.workers = world - servers
        if self.rank >= self.workers:
            raise ValueError(
                f"rank {self.rank} is a server rank (the last {servers} of {world}): call serve()"
            )
        self.cfg, self.codec = _codec(method, options, servers, self.rank)
        self.timeout = timeout
        self.params = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
        self.names = [name for name, _ in self.params]
        self.numels = tuple(p.numel() for _, p in self.params)
        self.widths = [self.codec.layout(self.numels, s).nbytes for s in range(servers)]
        self.comm = Comm()
        self.ef = ErrorFeedback()
        self.velocity = Velocity(self.cfg.momentum_correction)
        self.step_count = 0
        self.wait_s = 0.0
        self.server_stats: list[dict[str, Any]] = []
        if self.rank == 0:
            for s, dst in enumerate(self.servers):
                setup = _Setup(
                    method, self.cfg.to_dict(), self.names, list(self.numels), self.workers, timeout
                )
                if self.asynchronous:
                    setup.lr, setup.momentum = float(lr or 0.0), momentum
                    flats = [p.detach().reshape(-1).float().cpu() for _, p in self.params]
                    setup.initial = [self.codec.part_of(f, s).clone() for f in flats]
                dist.send_object_list([setup], dst=dst)

    @property
    def stats(self) -> Any:
        return self.comm.stats

    def state_dict(self) -> dict[str, Any]:
        """The worker's residuals and velocity (keyed by parameter name), compressor RNG and step."""
        return {
            "step": self.step_count,
            "residuals": self.ef.state_dict(),
            "velocity": self.velocity.state_dict(),
            "compressor": self.codec.compressor.state_dict(),
        }

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        self.step_count = int(sd["step"])
        self.ef.load_state_dict(sd["residuals"])
        self.velocity.load_state_dict(sd["velocity"])
        self.codec.compressor.load_state_dict(sd["compressor"])

    def _wait(self, works: list[tuple[int, Any]]) -> None:
        start = time.perf_counter()
        for s, work in works:
            rank = self.servers[s]
            try:
                work.wait(timedelta(seconds=self.timeout))
            except RuntimeError as err:
                raise ServerError(
                    f"parameter server {s} (rank {rank}) died or did not answer within {self.timeout:g}s: "
                    f"{_first_line(err)}",
                    rank,
                ) from None
        self.wait_s += time.perf_counter() - start

    def _tags(self) -> tuple[str, str]:
        # Async replies are per worker, so their random streams are too (random-k redraws the indices).
        return (f"/from{self.rank}", f"/to{self.rank}") if self.asynchronous else ("", "/server")

    def step(self) -> None:
        push_tag, reply_tag = self._tags()
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for _, p in self.params]
        pushes = self.codec.compress_worker(
            self.ef, self.velocity, [g.detach() for g in grads], self.names, push_tag, self.step_count
        )
        works, replies = [], []
        for (s, dst), payloads in zip(enumerate(self.servers), pushes, strict=True):
            msg = _frame(self.step_count, 0, self.widths[s], self.codec, payloads, self.numels, s)
            works.append((s, self.comm.isend(msg, dst)))
            reply = torch.empty(HEADER_BYTES + self.widths[s], dtype=torch.uint8)
            works.append((s, self.comm.irecv(reply, dst)))
            replies.append(reply)
        self._wait(works)
        self.comm.stats.bytes_uncompressed += sum(4 * n for n in self.numels)  # what plain fp32 would send
        self.comm.stats.steps += 1
        for s, reply in enumerate(replies):
            parts = self.codec.decode(
                reply[HEADER_BYTES:], self.numels, self.names, s, reply_tag, self.step_count
            )
            for (_, p), g, part in zip(self.params, grads, parts, strict=True):
                a, b = part_bounds(p.numel(), len(self.servers))[s]
                with torch.no_grad():
                    if self.asynchronous:  # the servers' update of this worker's model
                        p.view(-1)[a:b].add_(part.to(p.dtype))
                    else:  # the aggregated gradient C(v)
                        g.view(-1)[a:b].copy_(part)
        if not self.asynchronous:
            for (_, p), g in zip(self.params, grads, strict=True):
                p.grad = g
        self.step_count += 1

    def close(self) -> list[dict[str, Any]]:
        """Tell the servers this worker is done. Asynchronous: load the servers' final (authoritative) model.
        Returns every server's statistics on rank 0, an empty list elsewhere."""
        works = []
        for s, dst in enumerate(self.servers):
            works.append((s, self.comm.isend(_frame(self.step_count, STOP, self.widths[s]), dst)))
        self._wait(works)
        if self.asynchronous:
            for s, src in enumerate(self.servers):
                sizes = [b - a for a, b in (part_bounds(n, len(self.servers))[s] for n in self.numels)]
                final = torch.empty(sum(sizes))
                self._wait([(s, dist.irecv(final, src))])
                with torch.no_grad():
                    for (_, p), part in zip(self.params, final.split(sizes), strict=True):
                        a, b = part_bounds(p.numel(), len(self.servers))[s]
                        p.view(-1)[a:b].copy_(part.to(p.dtype))
        if self.rank == 0:
            for src in self.servers:
                box: list[Any] = [None]
                dist.recv_object_list(box, src=src)
                self.server_stats.append(box[0])
        return self.server_stats


def serve() -> dict[str, Any]:
    """Run this process as a parameter server until every worker has closed; returns its statistics.

    Everything it needs (method, options, tensor sizes) comes from worker 0."""
    box: list[Any] = [None]
    dist.recv_object_list(box, src=0)
    setup: _Setup = box[0]
    world, rank = dist.get_world_size(), dist.get_rank()
    servers = world - setup.workers
    part = rank - setup.workers
    _, codec = _codec(setup.method, setup.options, servers, rank)
    cfg = make_config(setup.method, **setup.options)
    assert isinstance(cfg, DoubleSqueezeConfig)
    server = (_AsyncServer if setup.method == ASYNC else _SyncServer)(setup, codec, part, cfg)
    stats = server.run()
    stats.update(server=part, rank=rank, **server.comm.stats.to_dict())
    dist.send_object_list([stats], dst=0)
    return {**stats, "state": server.state_dict()}


class _Server:
    def __init__(self, setup: _Setup, codec: PartCodec, part: int, cfg: DoubleSqueezeConfig) -> None:
        self.setup, self.codec, self.part = setup, codec, part
        self.numels = tuple(setup.numels)
        self.names = setup.names
        self.sizes = [b - a for a, b in (part_bounds(n, codec.parts)[part] for n in self.numels)]
        self.width = codec.layout(self.numels, part).nbytes
        self.comm = Comm()
        self.ef = ErrorFeedback() if cfg.server_error_feedback else None
        self.timeout = timedelta(seconds=setup.timeout)

    def _recv(self, worker: int) -> tuple[torch.Tensor, Any]:
        buf = torch.empty(HEADER_BYTES + self.width, dtype=torch.uint8)
        return buf, self.comm.irecv(buf, worker)

    def _wait(self, worker: int, work: Any) -> None:
        try:
            work.wait(self.timeout)
        except RuntimeError as err:
            raise WorkerLost(f"server {self.part} lost worker rank {worker}: {_first_line(err)}") from None

    def run(self) -> dict[str, Any]:
        raise NotImplementedError

    def state_dict(self) -> dict[str, Any]:
        """The server's residuals of its part, keyed by tensor name (empty without server error feedback)."""
        return {"residuals": self.ef.state_dict() if self.ef is not None else {}}


class _SyncServer(_Server):
    def run(self) -> dict[str, Any]:
        workers, step = self.setup.workers, 0
        while True:
            pending = [self._recv(i) for i in range(workers)]
            for i, (_, work) in enumerate(pending):
                self._wait(i, work)
            flags = [_header(buf)[1] for buf, _ in pending]
            if any(f & STOP for f in flags):
                if not all(f & STOP for f in flags):
                    late = [i for i, f in enumerate(flags) if not f & STOP]
                    raise WorkerLost(
                        f"server {self.part}: workers {late} sent step {step} after others closed"
                    )
                self.comm.stats.steps = step
                return {}
            rows = torch.stack([buf[HEADER_BYTES:] for buf, _ in pending])
            received = self.codec.aggregate(rows, self.numels, self.names, self.part, "", step)
            payloads = server_step(self.codec, self.ef, received, self.names, self.part, step)
            reply = _frame(step, 0, self.width, self.codec, payloads, self.numels, self.part)
            sends = [self.comm.isend(reply, i) for i in range(workers)]
            for i, work in enumerate(sends):
                self._wait(i, work)
            step += 1


class _AsyncServer(_Server):
    def __init__(self, setup: _Setup, codec: PartCodec, part: int, cfg: DoubleSqueezeConfig) -> None:
        super().__init__(setup, codec, part, cfg)
        self.max_staleness = int(getattr(cfg, "max_staleness", 0))
        self.x = [t.clone() for t in setup.initial]  # the authoritative model (this server's part)
        self.velocity = [torch.zeros_like(t) for t in self.x]
        # x^_i: what worker i holds of this part (every worker starts from worker 0's model).
        self.held = [[t.clone() for t in self.x] for _ in range(setup.workers)]
        self.version = 0  # pushes applied
        self.seen = [0] * setup.workers  # the version each worker's model was brought to by its last reply

    def state_dict(self) -> dict[str, Any]:
        # Asynchronous: the authoritative model, its velocity, and each worker's copy (the residuals).
        return {
            "x": [t.clone() for t in self.x],
            "velocity": [t.clone() for t in self.velocity],
            "held": [[t.clone() for t in h] for h in self.held],
            "version": self.version,
        }

    def _apply(self, worker: int, buf: torch.Tensor, clock: int) -> int:
        """Apply worker ``worker``'s push at once; returns its staleness (updates it did not see)."""
        grads = self.codec.decode(
            buf[HEADER_BYTES:], self.numels, self.names, self.part, f"/from{worker}", clock
        )
        # n pushes take the place of one synchronous step's mean of n gradients: each applies 1/n of it, so the
        # run's learning rate means the same in both variants.
        lr, m = self.setup.lr / self.setup.workers, self.setup.momentum
        for x, u, g in zip(self.x, self.velocity, grads, strict=True):
            u.mul_(m).add_(g)
            x.sub_(u, alpha=lr)
        staleness = self.version - self.seen[worker]
        self.version += 1
        return staleness

    def _reply(self, worker: int, clock: int) -> Any:
        """Send worker ``worker`` the compressed change of its model, keeping what compression left out."""
        deltas = [x - h for x, h in zip(self.x, self.held[worker], strict=True)]
        residual = self.ef is not None
        payloads = self.codec.compress(
            deltas, self.names, self.part, f"/to{worker}", clock, residual=residual
        )
        for x, h, d in zip(self.x, self.held[worker], deltas, strict=True):
            # With error compensation the worker now holds x - (what was left out); without, the server
            # forgets the loss and treats the worker as up to date.
            h.copy_(x - d if residual else x)
        self.seen[worker] = self.version
        return self.comm.isend(
            _frame(clock, 0, self.width, self.codec, payloads, self.numels, self.part), worker
        )

    def run(self) -> dict[str, Any]:
        n = self.setup.workers
        clocks = [0] * n
        active = set(range(n))
        waiting: set[int] = set()
        staleness: collections.Counter[int] = collections.Counter()
        max_lead = 0
        buf = torch.empty(HEADER_BYTES + self.width, dtype=torch.uint8)
        while active:
            # Pushes are handled in the order they arrive, from whichever worker (a receive from any source:
            # every worker's message to this server has the same size).
            self.comm.stats.bytes_received += buf.nbytes
            work = dist.irecv(buf)
            assert work is not None
            try:
                work.wait(self.timeout)
            except RuntimeError as err:
                raise WorkerLost(
                    f"server {self.part}: no push from workers {sorted(active)} within "
                    f"{self.timeout.total_seconds():g}s, or one of them died: {_first_line(err)}"
                ) from None
            i = int(work._source_rank())
            clock, flags = _header(buf)
            if flags & STOP:
                active.discard(i)
            else:
                staleness[self._apply(i, buf, clock)] += 1
                clocks[i] = clock + 1
                waiting.add(i)
            for j in sorted(waiting):
                slowest = min((clocks[k] for k in active), default=clocks[j])
                # Stale synchronous parallel: reply (and so let the worker go on) unless it is too far ahead.
                if clocks[j] - slowest <= self.max_staleness:
                    max_lead = max(max_lead, clocks[j] - slowest)
                    self._wait(j, self._reply(j, clocks[j] - 1))
                    waiting.discard(j)
        final = torch.cat(self.x) if self.x else torch.zeros(0)
        for i in range(n):  # every worker ends with the authoritative model
            self._wait(i, dist.isend(final, i))
        self.comm.stats.steps = self.version
        return {
            "pushes": self.version,
            "staleness": dict(sorted(staleness.items())),
            "max_lead": max_lead,
            "max_staleness": self.max_staleness,
        }
