"""QSGD (Alistarh et al. 2017): unbiased stochastic rounding of ``|v_j| / |v|_2`` to ``s`` levels.

    a = |v_j| / |v|_2 * s;  l = floor(a);  level = l + 1 with probability a - l, else l
    (computed as a = |v_j| * (s / |v|_2): one multiply per element)
    Q(v)_j = |v|_2 * sign(v_j) * level / s

Sign and level travel together as one int8 (``levels <= 127``), plus one float for the norm.

The uniforms ``u`` are counter-based: element ``j``'s is a hash of ``j`` under a 64-bit key drawn once per
tensor from the compressor's generator. The C kernel computes it in the same sweep as the rounding (drawing
a float per element from torch's Mersenne twister cost more than the rest of the step), and
``counter_uniforms`` computes the same numbers with torch, so both paths send the same bits.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from gradzip.compress import elementwise_kernels as kernels
from gradzip.compress.base import Capabilities, Compressor
from gradzip.compress.fusion import Segments

_M32 = 0xFFFFFFFF
_MIX = 0x45D9F3B  # below 2^31: a 32-bit value times it fits an int64, so torch computes the C hash exactly


def _mix(x: torch.Tensor) -> torch.Tensor:
    x = ((x >> 16) ^ x) * _MIX & _M32
    x = ((x >> 16) ^ x) * _MIX & _M32
    return (x >> 16) ^ x


def counter_uniforms(
    n: int, key: tuple[int | torch.Tensor, int | torch.Tensor], device: torch.device
) -> torch.Tensor:
    """Element ``j``'s uniform in [0, 1) (24 random bits) under ``key``: what ``_elementwise.c``'s ``ew_quantize_range`` draws.
    Keys may be ``[rows, 1]`` int64 tensors: one row of uniforms per key."""
    return uniforms_at(torch.arange(n, dtype=torch.int64, device=device), key)


def uniforms_at(i: torch.Tensor, key: tuple[int | torch.Tensor, int | torch.Tensor]) -> torch.Tensor:
    """``counter_uniforms`` at element indices ``i`` (int64), under keys that broadcast against them."""
    x = _mix((_mix((i & _M32) ^ key[0]) + ((i >> 32) ^ key[1])) & _M32)
    return (x >> 8).to(torch.float32) * (1.0 / (1 << 24))


def _upload(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A small CPU tensor on ``device``. To a GPU through pinned memory and asynchronously: a copy from pageable
    memory would wait for every kernel queued so far, inside the backward pass."""
    if device.type != "cuda":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


class QSGD(Compressor):
    name = "qsgd"
    caps = Capabilities(summable=False, fixed_size=True, unbiased=True, reveals_nonfinite=True)  # the norm

    def __init__(self, levels: int, seed: int = 0) -> None:
        super().__init__(seed)
        self.levels = levels

    def payload_spec(self, numel: int) -> list[tuple[torch.dtype, int]]:
        return [(torch.float32, 1), (torch.int8, numel)]

    def _key(self) -> tuple[int, int]:
        # From the CPU generator whatever the device: two numbers, no device round trip.
        k1, k2 = torch.randint(1 << 32, (2,), generator=self.generator).tolist()
        return k1, k2

    def encode(self, x: torch.Tensor) -> tuple[list[torch.Tensor], Any]:
        k1, k2 = self._key()
        squares = kernels.square_sum(x)  # accumulated in float64, as the torch path below
        # A non-finite norm (a NaN or an Inf under nan_policy="off") takes the torch path: the kernel's
        # rounding assumes 0 <= |x| / norm <= 1.
        if squares is not None and math.isfinite(squares):
            norm = torch.tensor([math.sqrt(squares)], dtype=torch.float32)
            q = kernels.qsgd_quantize(x, float(self._scale(norm)), (k1, k2))
            assert q is not None  # the same conditions as square_sum's
            return [norm, q], None
        norm = torch.linalg.vector_norm(x, dtype=torch.float64).to(torch.float32).reshape(1)
        return [norm, self._levels(x, norm, (k1, k2))], None

    def _keys(self, streams: list[str], step: int, device: torch.device) -> torch.Tensor:
        """``[len(streams), 2]`` int64 on ``device``: each row's or tensor's key from its own stream, as
        ``encode`` draws it (on the CPU generator)."""
        keys = []
        for stream in streams:
            self.select_stream(stream, step)
            keys.append(self._key())
        return _upload(torch.tensor(keys, dtype=torch.int64).reshape(-1, 2), device)

    def _scale(self, norm: torch.Tensor) -> torch.Tensor:
        """``levels / norm`` in float32 (a zero norm as the smallest normal float): ``a = |x| * scale``, one
        multiply per element, in the kernel and in torch alike."""
        return self.levels / norm.clamp_min(torch.finfo(torch.float32).tiny)

    def _levels(
        self, x: torch.Tensor, norm: torch.Tensor, key: tuple[int | torch.Tensor, int | torch.Tensor]
    ) -> torch.Tensor:
        """The torch path of the rounding: signed levels of ``x`` (``[m]``, or ``[rows, m]`` with ``norm`` and
        the keys ``[rows, 1]``)."""
        return self._round(x, self._scale(norm), key)

    def _round(
        self,
        x: torch.Tensor,
        scale: torch.Tensor,
        key: tuple[int | torch.Tensor, int | torch.Tensor],
        at: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``_levels`` from ``_scale(norm)``; a bucket's padded ``[total]`` takes per-element scales, keys and
        counters ``at``."""
        a = x.abs() * scale
        floor = a.floor()
        u = counter_uniforms(x.shape[-1], key, x.device) if at is None else uniforms_at(at, key)
        level = floor + (u < a - floor).to(torch.float32)
        return (torch.sign(x) * level).to(torch.int8)

    def batch_rows(self, x: torch.Tensor) -> bool:
        return not kernels.serves(x)

    def _encode_rows_batched(
        self, x: torch.Tensor, streams: list[str], step: int
    ) -> tuple[list[torch.Tensor], Any]:
        key = self._keys(streams, step, x.device)
        norm = torch.linalg.vector_norm(x, dim=1, keepdim=True, dtype=torch.float64).to(torch.float32)
        return [norm, self._levels(x, norm, (key[:, :1], key[:, 1:]))], None

    bucket_granule = 8  # 8 int8 levels: 8 bytes
    #: Elements rounded per pass of the bucket form: bounds its int64 temporaries to about 200 MB.
    bucket_chunk = 1 << 22

    def encode_bucket(
        self,
        seg: Segments,
        xs: list[torch.Tensor],
        adds: list[torch.Tensor] | None,
        residual_into: list[torch.Tensor] | None,
        streams: list[str],
        step: int,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        key = self._keys(streams, step, seg.device)
        x = seg.cat(xs)  # padding 0: level 0
        if adds is not None:
            x.add_(seg.cat(adds))
        norms = torch.stack(torch._foreach_norm(seg.views(x), 2, dtype=torch.float64)).to(torch.float32)
        ids, scale = seg.ids(), self._scale(norms)
        q = torch.empty(seg.total, dtype=torch.int8, device=seg.device)
        # In chunks: the counter hash works on int64 temporaries, some 50 bytes an element at the peak.
        for a in range(0, seg.total, self.bucket_chunk):
            b = min(a + self.bucket_chunk, seg.total)
            at = ids[a:b]  # per-tensor scales and keys spread over the elements: encode's, element by element
            q[a:b] = self._round(x[a:b], scale[at], (key[:, 0][at], key[:, 1][at]), seg.positions(at, a))
        if residual_into is not None:
            decoded = q.to(torch.float32).mul_((norms / self.levels)[ids])
            torch._foreach_copy_(residual_into, seg.views(x.sub_(decoded)))
        return norms, q.view(torch.uint8)

    def aggregate_bucket(self, head: torch.Tensor, body: torch.Tensor, seg: Segments) -> torch.Tensor:
        out = torch.zeros(seg.total, dtype=seg.sum_dtype, device=body.device)
        step, ids = head / self.levels, seg.ids()
        for w in range(head.shape[0]):  # one worker at a time, in rank order, as aggregate
            out.add_(body[w].view(torch.int8).to(torch.float32).mul_(step[w][ids]))
        return out.mul_(1.0 / head.shape[0])

    def decode(self, payload: list[torch.Tensor], ctx: Any, numel: int) -> torch.Tensor:
        norm, q = payload
        return q.to(torch.float32) * (norm / self.levels)

    def aggregate(
        self, gathered: list[torch.Tensor], numel: int, ctx: Any = None, out: torch.Tensor | None = None
    ) -> torch.Tensor:
        norms, q = gathered
        if out is None:
            out = torch.empty(numel, dtype=torch.float32, device=q.device)
        if kernels.qsgd_accumulate(out, norms, q, self.levels):
            return out
        return super().aggregate(gathered, numel, ctx, out)
