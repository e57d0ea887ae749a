"""The fused low-rank kernels (C, CPU float32) against the torch path that computes the same thing."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from gradzip.compress import fused

Op = Callable[[], torch.Tensor]


def torch_path(monkeypatch: pytest.MonkeyPatch, op: Op) -> torch.Tensor:
    with monkeypatch.context() as m:
        m.setattr(fused, "_library", lambda: None)
        return op()


def test_the_kernels_are_built_on_this_machine() -> None:
    # CI's machine has a C compiler: a build failure must show here, not as a silent fallback.
    assert fused.available()


SHAPES = [(64, 64, 4), (37, 13, 3), (5, 1000, 1), (300, 129, 8), (1, 9, 2), (200, 300, 32)]


@pytest.fixture(autouse=True)
def every_rank_fused(monkeypatch: pytest.MonkeyPatch) -> None:
    """The C kernels take ranks up to 32; gradzip uses them up to ``MAX_RANK`` (8), where MKL stops losing.
    Lifting the limit here makes every shape above, rank 32 included, run the C kernels against torch."""
    monkeypatch.setattr(fused, "MAX_RANK", 32)


@pytest.mark.parametrize(("rows", "cols", "r"), SHAPES)
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("with_g", [True, False])
def test_compensate_and_project_match_torch(
    rows: int, cols: int, r: int, threads: int, with_g: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    gen = torch.Generator().manual_seed(rows * cols + r)
    e0, g = torch.randn(rows, cols, generator=gen), torch.randn(rows, cols, generator=gen)
    qt = torch.randn(r, cols, generator=gen)
    p = torch.randn(r, rows, generator=gen).T  # a transposed view: the kernels read left factors by stride
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for project, factor, n in (
            (fused.compensate_project_right, qt, rows),
            (fused.compensate_project_left, p, cols),
        ):
            got_e, want_e = e0.clone(), e0.clone()
            got = project(got_e, g if with_g else None, factor, torch.empty(r, n))
            want = torch_path(
                monkeypatch,
                lambda f=factor, w=want_e, n=n, op=project: op(
                    w, g if with_g else None, f, torch.empty(r, n)
                ),
            )
            assert torch.equal(got_e, want_e)  # e + g is exact in both
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4)
            if with_g:  # negative control: projecting e without adding g gives something else
                assert not torch.allclose(
                    got, project(e0.clone(), None, factor, torch.empty(r, n)), atol=1e-2
                )
    finally:
        torch.set_num_threads(previous)


@pytest.mark.parametrize(("rows", "cols", "r"), SHAPES[:4])
def test_compensate_into_a_second_buffer_leaves_e_as_it_was(
    rows: int, cols: int, r: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Staged residuals (``nan_policy="skip"``): ``M = e + g`` goes to ``m`` and ``e`` stays untouched, with the
    same projection and the same ``M``, bit for bit, as the in-place form."""
    gen = torch.Generator().manual_seed(rows + cols * r)
    e0, g = torch.randn(rows, cols, generator=gen), torch.randn(rows, cols, generator=gen)
    qt, p = torch.randn(r, cols, generator=gen), torch.randn(r, rows, generator=gen).T
    for project, factor, n in (
        (fused.compensate_project_right, qt, rows),
        (fused.compensate_project_left, p, cols),
    ):
        for run in (lambda op: op(), lambda op: torch_path(monkeypatch, op)):
            in_place = e0.clone()
            want = run(lambda f=factor, n=n, pr=project, w=in_place: pr(w, g, f, torch.empty(r, n)))
            e, m = e0.clone(), torch.full((rows, cols), float("nan"))
            got = run(lambda f=factor, n=n, pr=project, e=e, m=m: pr(e, g, f, torch.empty(r, n), m))
            assert torch.equal(e, e0)  # the kept residual is untouched
            assert torch.equal(m, in_place) and torch.equal(got, want)


@pytest.mark.parametrize(("rows", "cols", "r"), SHAPES)
@pytest.mark.parametrize("same", [True, False])
def test_residual_expand_matches_torch(
    rows: int, cols: int, r: int, same: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    gen = torch.Generator().manual_seed(7 * rows + cols)
    e0 = torch.randn(rows, cols, generator=gen)
    a, bt = torch.randn(rows, r, generator=gen), torch.randn(r, cols, generator=gen)
    c, dt = torch.randn(r, rows, generator=gen).T, torch.randn(r, cols, generator=gen)
    extra = () if same else (c, dt)
    got_e, want_e = e0.clone(), e0.clone()
    got = fused.residual_expand(got_e, a, bt, torch.empty(rows, cols), *extra)
    want = torch_path(
        monkeypatch, lambda: fused.residual_expand(want_e, a, bt, torch.empty(rows, cols), *extra)
    )
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(got_e, want_e, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(got_e, e0 - a @ bt, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(got, (a @ bt) if same else (c @ dt), rtol=1e-5, atol=1e-4)


def test_other_tensors_take_the_torch_path_and_bad_shapes_are_refused(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.undo()  # the shipped rank limit
    e32 = torch.randn(6, 5)
    assert fused._fusable(fused.MAX_RANK, e32) is not None  # control: CPU float32 at the limit is fused
    assert fused._fusable(fused.MAX_RANK + 1, e32) is None  # above it, MKL's GEMMs win: the torch path
    assert fused._fusable(4, e32.double()) is None
    e = torch.randn(6, 5, dtype=torch.float64)
    out = fused.compensate_project_right(
        e.clone(), e, torch.randn(2, 5, dtype=torch.float64), torch.empty(2, 6, dtype=torch.float64)
    )
    assert out.dtype == torch.float64 and out.shape == (2, 6)
    with pytest.raises(ValueError, match="expected"):
        fused.compensate_project_right(torch.randn(6, 5), None, torch.randn(2, 4), torch.empty(2, 6))
    with pytest.raises(ValueError, match="differ"):
        fused.compensate_project_left(
            torch.randn(6, 5), torch.randn(5, 6), torch.randn(6, 2), torch.empty(2, 5)
        )
