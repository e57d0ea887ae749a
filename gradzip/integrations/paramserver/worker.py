"""The worker side of the parameter-server placements: ``ps.step()`` after ``loss.backward()``."""

from __future__ import annotations

import time
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from gradzip.comm import wire
from gradzip.comm.collectives import Comm, CommStats
from gradzip.comm.finite import NonFiniteGradient, any_nonfinite, check_nan_policy, first_nonfinite
from gradzip.compress.feedback import ErrorFeedback, StepChanges, Velocity
from gradzip.config import DoubleSqueezeConfig
from gradzip.integrations.paramserver.placement import ASYNC, SYNC, Setup, server_ranks
from gradzip.reducers.doublesqueeze import make_codec
from gradzip.reducers.parts import part_bounds
from gradzip.registry import make_config


class PSWorker:
    """The worker side: ``ps.step()`` after ``loss.backward()``.

    Synchronous: the gradients are replaced by the servers' aggregate ``C(v)``; run the optimizer after.
    Asynchronous: the servers run the optimizer; ``step()`` applies the servers' update to the parameters
    (no optimizer on the worker). ``close()`` at the end (the servers return once every worker has closed).

    ``nan_policy`` (:mod:`gradzip.comm.finite`): a worker whose gradient holds a NaN or an Inf pushes zeros
    flagged ``NONFINITE`` instead; the synchronous servers then skip the step for every worker (``step()``
    returns False, the gradients are zeros, and worker and server residuals stay as they were), the
    asynchronous ones drop that push; under ``raise`` every worker (and server) raises
    :class:`~gradzip.comm.finite.NonFiniteGradient`.

    State: ``state_dict()`` is this worker's; the servers' comes to worker 0 at a step that every worker
    announced with ``collect_server_states()`` (``server_states`` after that step), and goes back to the
    servers through ``server_states=`` when a resumed run builds worker 0's ``PSWorker``.
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
        server_states: list[dict[str, Any]] | None = None,
        nan_policy: str = "skip",
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
        cfg = make_config(method, **options)
        assert isinstance(cfg, DoubleSqueezeConfig)
        self.cfg = cfg
        self.codec = make_codec(cfg, servers, self.rank, method)
        self.timeout = timeout
        self.params = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
        self.names = [name for name, _ in self.params]
        self.numels = tuple(p.numel() for _, p in self.params)
        self.widths = [self.codec.layout(self.numels, s).nbytes for s in range(servers)]
        self.comm = Comm()
        self.nan_policy = check_nan_policy(nan_policy)
        # Staged: a step the servers skip leaves the residuals and velocity as they were (comm.finite).
        self.ef = ErrorFeedback(staged=nan_policy == "skip")
        self.velocity = Velocity(cfg.momentum_correction, staged=nan_policy == "skip")
        self.step_count = 0
        """Steps done (skipped ones not counted; the asynchronous variant counts every push)."""
        self.skipped_steps = 0
        self.step_skipped = False
        self.wait_s = 0.0
        self.server_stats: list[dict[str, Any]] = []
        self.server_states: list[dict[str, Any]] | None = None
        """Worker 0: every server's state after the last step announced by ``collect_server_states()``."""
        self._collect = False
        if server_states is not None and len(server_states) != servers:
            raise ValueError(f"server_states holds {len(server_states)} states for {servers} servers")
        if self.rank == 0:
            for s, dst in enumerate(self.servers):
                setup = Setup(method, cfg.to_dict(), self.names, list(self.numels), self.workers, timeout)
                setup.nan_policy = nan_policy
                setup.state = server_states[s] if server_states is not None else None
                if self.asynchronous:
                    setup.lr, setup.momentum = float(lr or 0.0), momentum
                    flats = [p.detach().reshape(-1).float().cpu() for _, p in self.params]
                    setup.initial = [self.codec.part_of(f, s).clone() for f in flats]
                dist.send_object_list([setup], dst=dst)

    @property
    def stats(self) -> CommStats:
        return self.comm.stats

    def state_dict(self) -> dict[str, Any]:
        """The worker's residuals and velocity (keyed by parameter name), compressor RNG, step and traffic."""
        return {
            "step": self.step_count,
            "skipped": self.skipped_steps,
            "residuals": self.ef.state_dict(),
            "velocity": self.velocity.state_dict(),
            "compressor": self.codec.compressor.state_dict(),
            "stats": self.stats.to_dict(),
        }

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        self.step_count = int(sd["step"])
        self.skipped_steps = int(sd.get("skipped", 0))
        self.ef.load_state_dict(sd["residuals"])
        self.velocity.load_state_dict(sd["velocity"])
        self.codec.compressor.load_state_dict(sd["compressor"])
        for k, v in sd.get("stats", {}).items():
            setattr(self.stats, k, int(v))

    def collect_server_states(self) -> None:
        """Ask every server for its state after the next step (every worker calls it before the same step;
        worker 0 then finds the states in ``server_states``). The asynchronous servers make that step a
        barrier: no worker gets its reply before every worker has pushed it, so the state they hand over
        agrees with every worker's own after it."""
        self._collect = True

    def _wait(self, works: list[tuple[int, Any]]) -> None:
        start = time.perf_counter()
        for s, work in works:
            wire.wait_for_server(work, s, self.servers[s], self.timeout)
        self.wait_s += time.perf_counter() - start

    def _tags(self) -> tuple[str, str]:
        # Async replies are per worker, so their random streams are too (random-k redraws the indices).
        return (f"/from{self.rank}", f"/to{self.rank}") if self.asynchronous else ("", "/server")

    def step(self) -> bool:
        """Push this step's gradients and apply the servers' reply. Returns False when the step was skipped
        (a NaN or Inf in some worker's gradient, ``nan_policy="skip"``): run the optimizer only when True."""
        push_tag, reply_tag = self._tags()
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for _, p in self.params]
        flags = wire.CHECKPOINT if self._collect else 0
        bad = self.nan_policy != "off" and bool(any_nonfinite(grads))
        where = first_nonfinite(grads, self.names) if bad else None
        changes = StepChanges([self.ef, self.velocity], [self.codec.compressor.generator])
        changes.begin(undoable=self.nan_policy == "skip")
        if not bad:
            pushes = self.codec.compress_worker(
                self.ef, self.velocity, [g.detach() for g in grads], self.names, push_tag, self.step_count
            )
        else:  # nothing of it enters a residual or the wire: the push is zeros, flagged
            flags |= wire.NONFINITE
            pushes = None
        works, replies = [], []
        for s, dst in enumerate(self.servers):
            msg = wire.message(self.widths[s], self.step_count, flags)
            if pushes is not None:
                self.codec.pack(pushes[s], self.numels, s, wire.payload(msg))
            works.append((s, self.comm.isend(msg, dst)))
            reply = wire.message(self.widths[s])
            works.append((s, self.comm.irecv(reply, dst)))
            replies.append(reply)
        self._wait(works)
        self.comm.stats.bytes_uncompressed += sum(4 * n for n in self.numels)  # what plain fp32 would send
        skipped = bool(wire.header(replies[0])[1] & wire.NONFINITE)
        if skipped:
            first, count = wire.poisoned(replies[0])
            if self.nan_policy == "raise":
                # The step as the loop counts it: the asynchronous step count already holds the skipped ones.
                step = self.step_count + (0 if self.asynchronous else self.skipped_steps)
                raise NonFiniteGradient([first], step, where if first == self.rank else None, count - 1)
            changes.undo()
        else:
            changes.keep()
            self.comm.stats.steps += 1
        if not skipped or self.asynchronous:  # an asynchronous reply carries the others' updates all the same
            self._apply(replies, grads, reply_tag)
        if not self.asynchronous:
            for (_, p), g in zip(self.params, grads, strict=True):
                p.grad = g.zero_() if skipped else g
        if self._collect:
            self._collect = False
            if self.rank == 0:  # each server sends its state right after its replies
                self.server_states = [self._receive_object(s) for s in range(len(self.servers))]
        self.step_skipped = skipped
        if skipped:
            self.skipped_steps += 1
        if not skipped or self.asynchronous:  # the asynchronous servers count every push
            self.step_count += 1
        return not skipped

    def _apply(self, replies: list[torch.Tensor], grads: list[torch.Tensor], reply_tag: str) -> None:
        for s, reply in enumerate(replies):
            parts = self.codec.decode(
                wire.payload(reply), self.numels, self.names, s, reply_tag, self.step_count
            )
            for (_, p), g, part in zip(self.params, grads, parts, strict=True):
                a, b = part_bounds(p.numel(), len(self.servers))[s]
                with torch.no_grad():
                    if self.asynchronous:  # the servers' update of this worker's model
                        p.view(-1)[a:b].add_(part.to(p.dtype))
                    else:  # the aggregated gradient C(v)
                        g.view(-1)[a:b].copy_(part)

    def _receive_object(self, s: int) -> Any:
        box: list[Any] = [None]
        start = time.perf_counter()
        dist.recv_object_list(box, src=self.servers[s])
        self.wait_s += time.perf_counter() - start
        return box[0]

    def close(self) -> list[dict[str, Any]]:
        """Tell the servers this worker is done. Asynchronous: load the servers' final (authoritative) model.
        Returns every server's statistics on rank 0, an empty list elsewhere."""
        works = []
        for s, dst in enumerate(self.servers):
            works.append((s, self.comm.isend(wire.message(self.widths[s], self.step_count, wire.STOP), dst)))
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
