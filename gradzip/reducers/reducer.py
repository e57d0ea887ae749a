"""A reducer turns one bucket of local gradients into the aggregated gradient, asynchronously.

It is the unit the DDP hook adapter drives, one call per bucket per step, in the same bucket order on every
worker. Its state (residuals, factors, step, RNG) is keyed by parameter names so it survives DDP's bucket
rebuild and a restart.

Every method's ``start`` has the same shape: it issues the bucket's first collective at once, so the
communication overlaps the rest of backward, and hands the rest to :meth:`Reducer.defer`. When the step's last
bucket arrives, each pending bucket's second round (where the method has one: PowerSGD's Q, DoubleSqueeze's
server pass) is issued in bucket order, and then every bucket is finished (decompressed) in bucket order, all
from this thread:

* Collective order. torch's ``powerSGD_hook`` issues its second round from the first one's completion
  callback; workers then interleave the rounds of different buckets in different orders, and gloo fails with
  a size mismatch once DDP has more than one bucket.
* Decompression runs here, not in a callback. torch sets MKL's thread count per thread, and on the
  communication library's thread MKL picks its own, which changes GEMM rounding from worker to worker and
  lets the replicas drift apart (seen: 3e-8 after 100 steps of ACP-SGD).

Non-finite gradients (:mod:`gradzip.comm.finite`): :meth:`Reducer.launch` screens each bucket before the
method sees it, and a poisoned bucket goes out as zeros. Before the step's second rounds and finishes, one
small all-reduce tells every worker whether any saw a NaN or an Inf. If one did, no second round is issued and
nothing is finished: under ``skip`` the residuals and velocity the step staged are dropped and the generators
it drew from rewound, so the method's state is exactly what it was before the step (``step_skipped``); under
``raise`` every worker raises. Everything a method changes in its state before that point is staged
(:class:`~gradzip.compress.feedback.Staged`, listed by ``staged_state()``); what it changes after it (factors,
server residuals) it changes only in a step that goes ahead.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch.futures import Future

from gradzip.comm.collectives import Comm
from gradzip.comm.finite import NonFiniteGradient, check_nan_policy, first_nonfinite, flagged, nonfinite
from gradzip.compress.feedback import Staged, StepChanges
from gradzip.compress.fusion import views_of


@dataclass
class Bucket:
    """A fused group of gradients; ``grads`` are views of ``buffer``, and results are written into them."""

    buffer: torch.Tensor
    grads: list[torch.Tensor]
    keys: list[str]
    is_last: bool = True
    index: int = 0

    @classmethod
    def of(cls, tensors: list[torch.Tensor], keys: list[str], is_last: bool = True) -> Bucket:
        """A bucket holding copies of ``tensors`` (for use outside DDP: tests, optimizer wrappers)."""
        buffer = torch.cat([t.reshape(-1) for t in tensors]) if tensors else torch.zeros(0)
        return cls(buffer, views_of(buffer, [t.shape for t in tensors]), keys, is_last)


Finish = Callable[[Any], object]
"""Writes a bucket's result into its gradients, given its last collective's result."""
SecondRound = Callable[[torch.Tensor], "Future[torch.Tensor] | None"]
"""Issues a bucket's second collective, given its first one's result (None: nothing left to send)."""


def new_future(like: torch.Tensor) -> Future[torch.Tensor]:
    """A future this process completes itself; on CUDA it carries the device so streams are synchronised."""
    return Future(devices=[like.device]) if like.is_cuda else Future()


def _nothing(result: Any) -> None:
    return None


@dataclass
class _Pending:
    bucket: Bucket
    first: Future[torch.Tensor]
    finish: Finish
    second: SecondRound | None
    out: Future[torch.Tensor]
    last: Future[torch.Tensor] | None = None


class Reducer:
    """Base: step counting, traffic accounting, the deferred completion of a step's buckets, and the plain
    all-reduce every method falls back to."""

    def __init__(self, comm: Comm) -> None:
        self.comm = comm
        self.step = 0
        """Steps done (skipped ones not counted): the method's phase and its random streams follow it."""
        self._plans: dict[tuple[str, ...], Any] = {}
        self.wait_s = 0.0  # seconds this worker spent blocked on collectives (the benchmark's "comm wait")
        self._pending: list[_Pending] = []
        self.nan_policy = "off"
        """What a non-finite gradient does (:mod:`gradzip.comm.finite`); set it with ``use_nan_policy``."""
        self.skipped_steps = 0
        self.step_skipped = False
        """Whether the last step was skipped (``nan_policy="skip"``): its gradients are zeros, and the
        optimizer step must be skipped too."""
        self._bad: torch.Tensor | bool = False  # this step: did this worker see a non-finite gradient?
        self._where: str | None = None
        self._changes = StepChanges([], [])

    def use_nan_policy(self, policy: str) -> Reducer:
        """``skip``, ``raise`` or ``off`` (:mod:`gradzip.comm.finite`); between steps only."""
        self.nan_policy = check_nan_policy(policy)
        for s in self.staged_state():
            s.staged = policy == "skip"
        return self

    def staged_state(self) -> list[Staged]:
        """The state a step changes before the workers agree it goes ahead (residuals, velocity)."""
        return []

    def generators(self) -> list[torch.Generator]:
        """The generators a step may draw from before the workers agree it goes ahead."""
        return []

    def launch(self, bucket: Bucket) -> Future[torch.Tensor]:
        """Reduce one bucket (the hook's entry): screen it for NaN and Inf, then start the method on it."""
        if not self._pending:  # the step's first bucket
            self._bad, self._where, self.step_skipped = False, None, False
            changes = StepChanges(self.staged_state(), self.generators())
            self._changes = changes.begin(undoable=self.nan_policy == "skip")
        if self.nan_policy != "off" and not self.screens_itself(bucket):
            self._screen(bucket)
        return self.start(bucket)

    def screens_itself(self, bucket: Bucket) -> bool:
        """Whether ``start`` screens ``bucket`` for NaN and Inf itself, with a check folded into its own passes,
        instead of ``launch`` reading the whole bucket first. It must then report what it finds
        (``found_nonfinite``) and send zeros in place of anything non-finite."""
        return False

    def found_nonfinite(self, where: str | None) -> None:
        """A method's own screen found a NaN or an Inf in this step's gradients (``where``: the parameter)."""
        self._where = self._where or where
        self._bad = True

    def start(self, bucket: Bucket) -> Future[torch.Tensor]:
        """The method's work on one bucket: issue its first collective, then ``defer`` the rest."""
        raise NotImplementedError

    def _screen(self, bucket: Bucket) -> None:
        """Whether this bucket holds a NaN or an Inf; if so it goes out as zeros. On CUDA the check stays on
        the device (a synchronisation per bucket would stall backward); the step's agreement reads it."""
        buf = bucket.buffer
        bad = nonfinite(buf)
        if buf.is_cuda:
            buf.masked_fill_(bad, 0.0)
            self._bad = bad if isinstance(self._bad, bool) else self._bad | bad
        elif bool(bad):
            self.found_nonfinite(first_nonfinite(bucket.grads, bucket.keys))
            buf.zero_()

    def compressing(self) -> bool:
        """Whether this step compresses (False: a warm-up step of plain all-reduce)."""
        return True

    def plan(self, bucket: Bucket, make: Callable[[Bucket], Any]) -> Any:
        """Per-bucket decisions (what to compress, message layout), computed once per bucket layout."""
        key = tuple(bucket.keys)
        plan = self._plans.get(key)
        if plan is None:
            plan = self._plans[key] = make(bucket)
        return plan

    def defer(
        self,
        bucket: Bucket,
        first: Future[torch.Tensor],
        finish: Finish,
        second: SecondRound | None = None,
    ) -> Future[torch.Tensor]:
        """The bucket's future, completed once the step's last bucket has been launched (see the module's
        docstring): ``second(first's result)`` issues its second round, if any, then ``finish`` gets the result
        of its last collective. Ends the bucket's part of the step."""
        self.comm.stats.bytes_uncompressed += bucket.buffer.nbytes  # what a plain all-reduce would send
        out = new_future(bucket.buffer)
        self._pending.append(_Pending(bucket, first, finish, second, out))
        if bucket.is_last:
            poisoned = []
            if self.nan_policy != "off":
                poisoned = flagged(self.wait(self.comm.vote_nonfinite(self._bad, bucket.buffer.device)))
            if poisoned:
                self._drop_step(poisoned)
            else:
                self._complete_step()
                self._changes.keep()
                self.step += 1
                self.comm.stats.steps += 1
        return out

    def _drop_step(self, poisoned: list[int]) -> None:
        """Some worker saw a non-finite gradient: no second round, no finish; skip or raise, every worker."""
        pending, self._pending = self._pending, []
        for p in pending:  # the first rounds are in flight on every worker: let them land before reusing
            self.wait(p.first)
        if self.nan_policy == "raise":
            where = self._where if self.comm.rank in poisoned else None
            raise NonFiniteGradient(poisoned, self.step + self.skipped_steps, where)
        self._changes.undo()
        self.skipped_steps += 1
        self.step_skipped = True
        for p in pending:
            p.bucket.buffer.zero_()
            p.out.set_result(p.bucket.buffer)

    def _complete_step(self) -> None:
        pending, self._pending = self._pending, []
        for p in pending:  # second rounds, in bucket order
            if p.second is not None:
                p.last = p.second(self.wait(p.first))
        for p in pending:
            fut = p.last if p.second is not None else p.first
            p.finish(None if fut is None else self.wait(fut))
            p.out.set_result(p.bucket.buffer)

    def wait(self, fut: Future[torch.Tensor]) -> torch.Tensor:
        """The collective's result, counting the time spent blocked on it."""
        start = time.perf_counter()
        value = fut.wait()
        self.wait_s += time.perf_counter() - start
        return value

    def abort_step(self) -> None:
        """Drop the buckets of a step that failed part-way (the error propagates to the caller): left behind,
        they would be completed (and second rounds issued) on this worker alone at the next step, out of order
        with the others. What the step staged is dropped with them."""
        self._pending = []
        if self.nan_policy == "skip":
            self._changes.undo()

    def uncompressed(self, bucket: Bucket) -> Future[torch.Tensor]:
        """This bucket's whole step as a plain all-reduce (ssgd, and the low-rank methods' warm-up);
        completed in this thread like every method, so its wait is measured the same way."""
        buf = bucket.buffer
        buf.div_(self.comm.world)
        return self.defer(bucket, self.comm.all_reduce(buf), _nothing)

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step, "skipped": self.skipped_steps}

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        self.step = int(sd["step"])
        self.skipped_steps = int(sd.get("skipped", 0))
