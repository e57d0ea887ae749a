"""Uncompressed all-reduce: the S-SGD baseline (``ssgd``) and its half-precision wire format (``fp16``)."""

from __future__ import annotations

import torch
from torch.futures import Future

from gradzip.reducers.reducer import Bucket, Reducer


class PlainAllReduce(Reducer):
    def start(self, bucket: Bucket) -> Future[torch.Tensor]:
        return self.uncompressed(bucket)


class HalfAllReduce(Reducer):
    def start(self, bucket: Bucket) -> Future[torch.Tensor]:
        # Divide before the cast so the fp16 sum cannot overflow where the fp32 mean would not.
        half = bucket.buffer.div(self.comm.world).to(torch.float16)
        buf = bucket.buffer
        return self.defer(bucket, self.comm.all_reduce(half), buf.copy_)
