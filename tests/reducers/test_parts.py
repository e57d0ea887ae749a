"""DoubleSqueeze's parts, batched: a tensor's parts encoded as the rows of one or two views and written with one
strided copy per payload give the same messages, residuals and decoded tensors as a part at a time."""

from __future__ import annotations

import pytest
import torch

from gradzip.compress.base import Compressor
from gradzip.compress.feedback import ErrorFeedback, Velocity
from gradzip.config import make_compressor
from gradzip.reducers.parts import PartCodec, part_bounds

COMPRESSORS = {
    "signsgd": {"seed": 7},
    "topk": {"density": 0.3, "seed": 7},
    "qsgd": {"levels": 8, "seed": 7},
    "randomk": {"density": 0.3, "seed": 7},
    "identity": {},
    "fp16": {},
}
# Odd sizes: fewer elements than parts (empty parts), one element, a remainder, an exact multiple.
NUMELS = (1, 3, 37, 200, 1003)


def codec(name: str, parts: int) -> PartCodec:
    comp: Compressor = make_compressor(name, **COMPRESSORS[name])
    return PartCodec(comp, parts, uniform=True)


def grads(seed: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(n, generator=gen) for n in NUMELS]


@pytest.mark.parametrize("parts", [1, 4, 5])
@pytest.mark.parametrize("name", sorted(COMPRESSORS))
def test_batched_worker_pass_equals_a_part_at_a_time(name: str, parts: int) -> None:
    keys = [f"t{i}" for i in range(len(NUMELS))]
    numels = tuple(NUMELS)
    momentum = 0.9 if name in ("topk", "randomk") else 0.0  # momentum correction masks the sent entries
    results = []
    for batched in (True, False):
        c = codec(name, parts)
        ef, vel = ErrorFeedback(), Velocity(momentum)
        sends = []
        for step in range(2):  # the second step starts from the first one's residuals
            send = torch.zeros((parts, c.width(numels)), dtype=torch.uint8)
            if batched:
                c.compress_worker_into(ef, vel, grads(step), keys, "", step, send)
            else:
                for j, payloads in enumerate(c.compress_worker(ef, vel, grads(step), keys, "", step)):
                    c.pack(payloads, numels, j, send[j])
            sends.append(send)
        decoded = [torch.full((n,), float("nan")) for n in NUMELS]
        if batched:
            c.decode_into(sends[-1], decoded, keys, "", 1)
        else:
            for j in range(parts):
                for flat, part in zip(decoded, c.decode(sends[-1][j], numels, keys, j, "", 1), strict=True):
                    a, b = part_bounds(flat.numel(), parts)[j]
                    flat[a:b].copy_(part)
        results.append((sends, dict(ef.residuals), dict(vel.buffers), decoded))
    (got_sends, got_ef, got_vel, got_dec), (want_sends, want_ef, want_vel, want_dec) = results
    for got, want in zip(got_sends, want_sends, strict=True):
        assert torch.equal(got, want)
    for k in keys:
        assert torch.equal(got_ef[k], want_ef[k])
        if momentum:
            assert torch.equal(got_vel[k], want_vel[k])
    for got, want in zip(got_dec, want_dec, strict=True):
        assert torch.equal(got, want) and bool(torch.isfinite(got).all())


@pytest.mark.parametrize("name", ["signsgd", "topk", "qsgd", "identity", "fp16"])
def test_batched_rows_equal_rows_one_at_a_time(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The batched torch form (what CUDA runs) against ``encode`` row by row (what the CPU runs): the same
    payload bits, residuals and decode."""
    x = torch.randn(6, 301, generator=torch.Generator().manual_seed(1))
    streams = [f"w#{j}" for j in range(6)]
    out = []
    for batched in (True, False):
        c = codec(name, 6).compressor
        xr = x.clone()
        payload, ctx = c.encode_rows(xr, streams, 3, batched=batched)
        c.residual_rows_(xr, payload, ctx)
        out.append((payload, xr, c.decode(payload, None, 301)))
    (gp, gx, gd), (wp, wx, wd) = out
    for a, b in zip(gp, wp, strict=True):
        assert a.shape == b.shape and torch.equal(a, b)
    assert torch.equal(gx, wx) and torch.equal(gd, wd)
    # Decoding into [rows, m]: the batched form (one decode) against row by row.
    c = codec(name, 6).compressor
    rows = []
    for batched in (True, False):
        monkeypatch.setattr(c, "batch_rows", lambda x, b=batched: b)
        out_rows = torch.full((6, 301), float("nan"))
        c.decode_rows_into(out_rows, gp, streams, 3)
        rows.append(out_rows)
    assert torch.equal(rows[0], rows[1]) and torch.equal(rows[0], gd)


def test_every_part_shares_one_layout() -> None:
    c = codec("topk", 4)
    numels = (10, 7, 3)
    lays = [c.layout(numels, j) for j in range(4)]
    assert len({lay.nbytes for lay in lays}) == 1 and len({tuple(lay.offsets) for lay in lays}) == 1
    # ...while each part's own payload counts differ (10 elements in 4 parts: 3, 3, 2, 2).
    assert lays[0].specs != lays[3].specs
    # Separate messages (dedicated servers) keep each part's own layout, and the batched passes refuse it.
    own = PartCodec(c.compressor, 4)
    assert own.layout(numels, 3).nbytes < own.layout(numels, 0).nbytes
    with pytest.raises(ValueError, match="uniform"):
        own.decode_into(
            torch.zeros(4, own.width(numels), dtype=torch.uint8),
            [torch.zeros(n) for n in numels],
            ["a", "b", "c"],
            "",
            0,
        )
