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
