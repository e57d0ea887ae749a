"""Tensor fusion: ByteLayout packs mixed dtypes into one aligned uint8 buffer; flat_offsets."""

from __future__ import annotations

import pytest
import torch

from gradzip.compress.fusion import ByteLayout, flat_offsets

SPECS = [
    (torch.float32, 5),
    (torch.int32, 3),
    (torch.uint8, 11),
    (torch.int8, 1),
    (torch.float16, 7),
    (torch.float32, 1),
    (torch.uint8, 0),
    (torch.float16, 3),
]


def _tensors(specs: list[tuple[torch.dtype, int]], seed: int) -> list[torch.Tensor]:
    g = torch.Generator()
    g.manual_seed(seed)
    out = []
    for dtype, count in specs:
        if dtype.is_floating_point:
            out.append(torch.randn(count, generator=g).to(dtype))
        elif dtype == torch.uint8:
            out.append(torch.randint(0, 256, (count,), generator=g, dtype=dtype))
        else:
            info = torch.iinfo(dtype)
            lo, hi = max(info.min, -(2**20)), min(info.max, 2**20)
            out.append(torch.randint(lo, hi, (count,), generator=g, dtype=dtype))
    return out


def test_offsets_aligned_and_disjoint() -> None:
    layout = ByteLayout(SPECS)
    assert len(layout.offsets) == len(SPECS)
    assert layout.offsets[0] == 0
    ends = []
    for (dtype, count), off in zip(SPECS, layout.offsets, strict=True):
        assert off % 8 == 0
        ends.append(off + count * dtype.itemsize)
    # Each segment ends before the next begins, with less than 8 bytes of padding.
    for end, nxt in zip(ends, [*layout.offsets[1:], layout.nbytes], strict=True):
        assert end <= nxt < end + 8 or (end == nxt)
    assert layout.nbytes % 8 == 0
    # float32*5 = 20 -> 24; int32*3 = 12 -> 16; uint8*11 -> 16; int8*1 -> 8; f16*7 = 14 -> 16; ...
    assert layout.offsets[:6] == [0, 24, 40, 56, 64, 80]
    assert layout.nbytes == 80 + 8 + 0 + 8


def test_pack_views_round_trip() -> None:
    layout = ByteLayout(SPECS)
    tensors = _tensors(SPECS, 0)
    buf = layout.pack(tensors)
    assert buf.dtype == torch.uint8 and buf.shape == (layout.nbytes,)
    views = layout.views(buf)
    assert len(views) == len(SPECS)
    for view, t, (dtype, count) in zip(views, tensors, SPECS, strict=True):
        assert view.dtype == dtype and view.shape == (count,)
        assert torch.equal(view, t)
    # Views alias the buffer: writing through a view changes the packed bytes.
    views[0][2] = 123.5
    assert layout.views(buf)[0][2].item() == 123.5


def test_pack_accepts_any_shape_and_rejects_wrong_count() -> None:
    layout = ByteLayout([(torch.float32, 6), (torch.int32, 2)])
    a = torch.arange(6, dtype=torch.float32).view(2, 3)
    b = torch.tensor([-7, 9], dtype=torch.int32)
    views = layout.views(layout.pack([a, b]))
    assert torch.equal(views[0], a.reshape(-1)) and torch.equal(views[1], b)
    with pytest.raises(ValueError):
        layout.pack([a])


def test_leading_worker_dim() -> None:
    layout = ByteLayout(SPECS)
    per_worker = [_tensors(SPECS, seed) for seed in range(3)]
    stacked = torch.stack([layout.pack(ts) for ts in per_worker])
    assert stacked.shape == (3, layout.nbytes)
    views = layout.views(stacked)
    for j, (dtype, count) in enumerate(SPECS):
        assert views[j].dtype == dtype
        assert views[j].shape == (3, count)
        expected = torch.stack([ts[j] for ts in per_worker])
        assert torch.equal(views[j], expected)
    # Rows really differ (otherwise a wrong row order would pass unnoticed).
    assert not torch.equal(views[0][0], views[0][1])


def test_empty_layout() -> None:
    layout = ByteLayout([])
    assert layout.nbytes == 0
    assert layout.views(layout.pack([])) == []


@pytest.mark.parametrize(
    ("sizes", "expected"),
    [
        ([], [0]),
        ([5], [0, 5]),
        ([3, 0, 5], [0, 3, 3, 8]),
        ([1, 2, 3, 4], [0, 1, 3, 6, 10]),
    ],
)
def test_flat_offsets(sizes: list[int], expected: list[int]) -> None:
    assert flat_offsets(sizes) == expected


def test_flat_offsets_split_a_buffer() -> None:
    tensors = [torch.randn(n) for n in (4, 1, 7)]
    flat = torch.cat(tensors)
    offs = flat_offsets([t.numel() for t in tensors])
    for t, a, b in zip(tensors, offs, offs[1:], strict=False):
        assert torch.equal(flat[a:b], t)
    assert offs[-1] == flat.numel()
