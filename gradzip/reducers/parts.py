"""Parts of tensors, DoubleSqueeze's unit of work: every tensor is cut into ``parts`` near-equal pieces, and
part ``j`` of every tensor belongs to server ``j`` (a worker in the sharded placement, a dedicated process in
the server placements).

:class:`PartCodec` compresses, packs, unpacks and aggregates part ``j`` of a list of tensors. Each (tensor,
part, pass) draws from its own random stream, so any process can redraw what another drew (random-k's
indices) without it being sent. Parts are cut per tensor, not per bucket, so a server's share, and the
residuals that belong to it, depend on the tensor's name only: they survive DDP's bucket rebuild and a
restart.
"""

from __future__ import annotations

import functools

import torch

from gradzip.compress.base import Compressor
from gradzip.compress.feedback import ErrorFeedback, Velocity, encode_with_feedback
from gradzip.compress.fusion import ByteLayout


@functools.cache
def part_bounds(numel: int, parts: int) -> tuple[tuple[int, int], ...]:
    """``[start, stop)`` of each of ``parts`` near-equal parts of a flat tensor (the first ones one longer)."""
    q, r = divmod(numel, parts)
    bounds, a = [], 0
    for j in range(parts):
        b = a + q + (1 if j < r else 0)
        bounds.append((a, b))
        a = b
    return tuple(bounds)


class PartCodec:
    """Compresses, packs, unpacks and aggregates part ``j`` of a list of tensors (see the module docstring)."""

    def __init__(self, compressor: Compressor, parts: int, uniform: bool = False) -> None:
        self.compressor = compressor
        self.parts = parts
        self.uniform = uniform
        """Every part's message has the same layout (see ``layout``): what the batched ``compress_worker_into``
        and ``decode_into`` need, for messages that travel as the rows of one tensor anyway (an all-to-all,
        an all-gather). Separate messages (dedicated servers) keep each part's own, a few bytes shorter."""
        self._layouts: dict[tuple[tuple[int, ...], int], ByteLayout] = {}

    def layout(self, numels: tuple[int, ...], part: int) -> ByteLayout:
        """The message of part ``part`` of tensors of ``numels``. With ``uniform``, each tensor's payloads sit
        in slots sized for its longest part (the first), so every part's message has the same offsets and a
        tensor's payloads over a run of parts are one strided view of a stack of messages."""
        key = (numels, part)
        lay = self._layouts.get(key)
        if lay is None:
            specs, slots = [], []
            for n in numels:
                bounds = part_bounds(n, self.parts)
                mine = self.compressor.payload_spec(bounds[part][1] - bounds[part][0])
                longest = self.compressor.payload_spec(bounds[0][1] - bounds[0][0])
                specs += mine
                slots += [max(a, b) for (_, a), (_, b) in zip(mine, longest, strict=True)]
            lay = self._layouts[key] = ByteLayout(specs, slots if self.uniform else None)
        return lay

    def width(self, numels: tuple[int, ...]) -> int:
        """Bytes of the largest part's message: every part is sent in a row of this width."""
        return max(self.layout(numels, j).nbytes for j in range(self.parts))

    def groups(self, flat: torch.Tensor) -> list[tuple[range, torch.Tensor]]:
        """The parts of flat tensor ``flat`` as at most two ``[parts, length]`` views: the first ``numel %
        parts`` parts are one longer than the others (``part_bounds``)."""
        q, r = divmod(flat.numel(), self.parts)
        out = [(range(0, r), flat[: r * (q + 1)].view(r, q + 1))] if r else []
        out.append((range(r, self.parts), flat[r * (q + 1) :].view(self.parts - r, q)))
        return out

    def _slots(
        self, msgs: torch.Tensor, numels: tuple[int, ...], tensor: int, rows: range
    ) -> list[torch.Tensor]:
        """Views of tensor ``tensor``'s payloads in messages ``rows`` of ``msgs`` (``[parts, width]``):
        ``[len(rows), ...]`` each, strided by the message width (``uniform`` layouts only)."""
        if not self.uniform:
            raise ValueError("batched parts need a PartCodec built with uniform=True")
        lay = self.layout(numels, rows.start)
        per = len(lay.specs) // len(numels)
        out = []
        for i in range(tensor * per, (tensor + 1) * per):
            (dtype, count), off = lay.specs[i], lay.offsets[i]
            out.append(msgs[rows.start : rows.stop, off : off + count * dtype.itemsize].view(dtype))
        return out

    def compress_worker_into(
        self,
        ef: ErrorFeedback,
        velocity: Velocity,
        grads: list[torch.Tensor],
        keys: list[str],
        tag: str,
        step: int,
        send: torch.Tensor,
    ) -> None:
        """``compress_worker``, batched: each tensor's parts are encoded as the rows of one or two views
        (``Compressor.encode_rows``) and written into the zeroed messages ``send`` (``[parts, width]``, one per
        part) with one strided copy per payload, where a part at a time cost parts x tensors small calls."""
        comp = self.compressor
        us, vs = self._compensated(ef, velocity, grads, keys)
        numels = tuple(v.numel() for v in vs)
        for t, (u, v, key) in enumerate(zip(us, vs, keys, strict=True)):
            for (rows, x), (_, umat) in zip(self.groups(v), self.groups(u), strict=True):
                payload, ctx = comp.encode_rows(x, [self.stream(key, j, tag) for j in rows], step)
                comp.residual_rows_(x, payload, ctx)
                if velocity.momentum and comp.sparsifies:
                    comp.mask_rows_(umat, ctx)
                for slot, p in zip(self._slots(send, numels, t, rows), payload, strict=True):
                    slot.copy_(p)

    def decode_into(
        self, msgs: torch.Tensor, flats: list[torch.Tensor], keys: list[str], tag: str, step: int
    ) -> None:
        """Every part of every tensor from the messages ``msgs`` (``[parts, width]``, row ``j`` part ``j``'s),
        decoded straight into the flat tensors ``flats``, a run of equal parts at a time."""
        numels = tuple(f.numel() for f in flats)
        for t, (flat, key) in enumerate(zip(flats, keys, strict=True)):
            for rows, out in self.groups(flat):
                payload = self._slots(msgs, numels, t, rows)
                self.compressor.decode_rows_into(out, payload, [self.stream(key, j, tag) for j in rows], step)

    @staticmethod
    def stream(key: str, part: int, tag: str) -> str:
        """The random stream of (tensor, part, pass): ``tag`` names the pass ("" for the workers' push,
        "/server" for the server's reply; per worker for the asynchronous variant)."""
        return f"{key}#{part}{tag}"

    def part_of(self, flat: torch.Tensor, part: int) -> torch.Tensor:
        """Part ``part`` of a flat tensor (a view)."""
        a, b = part_bounds(flat.numel(), self.parts)[part]
        return flat[a:b]

    def compress(
        self,
        chunks: list[torch.Tensor],
        keys: list[str],
        part: int,
        tag: str,
        step: int,
        residual: bool,
        velocity: list[torch.Tensor] | None = None,
    ) -> list[torch.Tensor]:
        """Payloads of ``chunks`` (part ``part`` of each tensor); with ``residual`` each chunk becomes, in
        place, what compression left out (``v - C(v)``). A sparsifier zeroes the sent entries of the
        ``velocity`` chunks (DGC's momentum factor masking)."""
        out: list[torch.Tensor] = []
        for t, (chunk, key) in enumerate(zip(chunks, keys, strict=True)):
            sent = velocity[t] if velocity is not None else None
            payload, _ = encode_with_feedback(
                self.compressor, chunk, self.stream(key, part, tag), step, residual=residual, sent=sent
            )
            out += payload
        return out

    @staticmethod
    def _compensated(
        ef: ErrorFeedback, velocity: Velocity, grads: list[torch.Tensor], keys: list[str]
    ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """``u_i`` (the flat gradient, or its velocity) and ``v_i = u_i + d_i`` (in the residual's buffer)."""
        us = [velocity(k, g.reshape(-1)) for k, g in zip(keys, grads, strict=True)]
        return us, [ef.compensate(k, u) for k, u in zip(keys, us, strict=True)]

    def compress_worker(
        self,
        ef: ErrorFeedback,
        velocity: Velocity,
        grads: list[torch.Tensor],
        keys: list[str],
        tag: str,
        step: int,
    ) -> list[list[torch.Tensor]]:
        """The worker's half on every part: ``v_i = u_i + d_i`` (``u_i`` the gradient, or its velocity),
        formed in the residual's buffer; compressing each part turns it into ``d_i`` in place. Returns the
        payloads of each part."""
        us, vs = self._compensated(ef, velocity, grads, keys)
        out = []
        for j in range(self.parts):
            masks = [self.part_of(u, j) for u in us] if velocity.momentum else None
            out.append(self.compress([self.part_of(v, j) for v in vs], keys, j, tag, step, True, masks))
        return out

    def _payloads(self, row: torch.Tensor, numels: tuple[int, ...], part: int) -> list[list[torch.Tensor]]:
        """The payload tensors of each tensor's part in a message row (rows may carry a leading sender dim)."""
        lay = self.layout(numels, part)
        views = lay.views(row[..., : lay.nbytes])
        width = len(views) // len(numels) if numels else 0
        return [views[t * width : (t + 1) * width] for t in range(len(numels))]

    def aggregate(
        self, rows: torch.Tensor, numels: tuple[int, ...], keys: list[str], part: int, tag: str, step: int
    ) -> list[torch.Tensor]:
        """Mean over the rows (one per sender) of the decoded part ``part`` of every tensor."""
        return self._decoded(rows, numels, keys, part, tag, step, mean=True)

    def decode(
        self, row: torch.Tensor, numels: tuple[int, ...], keys: list[str], part: int, tag: str, step: int
    ) -> list[torch.Tensor]:
        """Decoded part ``part`` of every tensor from one sender's row."""
        return self._decoded(row, numels, keys, part, tag, step, mean=False)

    def _decoded(
        self,
        rows: torch.Tensor,
        numels: tuple[int, ...],
        keys: list[str],
        part: int,
        tag: str,
        step: int,
        mean: bool,
    ) -> list[torch.Tensor]:
        comp, out = self.compressor, []
        for n, key, payload in zip(numels, keys, self._payloads(rows, numels, part), strict=True):
            a, b = part_bounds(n, self.parts)[part]
            comp.select_stream(self.stream(key, part, tag), step)
            ctx = comp.shared_context(b - a, rows.device)
            out.append(comp.aggregate(payload, b - a, ctx) if mean else comp.decode(payload, ctx, b - a))
        return out

    def pack(
        self, payloads: list[torch.Tensor], numels: tuple[int, ...], part: int, into: torch.Tensor
    ) -> None:
        """Write the payloads straight into ``into`` (a zeroed message row: the padding travels too)."""
        lay = self.layout(numels, part)
        for view, t in zip(lay.views(into[: lay.nbytes]), payloads, strict=True):
            view.copy_(t.reshape(-1))
