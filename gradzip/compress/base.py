"""The compressor protocol and its declared capabilities.

A compressor turns one flat float tensor into payload tensors and back. It never talks to other processes:
a communication pattern moves the payloads, and the pairing is checked once, from :class:`Capabilities`,
when the method is built.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from typing import Any

import torch

from gradzip.compress.fusion import Segments


@dataclass(frozen=True)
class Capabilities:
    summable: bool
    """Payloads of several workers add up to the payload of their sum: one all-reduce aggregates them."""
    fixed_size: bool
    """The payload's size depends only on the tensor's size: it fits a fixed all-gather buffer."""
    rounds: int = 1
    """Dependent communication rounds per step (PowerSGD: 2)."""
    shared_randomness: bool = False
    """Every worker must draw the same random numbers (seed identically)."""
    unbiased: bool = False
    """E[decode(encode(x))] = x, so error feedback is optional."""
    reveals_nonfinite: bool = False
    """A NaN or an Inf in the input always shows in the payload's float tensors (a scale, a norm, the values
    sent): checking those few numbers screens the input (``payload_nonfinite``)."""


class Compressor:
    """Base of the element-wise compressors. Subclasses set ``caps`` and implement the four methods."""

    caps: Capabilities
    name: str = "compressor"
    sparsifies: bool = False
    """Sends a subset of the entries exactly (``mask_sent_`` applies): top-k, random-k."""

    def __init__(self, seed: int = 0) -> None:
        # Randomness is owned: never the global RNG, so training randomness and compression do not interfere.
        self.generator = torch.Generator()
        self.generator.manual_seed(seed)
        self._seed = seed
        self._stream = seed
        self._device_generators: dict[torch.device, torch.Generator] = {}

    @property
    def seed(self) -> int:
        return self._seed

    def reseed(self, seed: int) -> None:
        self._seed = seed
        self._position(seed)

    def independent_per_rank(self, rank: int) -> None:
        """Give worker ``rank`` a stream of its own, unless every worker must draw the same numbers.

        Independent randomness per worker (QSGD's rounding) keeps the aggregate unbiased; a compressor with
        shared randomness (random-k's indices) keeps the seed every worker agrees on."""
        if not self.caps.shared_randomness:
            self.reseed(self._seed * 1_000_003 + rank)

    def select_stream(self, key: str, step: int) -> None:
        """Position the generator for tensor ``key`` at ``step``.

        The draws then depend on (seed, tensor, step) only, not on the order tensors are met in: DDP buckets
        the first step differently from the later ones, and a resumed run must draw what the original drew.
        """
        self._position((self._seed * 0x9E3779B1 + zlib.crc32(key.encode()) * 0x85EBCA77 + step) % (1 << 63))

    def _position(self, stream: int) -> None:
        self._stream = stream
        self.generator.manual_seed(stream)
        for g in self._device_generators.values():
            g.manual_seed(stream)

    def rng(self, device: torch.device) -> torch.Generator:
        """The generator to draw with for tensors on ``device``: random numbers are made where they are used,
        never drawn on the CPU and copied to an accelerator on every step."""
        if device.type == "cpu":
            return self.generator
        g = self._device_generators.get(device)
        if g is None:
            g = self._device_generators[device] = torch.Generator(device=device)
            g.manual_seed(self._stream)
        return g

    def payload_spec(self, numel: int) -> list[tuple[torch.dtype, int]]:
        """Dtype and element count of each payload tensor for a tensor of ``numel`` elements."""
        raise NotImplementedError

    def payload_nonfinite(self, payload: list[torch.Tensor]) -> bool:
        """Whether the payload's float tensors hold a NaN or an Inf: for a compressor that
        ``reveals_nonfinite``, whether its input did (read on the CPU; a few numbers for sign, QSGD, top-k)."""
        return any(bool(~torch.isfinite(p.sum())) for p in payload if p.is_floating_point())

    def payload_nbytes(self, numel: int) -> int:
        return sum(dtype.itemsize * count for dtype, count in self.payload_spec(numel))

    def encode(self, x: torch.Tensor) -> tuple[list[torch.Tensor], Any]:
        """Payload tensors of flat ``x`` and a local context that only ``decode`` on this worker needs.

        Payloads never alias ``x``: error feedback turns ``x``'s buffer into the residual afterwards."""
        raise NotImplementedError

    def decode(self, payload: list[torch.Tensor], ctx: Any, numel: int) -> torch.Tensor:
        """Dense tensor of ``numel`` from payloads; payloads may carry leading dims (one row per worker).

        ``ctx`` is ``encode``'s context on the worker that encoded; any other worker passes
        ``shared_context`` instead (None for self-describing payloads)."""
        raise NotImplementedError

    def shared_context(self, numel: int, device: torch.device) -> Any:
        """The context a worker that did not encode needs to decode (after ``select_stream`` to the encoder's
        stream): compressors whose payload leaves out what every worker can draw (random-k's indices)
        redraw it here. Self-describing payloads need none."""
        return None

    def aggregate(
        self, gathered: list[torch.Tensor], numel: int, ctx: Any = None, out: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Mean over workers of the decoded payloads, written to ``out`` (flat, ``numel``) when given;
        ``gathered`` tensors are ``[world, ...]``; ``ctx`` is the ``shared_context`` of payloads that need
        one.

        Streams over the workers, adding one worker's decoded payload at a time in rank order, so the extra
        memory is one decoded tensor whatever the worker count (decoding all of them at once would make a
        ``[world, numel]`` float temporary: 4 GB for BERT-large's embedding at 32 workers)."""
        world = gathered[0].shape[0]
        if out is None:
            out = torch.zeros(numel, dtype=torch.float32, device=gathered[0].device)
        else:
            out.zero_()
        for w in range(world):
            out.add_(self.decode([g[w] for g in gathered], ctx, numel))
        return out.mul_(1.0 / world)  # as the C kernels do: one multiply, not a division, per element

    def encode_sum(
        self, e: torch.Tensor, g: torch.Tensor, out: torch.Tensor
    ) -> tuple[list[torch.Tensor], Any]:
        """``out = e + g`` (error feedback's compensation; ``out`` may be ``e``), then ``encode(out)``.
        Compressors with a C kernel do both in one sweep over memory."""
        return self.encode(compensate_into(e, g, out))

    # ---- rows: the parts of one tensor as a [rows, m] view, each row with its own random stream (DoubleSqueeze)

    def batch_rows(self, x: torch.Tensor) -> bool:
        """Whether ``encode_rows`` on ``x`` runs batched torch calls over all rows (a few kernel launches per
        tensor, where a launch costs more than the work: CUDA) rather than ``encode`` row by row (the CPU,
        where the C kernels make each row one sweep). Compressors with a batched form override it."""
        return False

    def encode_rows(
        self, x: torch.Tensor, streams: list[str], step: int, batched: bool | None = None
    ) -> tuple[list[torch.Tensor], Any]:
        """Payloads of every row of ``x`` (``[rows, m]``), stacked ``[rows, ...]``: row ``r`` as ``encode``
        gives it from the random stream of (``streams[r]``, ``step``). ``batched`` forces one form or the
        other (the tests compare them); None lets ``batch_rows`` choose. The context goes to ``residual_rows_``
        and ``mask_rows_``."""
        if batched if batched is not None else self.batch_rows(x):
            return self._encode_rows_batched(x, streams, step)
        rows = []
        for r, stream in enumerate(streams):
            self.select_stream(stream, step)
            rows.append(self.encode(x[r]))
        if not rows:
            empty = [
                torch.empty((0, n), dtype=dt, device=x.device) for dt, n in self.payload_spec(x.shape[1])
            ]
            return empty, []
        payload = [torch.stack([p[i] for p, _ in rows]) for i in range(len(rows[0][0]))]
        return payload, [ctx for _, ctx in rows]

    def _encode_rows_batched(
        self, x: torch.Tensor, streams: list[str], step: int
    ) -> tuple[list[torch.Tensor], Any]:
        raise NotImplementedError(f"compressor {self.name!r} has no batched form")

    def residual_rows_(self, x: torch.Tensor, payload: list[torch.Tensor], ctx: Any) -> torch.Tensor:
        """``residual_`` of every row of ``x``, with ``encode_rows``' payload and context."""
        if isinstance(ctx, list):
            for r, c in enumerate(ctx):
                self.residual_(x[r], [p[r] for p in payload], c)
            return x
        return x.sub_(self.decode(payload, ctx, x.shape[1]))

    def mask_rows_(self, t: torch.Tensor, ctx: Any) -> torch.Tensor:
        """``mask_sent_`` of every row of ``t``, with ``encode_rows``' context."""
        for r, c in enumerate(ctx):
            self.mask_sent_(t[r], c)
        return t

    def decode_rows_into(
        self, out: torch.Tensor, payload: list[torch.Tensor], streams: list[str], step: int
    ) -> None:
        """``out[r] = decode(row r of payload)`` for ``out`` of ``[rows, m]``; a compressor whose payload
        leaves out what every worker can draw redraws row ``r``'s from (``streams[r]``, ``step``)."""
        m = out.shape[1]
        if self.caps.shared_randomness or not self.batch_rows(out):
            for r, stream in enumerate(streams):
                self.select_stream(stream, step)
                ctx = self.shared_context(m, out.device)
                self.aggregate([p[r : r + 1] for p in payload], m, ctx, out=out[r])  # the mean of one row
            return
        out.copy_(self.decode(payload, None, m))

    # ---- buckets: every tensor of a bucket in one set of torch calls (the element-wise all-gather pattern)

    #: Elements per 8 bytes of the payload's body in the bucket form (``encode_bucket``); 0: no bucket form.
    #: A compressor with one has a payload of one float32 (the head: a scale or a norm) and a body of
    #: fixed-width elements per tensor.
    bucket_granule: int = 0

    def batch_bucket(self, device: torch.device) -> bool:
        """Whether the element-wise reducer runs ``encode_bucket`` and ``aggregate_bucket`` over a bucket on
        ``device``: a fixed number of torch calls per bucket however many tensors it holds, where a launch
        costs more than the work (a GPU: ResNet-50 has 161 tensors), rather than ``encode`` and ``aggregate``
        per tensor (the CPU, where the C kernels make each tensor one sweep, and even torch's per-tensor calls
        beat the bucket form's extra sweeps: 219 against 575 ms on ResNet-50's shapes)."""
        return bool(self.bucket_granule) and device.type != "cpu"

    def encode_bucket(
        self,
        seg: Segments,
        xs: list[torch.Tensor],
        adds: list[torch.Tensor] | None,
        residual_into: list[torch.Tensor] | None,
        streams: list[str],
        step: int,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Encode the flat tensors ``xs + adds`` (error feedback's ``p = u + e`` when ``adds`` is given) as
        ``encode`` would each from the stream of (``streams[t]``, ``step``): ``(head, body)``, the heads
        ``[T]`` float32 and the bodies end to end in ``seg``'s padded layout as bytes (padding zero). With
        ``residual_into``, tensor ``t``'s error-feedback residual ``p - decode(encode(p))`` is written to
        ``residual_into[t]``."""
        raise NotImplementedError(f"compressor {self.name!r} has no bucket form")

    def aggregate_bucket(self, head: torch.Tensor, body: torch.Tensor, seg: Segments) -> torch.Tensor:
        """Mean over workers of the decoded payloads of a bucket (``head`` ``[world, T]``, ``body``
        ``[world, bytes]``), in ``seg``'s padded layout: what ``aggregate`` gives per tensor, one worker at a
        time (O(numel) extra memory whatever the worker count)."""
        raise NotImplementedError(f"compressor {self.name!r} has no bucket form")

    def residual_(self, p: torch.Tensor, payload: list[torch.Tensor], ctx: Any) -> torch.Tensor:
        """Turn ``p`` into ``p - decode(encode(p))`` in place (the new error-feedback residual)."""
        return p.sub_(self.decode(payload, ctx, p.numel()))

    def mask_sent_(self, t: torch.Tensor, ctx: Any) -> torch.Tensor:
        """Zero the entries of ``t`` that this step's payload carried (sparsifiers only; DGC's momentum
        factor masking). Compressors that send every entry do not support momentum correction."""
        raise ValueError(f"compressor {self.name!r} does not support momentum correction")

    def residual(self, p: torch.Tensor, payload: list[torch.Tensor], ctx: Any) -> torch.Tensor:
        """``p - decode(encode(p))`` as a new tensor."""
        return self.residual_(p.clone(), payload, ctx)

    def state_dict(self) -> dict[str, Any]:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        self.generator.set_state(sd["generator"])


def compensate_into(e: torch.Tensor, g: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """``out = e + g`` (``out`` may be ``e``): the torch path of a fused compensation."""
    return torch.add(e, g, out=out) if out is not e else e.add_(g)


def check_pairing(
    compressor: Compressor, pattern: str, *, fixed_size: bool = True, float32: bool = False
) -> None:
    """Refuse, when a method is built, a compressor that ``pattern`` cannot carry (rather than a hang or a size
    mismatch at the first step): every pattern runs one round per step; ``fixed_size`` patterns lay payloads
    out in advance (an all-gather, DoubleSqueeze's rows, point-to-point messages); ``float32`` patterns fuse
    summable payloads into one float32 all-reduce."""
    caps, name = compressor.caps, compressor.name
    if caps.rounds != 1:
        raise ValueError(f"{pattern} needs a one-round compressor; {name!r} has {caps.rounds} rounds")
    if fixed_size and not caps.fixed_size:
        raise ValueError(f"{pattern} needs fixed-size payloads; {name!r} has variable-size ones")
    if float32 and any(dt != torch.float32 for dt, _ in compressor.payload_spec(8)):
        raise ValueError(
            f"{pattern} fuses summable payloads into a float32 all-reduce; {name!r}'s payload is not float32"
        )


def is_matrix_worth_it(shape: torch.Size, payload_bytes: int, min_rate: float, itemsize: int = 4) -> bool:
    """1-D tensors always travel raw; a matrix only when compression saves at least ``min_rate``."""
    return len(shape) >= 2 and shape.numel() * itemsize >= min_rate * payload_bytes
