"""Element-wise compressors over DDP buckets (``signsgd``, ``topk``, ``randomk``, ``qsgd``): all-reduce when
payloads are summable, else all-gather.

Per bucket: compressible matrices are error-compensated and encoded; 1-D tensors and matrices that would not
compress by ``min_compression_rate`` travel raw. Summable payloads and raw tensors go out as ONE fused
all-reduce per bucket. Otherwise the compressed payloads are all-gathered in one fused message and the raw
tensors all-reduced in another: in an all-gather their traffic would grow with the worker count, in an
all-reduce it does not. The gathered payloads are decoded one worker at a time, straight into the gradients.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch.futures import Future

from gradzip.comm.collectives import Comm
from gradzip.comm.finite import first_nonfinite, nonfinite
from gradzip.compress.base import Compressor, check_pairing, is_matrix_worth_it
from gradzip.compress.feedback import ErrorFeedback, Staged, Velocity, encode_with_feedback
from gradzip.compress.fusion import ByteLayout, Segments, split_message
from gradzip.reducers.reducer import Bucket, Reducer, new_future

_HEAD = 8  # bytes of a bucket-form payload's head in the message: one float32, padded to the alignment


@dataclass
class _Plan:
    compressed: list[int]
    raw: list[int]
    sizes: list[int]  # float32 all-reduce segments: compressed payloads if summable, then raw tensors
    # Not summable: byte layout of the all-gathered compressed payloads, segment-major (every tensor's first
    # payload segment, then every tensor's second...): the bucket form's heads and bodies are then each one
    # contiguous range of the message, and the per-tensor form fills the same bytes.
    layout: ByteLayout | None
    segments: Segments | None = None  # the bucket form's padded layout, when it runs

    def payload_views(self, views: list[torch.Tensor], j: int) -> list[torch.Tensor]:
        """The segments of the ``j``-th compressed tensor's payload among the layout's ``views``."""
        return views[j :: len(self.compressed)]


def _all_of(
    a: Future[torch.Tensor] | None, b: Future[torch.Tensor] | None, like: torch.Tensor
) -> Future[Any]:
    """A future that completes when both collectives (either may be None) have."""
    if a is None or b is None:
        return a or b or _done(like)
    return torch.futures.collect_all([a, b])


def _copy_raw(bucket: Bucket, plan: _Plan, parts: list[torch.Tensor]) -> None:
    """The reduced raw tensors back into their gradients."""
    for part, i in zip(parts, plan.raw, strict=True):
        bucket.grads[i].copy_(part.view_as(bucket.grads[i]))


def _done(like: torch.Tensor) -> Future[torch.Tensor]:
    fut = new_future(like)
    fut.set_result(like)
    return fut


class ElementwiseReducer(Reducer):
    def __init__(
        self,
        compressor: Compressor,
        comm: Comm,
        min_rate: float,
        error_feedback: bool,
        momentum_correction: float = 0.0,
    ) -> None:
        super().__init__(comm)
        summable = compressor.caps.summable
        # Summable payloads fuse into a float32 all-reduce; the others are all-gathered, which needs a size
        # known in advance.
        pattern = "the all-reduce pattern" if summable else "the all-gather pattern"
        check_pairing(compressor, pattern, fixed_size=not summable, float32=summable)
        compressor.independent_per_rank(comm.rank)
        self.compressor = compressor
        self.min_rate = min_rate
        self.ef = ErrorFeedback() if error_feedback else None
        # DGC (Lin et al. 2018): with sparsified updates, optimizer momentum amplifies the rare large bursts
        # that error feedback releases; accumulating velocity u = m*u + g here instead, and masking the
        # entries just sent, keeps the effective update close to momentum SGD.
        self.velocity = Velocity(momentum_correction)
        #: The compressor's one-set-of-calls-per-bucket form (``Compressor.encode_bucket``): None lets the
        #: compressor choose by device (a GPU yes, the CPU no); False forces the per-tensor form, True the
        #: bucket form (refused at the first bucket for a compressor without one). The tests compare both.
        self.bucket_form: bool | None = None

    def _make_plan(self, bucket: Bucket) -> _Plan:
        comp = self.compressor
        compressed: list[int] = []
        raw: list[int] = []
        for i, g in enumerate(bucket.grads):
            sent = ByteLayout(comp.payload_spec(g.numel())).nbytes  # with the alignment padding
            worth = is_matrix_worth_it(g.shape, sent, self.min_rate, g.element_size())
            (compressed if worth else raw).append(i)
        raw_sizes = [bucket.grads[i].numel() for i in raw]
        per_tensor = [comp.payload_spec(bucket.grads[i].numel()) for i in compressed]
        if comp.caps.summable:
            return _Plan(compressed, raw, [n for spec in per_tensor for _, n in spec] + raw_sizes, None)
        width = len(per_tensor[0]) if per_tensor else 0
        layout = ByteLayout([spec[k] for k in range(width) for spec in per_tensor])
        plan = _Plan(compressed, raw, raw_sizes, layout)
        device = bucket.buffer.device
        if compressed and self._bucket_form(device):
            sizes = [bucket.grads[i].numel() for i in compressed]
            plan.segments = Segments(sizes, comp.bucket_granule, device, bucket.buffer.dtype)
            # the heads (one float32 each, 8 bytes with the padding), then the bodies as Segments lays them
            assert layout.nbytes == _HEAD * len(compressed) + plan.segments.total // comp.bucket_granule * 8
        return plan

    def _bucket_form(self, device: torch.device) -> bool:
        comp = self.compressor
        if self.bucket_form and not comp.bucket_granule:
            raise ValueError(f"compressor {comp.name!r} has no bucket form (sign and qsgd have one)")
        return comp.batch_bucket(device) if self.bucket_form is None else self.bucket_form

    def staged_state(self) -> list[Staged]:
        return [self.velocity] + ([self.ef] if self.ef is not None else [])

    def generators(self) -> list[torch.Generator]:
        return [self.compressor.generator]

    def screens_itself(self, bucket: Bucket) -> bool:
        # All-gather compressors whose payload shows a non-finite input (a sign scale, a QSGD norm, top-k's
        # values) are screened by reading those few numbers, not the whole bucket first: one sweep less.
        # On CUDA the bucket's screen stays on the device instead (reading a payload would synchronise).
        caps = self.compressor.caps
        return not caps.summable and caps.reveals_nonfinite and bucket.buffer.device.type == "cpu"

    def _with_momentum(self, bucket: Bucket, i: int) -> torch.Tensor:
        """The flat tensor to send for ``bucket.grads[i]``: the gradient, or its locally kept velocity."""
        return self.velocity(bucket.keys[i], bucket.grads[i].reshape(-1))

    def start(self, bucket: Bucket) -> Future[torch.Tensor]:
        plan: _Plan = self.plan(bucket, self._make_plan)
        comp, world = self.compressor, self.comm.world
        screen = self.nan_policy != "off" and self.screens_itself(bucket)
        if plan.segments is not None:
            return self._start_bucket_form(bucket, plan, screen)
        payloads: list[torch.Tensor] = []
        ctxs: list[Any] = []
        for i in plan.compressed:
            u = self._with_momentum(bucket, i)
            p, add = u, None
            if self.ef:  # p = e + u is formed by the encoding's own sweep (Compressor.encode_sum)
                e, p = self.ef.compensation_buffers(bucket.keys[i], u)
                add = (e, u)
            payload, ctx = encode_with_feedback(
                comp, p, bucket.keys[i], self.step, residual=self.ef is not None,
                sent=u if self.velocity.momentum else None, compensate=add,
            )  # fmt: skip
            if screen and comp.payload_nonfinite(payload):
                self.found_nonfinite(repr(bucket.keys[i]))
                for t in payload:  # zeros cross the wire instead; the staged state is dropped with the step
                    t.zero_()
            payloads += payload
            ctxs.append(ctx)
        nc = len(plan.compressed)
        if plan.layout is None:  # summable: one all-reduce, decode the sum
            raw = [self._with_momentum(bucket, i) for i in plan.raw]
            payloads += raw
            msg = torch.cat(payloads) if payloads else bucket.buffer.new_zeros(0)

            def finish_sum(result: torch.Tensor) -> None:
                parts = split_message(result.div_(world), plan.sizes)
                for j, i in enumerate(plan.compressed):
                    g = bucket.grads[i]
                    g.copy_(comp.decode([parts[j]], ctxs[j], g.numel()).view_as(g))
                _copy_raw(bucket, plan, parts[nc:])

            return self.defer(bucket, self.comm.all_reduce(msg), finish_sum)
        # not summable: all-gather the payloads, all-reduce the raw tensors (pre-divided: the sum is the mean)
        layout = plan.layout
        width = len(payloads) // nc if nc else 0
        segment_major = [payloads[j * width + k] for k in range(width) for j in range(nc)]
        gathered = self.comm.all_gather(layout.pack(segment_major, bucket.buffer.device)) if nc else None

        def aggregate(message: torch.Tensor) -> None:
            views = layout.views(message)
            for j, i in enumerate(plan.compressed):
                g = bucket.grads[i]
                # Decoded one worker at a time straight into the gradient: no [world, numel] temporary.
                comp.aggregate(plan.payload_views(views, j), g.numel(), out=g.view(-1))

        return self._gather_and_reduce(bucket, plan, gathered, screen, aggregate)

    def _gather_and_reduce(
        self,
        bucket: Bucket,
        plan: _Plan,
        gathered: Future[torch.Tensor] | None,
        screen: bool,
        aggregate: Callable[[torch.Tensor], None],
    ) -> Future[torch.Tensor]:
        """All-reduce the raw tensors beside the all-gather of the compressed payloads (already started);
        when both are done, ``aggregate`` the gathered message into the gradients and copy the raw back."""
        raw = [self._with_momentum(bucket, i) for i in plan.raw]
        reduced = None
        if raw:
            msg = torch.cat(raw)
            if screen and bool(nonfinite(msg)):
                self.found_nonfinite(first_nonfinite(raw, [bucket.keys[i] for i in plan.raw]))
                msg.zero_()
            reduced = self.comm.all_reduce(msg.div_(self.comm.world))

        def finish_gather(_: object) -> None:
            # wait(), not value(): on CUDA it makes the current stream wait for the collective's.
            if gathered is not None:
                aggregate(gathered.wait())
            if reduced is not None:
                _copy_raw(bucket, plan, split_message(reduced.wait(), plan.sizes))

        return self.defer(bucket, _all_of(gathered, reduced, bucket.buffer), finish_gather)

    def _start_bucket_form(self, bucket: Bucket, plan: _Plan, screen: bool) -> Future[torch.Tensor]:
        """The all-gather pattern with the compressor's bucket form: every compressed tensor of the bucket
        encoded, and later decoded, by one set of torch calls (``Compressor.encode_bucket``)."""
        comp, seg, nc = self.compressor, plan.segments, len(plan.compressed)
        assert seg is not None and plan.layout is not None
        keys = [bucket.keys[i] for i in plan.compressed]
        us = [self._with_momentum(bucket, i) for i in plan.compressed]
        adds = residual_into = None
        if self.ef:
            buffers = [self.ef.compensation_buffers(k, u) for k, u in zip(keys, us, strict=True)]
            adds, residual_into = [e for e, _ in buffers], [p for _, p in buffers]
        head, body = comp.encode_bucket(seg, us, adds, residual_into, keys, self.step)
        if screen and bool(nonfinite(head)):  # a scale or norm shows a non-finite input
            self.found_nonfinite(repr(keys[int(torch.nonzero(~torch.isfinite(head))[0])]))
            head, body = torch.zeros_like(head), torch.zeros_like(body)
        # each head padded to 8 bytes with zeros, as ByteLayout.pack pads it
        heads = torch.nn.functional.pad(head.unsqueeze(1), (0, 1)).view(-1).view(torch.uint8)
        gathered = self.comm.all_gather(torch.cat([heads, body]))
        grads = [bucket.grads[i].view(-1) for i in plan.compressed]

        def aggregate(message: torch.Tensor) -> None:
            world_heads = message[:, : _HEAD * nc].view(torch.float32)[:, ::2]
            mean = comp.aggregate_bucket(world_heads, message[:, _HEAD * nc :], seg)
            torch._foreach_copy_(grads, seg.views(mean))

        return self._gather_and_reduce(bucket, plan, gathered, screen, aggregate)

    def state_dict(self) -> dict[str, Any]:
        sd = super().state_dict()
        sd["compressor"] = self.compressor.state_dict()
        sd["residuals"] = self.ef.state_dict() if self.ef else {}
        sd["velocity"] = self.velocity.state_dict()
        return sd

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        super().load_state_dict(sd)
        self.compressor.load_state_dict(sd["compressor"])
        if self.ef:
            self.ef.load_state_dict(sd["residuals"])
        self.velocity.load_state_dict(sd.get("velocity", {}))
