"""A reducer turns one bucket of local gradients into the aggregated gradient, asynchronously.

It is the unit the DDP hook adapter drives, one call per bucket per step, in the same bucket order on every
worker. Its state (residuals, factors, step, RNG) is keyed by parameter names so it survives DDP's bucket
rebuild and a restart.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch.futures import Future

from gradzip.comm.collectives import Comm
from gradzip.fusion import flat_offsets


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


def _same(t: torch.Tensor) -> torch.Tensor:
    return t


def new_future(like: torch.Tensor) -> Future[torch.Tensor]:
    """A future this process completes itself; on CUDA it carries the device so streams are synchronised."""
    return Future(devices=[like.device]) if like.is_cuda else Future()


def views_of(buffer: torch.Tensor, shapes: list[torch.Size]) -> list[torch.Tensor]:
    offs = flat_offsets([s.numel() for s in shapes])
    return [buffer[a:b].view(s) for a, b, s in zip(offs, offs[1:], shapes, strict=False)]


def split_message(msg: torch.Tensor, sizes: list[int]) -> list[torch.Tensor]:
    offs = flat_offsets(sizes)
    return [msg[a:b] for a, b in zip(offs, offs[1:], strict=False)]


class Reducer:
    """Base: step counting, traffic accounting, and the plain all-reduce every method falls back to."""

    def __init__(self, comm: Comm) -> None:
        self.comm = comm
        self.step = 0
        self._plans: dict[tuple[str, ...], Any] = {}
        self.wait_s = 0.0  # seconds this worker spent blocked on collectives (the benchmark's "comm wait")
        self._deferred: list[
            tuple[Future[torch.Tensor], Callable[[torch.Tensor], torch.Tensor], Future[Any]]
        ] = []

    def launch(self, bucket: Bucket) -> Future[torch.Tensor]:
        raise NotImplementedError

    def plan(self, bucket: Bucket, make: Callable[[Bucket], Any]) -> Any:
        """Per-bucket decisions (what to compress, message layout), computed once per bucket layout."""
        key = tuple(bucket.keys)
        plan = self._plans.get(key)
        if plan is None:
            plan = self._plans[key] = make(bucket)
        return plan

    def begin(self, bucket: Bucket) -> None:
        self.comm.stats.bytes_uncompressed += bucket.buffer.nbytes

    def end(self, bucket: Bucket) -> None:
        if bucket.is_last:
            self.step += 1
            self.comm.stats.steps += 1

    def deferred(
        self, bucket: Bucket, sent: Future[torch.Tensor], finish: Callable[[torch.Tensor], torch.Tensor]
    ) -> Future[torch.Tensor]:
        """Finish the bucket (``finish(collective's result)``) in this thread once the step's last bucket
        has been launched, rather than in the collective's completion callback.

        The collective itself still overlaps the rest of backward. Running the decompression here, not on the
        communication library's thread, keeps it under this thread's BLAS settings: torch sets MKL's thread
        count per thread, and on a callback thread MKL picks its own, which changes GEMM rounding from worker
        to worker and lets the replicas drift apart (seen: 3e-8 after 100 steps of ACP-SGD).
        """
        out: Future[torch.Tensor] = new_future(bucket.buffer)
        self._deferred.append((sent, finish, out))
        if bucket.is_last:
            for fut, fn, done in self._deferred:
                done.set_result(fn(self.wait(fut)))
            self._deferred = []
        return out

    def wait(self, fut: Future[torch.Tensor]) -> torch.Tensor:
        """The collective's result, counting the time spent blocked on it."""
        start = time.perf_counter()
        value = fut.wait()
        self.wait_s += time.perf_counter() - start
        return value

    def abort_step(self) -> None:
        """Drop the buckets of a step that failed part-way (the error propagates to the caller)."""
        self._deferred = []

    def uncompressed(self, bucket: Bucket) -> Future[torch.Tensor]:
        """This bucket's whole step as a plain all-reduce (ssgd, and the low-rank methods' warm-up);
        completed in this thread like every method, so its wait is measured the same way."""
        fut = self.deferred(bucket, self.all_reduce_mean(bucket), _same)
        self.end(bucket)
        return fut

    def all_reduce_mean(self, bucket: Bucket) -> Future[torch.Tensor]:
        """The uncompressed baseline: mean of the bucket over workers, written in place."""
        buf = bucket.buffer
        buf.div_(self.comm.world)
        return self.comm.all_reduce(buf)

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step}

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        self.step = int(sd["step"])


def is_matrix_worth_it(shape: torch.Size, payload_bytes: int, min_rate: float, itemsize: int = 4) -> bool:
    """1-D tensors always travel raw; a matrix only when compression saves at least ``min_rate``."""
    return len(shape) >= 2 and shape.numel() * itemsize >= min_rate * payload_bytes
