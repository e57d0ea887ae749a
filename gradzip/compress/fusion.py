"""Tensor fusion: many tensors packed into one flat buffer so one message pays the latency once."""

from __future__ import annotations

from collections.abc import Sequence

import torch

_ALIGN = 8  # every segment starts on an 8-byte boundary so it can be viewed as any dtype


class ByteLayout:
    """Segments of mixed dtypes packed into one uint8 buffer (for all-gathered payloads).

    ``slots`` (element counts, one per segment, at least the segment's own) reserve room for a segment
    larger than this one: messages whose segments differ in length then share offsets, so a segment is one
    strided view across a stack of messages (DoubleSqueeze's parts)."""

    def __init__(self, specs: Sequence[tuple[torch.dtype, int]], slots: Sequence[int] | None = None) -> None:
        self.specs = list(specs)
        reserved = [n for _, n in self.specs] if slots is None else list(slots)
        if len(reserved) != len(self.specs) or any(
            r < n for r, (_, n) in zip(reserved, self.specs, strict=True)
        ):
            raise ValueError(f"slots {reserved} do not hold segments {[n for _, n in self.specs]}")
        self.offsets: list[int] = []
        off = 0
        for (dtype, _), count in zip(self.specs, reserved, strict=True):
            self.offsets.append(off)
            off += -(-count * dtype.itemsize // _ALIGN) * _ALIGN
        self.nbytes = off
        self._gaps_on: dict[torch.device, torch.Tensor] = {}

    def pack(self, tensors: Sequence[torch.Tensor], device: torch.device | None = None) -> torch.Tensor:
        buf = torch.empty(self.nbytes, dtype=torch.uint8, device=device)
        for view, t in zip(self.views(buf), tensors, strict=True):
            view.copy_(t.reshape(-1))
        # The padding travels too and must not carry stale memory; zeroing only it, not the whole buffer
        # first, saves a sweep over the message (QSGD's is a quarter of the gradients' size).
        gaps = self._gaps(buf.device)
        if gaps.numel():
            buf[gaps] = 0
        return buf

    def _gaps(self, device: torch.device) -> torch.Tensor:
        """Byte positions of the padding: after each segment up to the next one's offset (cached per device)."""
        gaps = self._gaps_on.get(device)
        if gaps is None:
            ends = [off + n * dt.itemsize for (dt, n), off in zip(self.specs, self.offsets, strict=True)]
            starts = [*self.offsets[1:], self.nbytes] if self.offsets else []
            positions = [i for a, b in zip(ends, starts, strict=True) for i in range(a, b)]
            gaps = self._gaps_on[device] = torch.tensor(positions, dtype=torch.long, device=device)
        return gaps

    def views(self, buf: torch.Tensor) -> list[torch.Tensor]:
        """Typed views of the segments; ``buf`` may have leading dims (one row per worker)."""
        out = []
        for (dtype, count), off in zip(self.specs, self.offsets, strict=True):
            out.append(buf[..., off : off + count * dtype.itemsize].view(dtype))
        return out


def flat_offsets(sizes: Sequence[int]) -> list[int]:
    """Start of each segment in a flat buffer of same-dtype tensors laid end to end."""
    offs, off = [], 0
    for n in sizes:
        offs.append(off)
        off += n
    offs.append(off)
    return offs


def views_of(buffer: torch.Tensor, shapes: Sequence[torch.Size]) -> list[torch.Tensor]:
    """Views of flat ``buffer`` laid out as tensors of ``shapes``, end to end."""
    offs = flat_offsets([s.numel() for s in shapes])
    return [buffer[a:b].view(s) for a, b, s in zip(offs, offs[1:], shapes, strict=False)]


def split_message(msg: torch.Tensor, sizes: Sequence[int]) -> list[torch.Tensor]:
    """Flat segments of ``msg`` of the given sizes, end to end."""
    offs = flat_offsets(sizes)
    return [msg[a:b] for a, b in zip(offs, offs[1:], strict=False)]


class Segments:
    """The tensors of a bucket end to end in one flat buffer, each padded to a multiple of ``granule``
    elements: the body of a bucket's message in the compressors' one-call-per-bucket form
    (``Compressor.encode_bucket``), where one torch call covers every tensor instead of one call each.

    With the granule a compressor chooses (64 sign bits, 8 int8 levels: 8 bytes either way), tensor ``t``'s
    payload in the padded body starts where its segment starts in a ``ByteLayout`` of the same tensors, so
    the body is that layout's byte range as is. ``counts``, ``lengths`` and ``start_at`` live on ``device``,
    made once per bucket."""

    def __init__(
        self, sizes: Sequence[int], granule: int, device: torch.device, dtype: torch.dtype = torch.float32
    ) -> None:
        self.sizes = list(sizes)
        self.granule = granule
        self.dtype = dtype  # the tensors': padding in it keeps torch.cat one batched copy, in their precision
        # decoded sums: at least float32 (a bfloat16 model's mean is formed in float32, then stored)
        self.sum_dtype = torch.promote_types(dtype, torch.float32)
        self.padded = [-(-n // granule) * granule for n in self.sizes]
        offs = flat_offsets(self.padded)
        self.starts, self.total = offs[:-1], offs[-1]
        self.device = device
        self.lengths = torch.tensor(self.padded, dtype=torch.int64, device=device)
        # element counts for means (at least 1: an empty tensor's sum is 0, its mean 0 rather than NaN)
        self.counts = torch.tensor([max(n, 1) for n in self.sizes], dtype=torch.float64, device=device)
        self.start_at = torch.tensor(self.starts, dtype=torch.int64, device=device)
        self._fills: dict[float, torch.Tensor] = {}

    def cat(self, tensors: Sequence[torch.Tensor], fill: float = 0.0) -> torch.Tensor:
        """The flat tensors laid end to end, each padded with ``fill``: one ``torch.cat``."""
        pad = self._fills.get(fill)
        if pad is None:
            pad = self._fills[fill] = torch.full((self.granule,), fill, dtype=self.dtype, device=self.device)
        parts: list[torch.Tensor] = []
        for t, n, m in zip(tensors, self.sizes, self.padded, strict=True):
            parts.append(t.reshape(-1))
            if m > n:
                parts.append(pad[: m - n])
        if not parts:
            return pad[:0].clone()
        return torch.cat(parts)

    def views(self, flat: torch.Tensor) -> list[torch.Tensor]:
        """Each tensor's (unpadded) part of a padded flat buffer."""
        return [flat[a : a + n] for a, n in zip(self.starts, self.sizes, strict=True)]

    def ids(self) -> torch.Tensor:
        """Each element's tensor (``[total]``, int32): ``values[ids]`` spreads one value per tensor over its
        padded segment. Made per call, not kept: it would hold as much memory as the bucket."""
        tensors = torch.arange(len(self.sizes), dtype=torch.int32, device=self.device)
        return torch.repeat_interleave(tensors, self.lengths, output_size=self.total)

    def positions(self, ids: torch.Tensor, first: int = 0) -> torch.Tensor:
        """Each element's index within its own tensor (int64), for the elements from ``first`` on whose
        ``ids()`` are ``ids``."""
        here = torch.arange(first, first + ids.numel(), dtype=torch.int64, device=self.device)
        return here - self.start_at[ids]
