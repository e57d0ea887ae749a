"""Every reducer of the registry driven over a world-size-1 gloo group: what one bucket becomes, error
feedback, the rounds of the low-rank methods, and pairings a pattern refuses."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch

import gradzip
from gradzip.comm.collectives import Comm
from gradzip.compress.base import Capabilities
from gradzip.compress.identity import Half, Identity
from gradzip.compress.sign import ScaledSign
from gradzip.reducers.elementwise import ElementwiseReducer
from gradzip.reducers.reducer import Bucket
from gradzip.registry import get_spec, make_config


def _gen(seed: int) -> torch.Generator:
    g = torch.Generator()
    g.manual_seed(seed)
    return g


class _TwoRounds(Identity):
    name = "two-rounds"
    caps = Capabilities(summable=True, fixed_size=True, rounds=2)


class _VariableSize(ScaledSign):
    name = "variable"
    caps = Capabilities(summable=False, fixed_size=False)


def test_elementwise_rejects_incompatible_caps(group: None) -> None:
    with pytest.raises(ValueError, match="rounds"):
        ElementwiseReducer(_TwoRounds(), Comm(), 2.0, True)
    with pytest.raises(ValueError, match="variable-size"):
        ElementwiseReducer(_VariableSize(), Comm(), 2.0, True)
    with pytest.raises(ValueError, match="float32"):
        ElementwiseReducer(Half(), Comm(), 2.0, True)  # summable but not float32: cannot fuse
    # Controls: the same classes with compatible caps build.
    ElementwiseReducer(Identity(), Comm(), 2.0, True)
    ElementwiseReducer(ScaledSign(), Comm(), 2.0, True)


# ------------------------------------------------------------------------------ registry methods, world 1

SHAPES = [(32, 16), (64, 8), (16,)]
KEYS = ["w1", "w2", "bias"]
LOWRANK = {"powersgd", "acpsgd"}
ELEMENTWISE_EF = {"signsgd", "topk", "randomk"}


def _grads(step: int, dtype: torch.dtype = torch.float32) -> list[torch.Tensor]:
    g = _gen(100 + step)
    return [torch.randn(s, generator=g, dtype=dtype) for s in SHAPES]


def _clone(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.clone()


def _options(name: str) -> dict[str, Any]:
    return {"rank": 2} if name in LOWRANK else {}


@pytest.mark.parametrize("name", gradzip.methods("hook"))
def test_method_reduces_bucket(group: None, name: str) -> None:
    cfg = make_config(name, **_options(name))
    reducer = get_spec(name).build(cfg, Comm())
    old_ds: list[dict[str, torch.Tensor]] = []  # doublesqueeze's worker and server residuals before the step
    for step in range(4):
        grads = _grads(step)
        bucket = Bucket.of(grads, KEYS)
        ef = getattr(reducer, "ef", None)
        # Clones: low-rank methods update the residual in place.
        old = {k: _clone(ef.residuals.get(k)) for k in KEYS} if ef is not None else {}
        out = reducer.launch(bucket).wait()
        assert out is bucket.buffer
        assert reducer.step == step + 1
        if name == "ssgd":
            assert torch.equal(bucket.buffer, torch.cat([g.reshape(-1) for g in grads]))
            continue
        if name == "fp16":
            for got, g in zip(bucket.grads, grads, strict=True):
                torch.testing.assert_close(got, g, rtol=1e-3, atol=1e-3)
            assert not torch.equal(bucket.buffer, torch.cat([g.reshape(-1) for g in grads]))
            continue
        if name == "doublesqueeze":
            # Every tensor is compressed twice (worker, then server), and what both passes left out is kept:
            # g + d_w + d_s == output + d_w' + d_s' (one worker, so the server's mean is that worker's C(v)).
            w, s = reducer.worker_ef.residuals, reducer.server_ef.residuals  # type: ignore[attr-defined]
            for i, (got, g) in enumerate(zip(bucket.grads, grads, strict=True)):
                assert not torch.allclose(got, g), f"doublesqueeze: {KEYS[i]} should be compressed"
                before = g.reshape(-1) + sum(old_[KEYS[i]] for old_ in old_ds if KEYS[i] in old_)
                after = got.reshape(-1) + w[KEYS[i]] + s[KEYS[i]]
                torch.testing.assert_close(before, after, rtol=0, atol=1e-5)
            old_ds = [{k: v.clone() for k, v in w.items()}, {k: v.clone() for k, v in s.items()}]
            continue
        # 1-D tensors always travel raw: exact with one worker.
        assert torch.equal(bucket.grads[2], grads[2])
        for i in (0, 1):
            got, g = bucket.grads[i], grads[i]
            assert not torch.allclose(got, g), f"{name}: matrix {KEYS[i]} should be compressed"
            if ef is not None:
                e_old = old[KEYS[i]]
                p = g if e_old is None else g + e_old.view_as(g)
                e_new = ef.residuals[KEYS[i]].view_as(g)
                torch.testing.assert_close(p, got + e_new, rtol=0, atol=1e-5)
            if name == "qsgd":  # no error feedback by default; each element off by at most one step
                step_size = float(g.norm()) / cfg.levels  # type: ignore[attr-defined]
                assert float((got - g).abs().max()) <= step_size * (1 + 1e-5)
            if name in LOWRANK:
                assert int(torch.linalg.matrix_rank(got, rtol=1e-4)) <= 2


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("name", sorted(LOWRANK))
def test_lowrank_error_feedback_invariant(group: None, name: str, dtype: torch.dtype) -> None:
    """(G + e_old) == transmitted approximation + e_new, per compressed matrix, P- and Q-steps alike, for a
    float32 and a float64 model (whose first factor is drawn in float32 and moved to the model's dtype)."""
    atol = 1e-12 if dtype == torch.float64 else 1e-5
    reducer = get_spec(name).build(make_config(name, rank=2), Comm())
    for step in range(4):
        grads = _grads(step, dtype)
        bucket = Bucket.of(grads, KEYS)
        old = {k: _clone(reducer.ef.residuals.get(k)) for k in KEYS[:2]}
        reducer.launch(bucket).wait()
        assert bucket.buffer.dtype == dtype
        assert torch.equal(bucket.grads[2], grads[2])
        for i, key in enumerate(KEYS[:2]):
            g = grads[i]
            p = g if old[key] is None else g + old[key].view_as(g)
            approx = bucket.grads[i]
            e_new = reducer.ef.residuals[key].view_as(g)
            torch.testing.assert_close(p, approx + e_new, rtol=0, atol=atol)
            assert float(e_new.norm()) > 0.1 * float(g.norm())  # rank 2 of a random matrix loses a lot
            assert int(torch.linalg.matrix_rank(approx, rtol=1e-4)) == 2


def test_acpsgd_alternates_p_and_q(group: None) -> None:
    rank = 2
    comm = Comm()
    comm.trace = []
    reducer = get_spec("acpsgd").build(make_config("acpsgd", rank=rank), comm)
    matrices = [s for s in SHAPES if len(s) == 2]
    raw = sum(math.prod(s) for s in SHAPES if len(s) == 1)
    p_size = sum(rows * rank for rows, _ in matrices) + raw
    q_size = sum(cols * rank for _, cols in matrices) + raw
    assert p_size != q_size
    for step in range(4):
        reducer.launch(Bucket.of(_grads(step), KEYS)).wait()
    assert comm.trace == [
        ("all_reduce", (p_size,), torch.float32),
        ("all_reduce", (q_size,), torch.float32),
        ("all_reduce", (p_size,), torch.float32),
        ("all_reduce", (q_size,), torch.float32),
    ]


def test_powersgd_two_rounds_per_step(group: None) -> None:
    rank = 2
    comm = Comm()
    comm.trace = []
    reducer = get_spec("powersgd").build(make_config("powersgd", rank=rank), comm)
    for step in range(2):
        reducer.launch(Bucket.of(_grads(step), KEYS)).wait()
    p_size = 32 * rank + 64 * rank + 16
    q_size = 16 * rank + 8 * rank
    assert [shape for _, shape, _ in comm.trace] == [(p_size,), (q_size,)] * 2
