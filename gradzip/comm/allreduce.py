"""Uncompressed all-reduce: the S-SGD baseline (``ssgd``) and its half-precision wire format (``fp16``)."""

from __future__ import annotations

import torch
from torch.futures import Future

from gradzip.reducer import Bucket, Reducer


class PlainAllReduce(Reducer):
    def launch(self, bucket: Bucket) -> Future[torch.Tensor]:
        self.begin(bucket)
        return self.uncompressed(bucket)


class HalfAllReduce(Reducer):
    def launch(self, bucket: Bucket) -> Future[torch.Tensor]:
        self.begin(bucket)
        # Divide before the cast so the fp16 sum cannot overflow where the fp32 mean would not.
        half = bucket.buffer.div(self.comm.world).to(torch.float16)
        buf = bucket.buffer

        def finish(result: torch.Tensor) -> torch.Tensor:
            return buf.copy_(result)

        fut = self.deferred(bucket, self.comm.all_reduce(half), finish)
        self.end(bucket)
        return fut
