"""The element-wise compressors, alone: payload sizes, error feedback, and each family's own rules."""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import torch

from gradzip.compress.base import Compressor
from gradzip.compress.feedback import ErrorFeedback, Velocity
from gradzip.compress.identity import Half, Identity
from gradzip.compress.qsgd import QSGD
from gradzip.compress.randomk import RandomK
from gradzip.compress.sign import ScaledSign, pack_bits, unpack_bits
from gradzip.compress.topk import TopK, k_of

# name -> factory; every element-wise compressor configuration under test
FACTORIES: dict[str, Callable[[], Compressor]] = {
    "identity": lambda: Identity(),
    "half": lambda: Half(),
    "sign": lambda: ScaledSign(),
    "sign-majority": lambda: ScaledSign(majority_vote=True),
    "topk-0.01": lambda: TopK(0.01),
    "topk-0.3": lambda: TopK(0.3),
    "topk-1.0": lambda: TopK(1.0),
    "randomk": lambda: RandomK(0.1, seed=3),
    "qsgd-1": lambda: QSGD(1, seed=1),
    "qsgd-4": lambda: QSGD(4, seed=1),
    "qsgd-127": lambda: QSGD(127, seed=1),
}
LOSSLESS = {"identity", "topk-1.0"}


def _gen(seed: int) -> torch.Generator:
    g = torch.Generator()
    g.manual_seed(seed)
    return g


# ------------------------------------------------------------------------------------- payload sizes


@pytest.mark.parametrize("name", list(FACTORIES))
@pytest.mark.parametrize("numel", [1, 7, 8, 9, 1000])
def test_payload_spec_matches_encode(name: str, numel: int) -> None:
    comp = FACTORIES[name]()
    x = torch.randn(numel, generator=_gen(numel))
    payload, _ = comp.encode(x)
    spec = comp.payload_spec(numel)
    assert [(t.dtype, t.numel()) for t in payload] == spec
    assert all(t.dim() == 1 for t in payload)
    assert comp.payload_nbytes(numel) == sum(t.nbytes for t in payload)


# ------------------------------------------------------------------------------------- error feedback


@pytest.mark.parametrize("name", list(FACTORIES))
def test_error_feedback_invariant_float64(name: str) -> None:
    comp = FACTORIES[name]()
    ef = ErrorFeedback()
    g = _gen(7)
    n = 97
    e_prev = torch.zeros(n, dtype=torch.float64)
    sent_total = torch.zeros(n, dtype=torch.float64)
    grad_total = torch.zeros(n, dtype=torch.float64)
    residual_norms = []
    for _ in range(5):
        grad = torch.randn(n, generator=g, dtype=torch.float64)
        p = ef.compensate("w", grad)
        torch.testing.assert_close(p, grad + e_prev, rtol=0, atol=1e-12)
        payload, ctx = comp.encode(p)
        approx = comp.decode(payload, ctx, n)
        residual = comp.residual(p, payload, ctx)
        # The overrides (topk, randomk) agree with the default p - decode(...).
        torch.testing.assert_close(residual.double(), (p - approx).double(), rtol=0, atol=1e-12)
        ef.set("w", residual)
        torch.testing.assert_close(p, approx.double() + ef.residuals["w"].double(), rtol=0, atol=1e-12)
        residual_norms.append(float(residual.norm()))
        e_prev = ef.residuals["w"].double().clone()
        sent_total += approx.double()
        grad_total += grad
    # Telescoping: everything sent plus what is still held back is everything computed.
    torch.testing.assert_close(sent_total + e_prev, grad_total, rtol=0, atol=1e-10)
    if name in LOSSLESS:
        assert max(residual_norms) == 0.0
    else:
        assert min(residual_norms) > 1e-3, "a lossy compressor must leave a nonzero residual"


def test_loaded_residuals_and_velocity_follow_the_gradient() -> None:
    """State loaded from elsewhere (a checkpoint loaded with map_location="cpu" and trained on a GPU; here a
    float64 state and a float32 gradient, the same code path on a CPU-only machine) moves to the gradient's
    device and dtype instead of failing on the first step."""
    g = torch.ones(4)
    ef, velocity = ErrorFeedback(), Velocity(0.5)
    ef.load_state_dict({"w": torch.full((4,), 2.0, dtype=torch.float64)})
    velocity.load_state_dict({"w": torch.full((4,), 2.0, dtype=torch.float64)})
    assert ef.compensate("w", g).dtype == torch.float32
    u = velocity("w", g)
    assert u.dtype == torch.float32 and torch.equal(u, torch.full((4,), 2.0))  # 0.5 * 2 + 1
    assert velocity.buffers["w"] is u  # kept, moved, for the next step


def test_staged_state_is_kept_until_commit_and_dropped_by_rollback() -> None:
    """``nan_policy="skip"``: a step's new residual and velocity go to second buffers; ``commit`` makes them
    the kept ones, ``rollback`` leaves the kept ones bit for bit as they were; the numbers are the same as
    the in-place (unstaged) form's."""
    g1, g2 = torch.randn(6), torch.randn(6)
    plain, staged = ErrorFeedback(), ErrorFeedback(staged=True)
    uplain, ustaged = Velocity(0.9), Velocity(0.9, staged=True)
    for ef, u in ((plain, uplain), (staged, ustaged)):
        ef.compensate("w", u("w", g1)).mul_(0.5)  # the caller leaves the new residual in the buffer
        ef.commit()
        u.commit()
    assert torch.equal(staged.residuals["w"], plain.residuals["w"])
    kept, vel = staged.residuals["w"].clone(), ustaged.buffers["w"].clone()
    p = staged.compensate("w", ustaged("w", g2))
    assert p is not staged.residuals["w"] and torch.equal(staged.residuals["w"], kept)  # not yet
    staged.rollback()
    ustaged.rollback()
    assert torch.equal(staged.residuals["w"], kept) and torch.equal(ustaged.buffers["w"], vel)
    for ef, u in ((plain, uplain), (staged, ustaged)):
        ef.compensate("w", u("w", g2))
        ef.commit()
        u.commit()
    assert torch.equal(staged.residuals["w"], plain.residuals["w"])
    assert torch.equal(ustaged.buffers["w"], uplain.buffers["w"])
    # A first step that is rolled back leaves no residual at all, and in place there is nothing to undo.
    fresh = ErrorFeedback(staged=True)
    fresh.compensate("b", g1)
    fresh.rollback()
    assert fresh.residuals == {}
    with pytest.raises(RuntimeError, match="cannot be rolled back"):
        plain.rollback()


# ------------------------------------------------------------------------------------------------ sign


def test_sign_decode_is_scaled_sign_with_zero_positive() -> None:
    x = torch.randn(37, generator=_gen(2))
    x[[0, 5, 36]] = 0.0
    comp = ScaledSign()
    payload, ctx = comp.encode(x)
    out = comp.decode(payload, ctx, x.numel())
    expected = x.abs().mean() * torch.where(x >= 0, 1.0, -1.0)
    assert torch.equal(out, expected)
    assert (out[[0, 5, 36]] > 0).all()
    assert payload[0].item() == pytest.approx(float(x.abs().mean()))


@pytest.mark.parametrize("n", [1, 3, 7, 9, 15, 17, 101])
def test_pack_unpack_bits_round_trip(n: int) -> None:
    g = _gen(n)
    bits = torch.rand(n, generator=g) < 0.5
    packed = pack_bits(bits)
    assert packed.dtype == torch.uint8 and packed.numel() == -(-n // 8)
    assert torch.equal(unpack_bits(packed, n), bits)
    # A leading worker dim: each worker packs its own row, the gathered rows unpack together.
    rows = torch.rand(3, n, generator=g) < 0.5
    stacked = torch.stack([pack_bits(r) for r in rows])
    unpacked = unpack_bits(stacked, n)
    assert unpacked.shape == (3, n)
    assert torch.equal(unpacked, rows)


def test_pack_bits_lsb_first() -> None:
    # The order of a SIMD sign mask, which the C kernel stores as is.
    packed = pack_bits(torch.tensor([True, True, False, False, False, False, False, False, True]))
    assert packed.tolist() == [0b00000011, 0b00000001]


def test_sign_aggregates_by_hand() -> None:
    n = 29
    g = _gen(4)
    xs = [torch.randn(n, generator=g) * (i + 1) for i in range(3)]
    payloads = [ScaledSign().encode(x)[0] for x in xs]
    gathered = [torch.stack([p[j] for p in payloads]) for j in range(2)]
    assert gathered[0].shape == (3, 1) and gathered[1].shape == (3, -(-n // 8))

    signs = torch.stack([torch.where(x >= 0, 1.0, -1.0) for x in xs])
    scales = torch.stack([x.abs().mean() for x in xs])
    majority = ScaledSign(majority_vote=True).aggregate(gathered, n)
    expected_majority = torch.sign(signs.sum(0)) * scales.mean()
    torch.testing.assert_close(majority, expected_majority)

    plain = ScaledSign().aggregate(gathered, n)
    expected_plain = torch.stack([s * sc for s, sc in zip(signs, scales, strict=True)]).mean(0)
    torch.testing.assert_close(plain, expected_plain)
    assert not torch.allclose(plain, majority)  # the two aggregations really differ


# ------------------------------------------------------------------------------------------------ topk


@pytest.mark.parametrize(("density", "numel"), [(0.01, 1000), (0.3, 7), (0.3, 1000), (1.0, 9), (1e-6, 5)])
def test_topk_keeps_largest(density: float, numel: int) -> None:
    k = max(1, min(numel, math.ceil(density * numel)))
    assert k_of(density, numel) == k
    x = torch.randn(numel, generator=_gen(numel))
    comp = TopK(density)
    (values, indices), ctx = comp.encode(x)
    assert indices.numel() == k
    assert set(indices.tolist()) == set(torch.topk(x.abs(), k).indices.tolist())
    assert torch.equal(values, x[indices.long()])
    dense = comp.decode([values, indices], ctx, numel)
    assert int((dense != 0).sum()) == k


def test_topk_k_clamped() -> None:
    assert k_of(0.0001, 10) == 1
    assert k_of(1.0, 10) == 10
    assert k_of(0.25, 10) == 3
    assert k_of(0.01, 0) == 0  # an empty part of a small tensor sends nothing


@pytest.mark.parametrize("name", list(FACTORIES))
def test_an_empty_tensor_encodes_to_an_empty_payload(name: str) -> None:
    """DoubleSqueeze cuts every tensor into one part per server: a 1-element tensor (PReLU's weight) leaves
    empty parts, which every compressor must encode, decode and aggregate without an error or a NaN."""
    comp = FACTORIES[name]()
    x = torch.zeros(0)
    payload, ctx = comp.encode(x)
    assert [(t.dtype, t.numel()) for t in payload] == comp.payload_spec(0)
    assert all(bool(torch.isfinite(t.float()).all()) for t in payload)
    assert comp.decode(payload, ctx, 0).numel() == 0
    gathered = [t.unsqueeze(0).repeat(2, *[1] * t.dim()) for t in payload]  # two senders
    assert comp.aggregate(gathered, 0, comp.shared_context(0, x.device)).numel() == 0
    assert comp.residual(x, payload, ctx).numel() == 0


def test_topk_aggregate_with_overlaps() -> None:
    n, density = 40, 0.1
    g = _gen(5)
    base = torch.zeros(n)
    base[[3, 17]] = 10.0  # every worker keeps these two
    xs = [base + torch.randn(n, generator=g) for _ in range(3)]
    comp = TopK(density)
    payloads = [comp.encode(x)[0] for x in xs]
    idx_sets = [set(p[1].tolist()) for p in payloads]
    assert {3, 17} <= idx_sets[0] & idx_sets[1] & idx_sets[2]  # the overlap is really exercised
    gathered = [torch.stack([p[0] for p in payloads]), torch.stack([p[1] for p in payloads])]
    assert gathered[0].shape == (3, k_of(density, n))
    agg = comp.aggregate(gathered, n)
    expected = torch.stack([comp.decode(p, None, n) for p in payloads]).mean(0)
    torch.testing.assert_close(agg, expected)
    assert agg[3] == pytest.approx(float(sum(x[3] for x in xs)) / 3, rel=1e-6)


# --------------------------------------------------------------------------------------------- randomk


def test_randomk_shared_seed_same_indices() -> None:
    a, b, c = RandomK(0.2, seed=11), RandomK(0.2, seed=11), RandomK(0.2, seed=12)
    g = _gen(0)
    differs = False
    for _ in range(6):
        xa, xb = torch.randn(100, generator=g), torch.randn(100, generator=g)
        _, ia = a.encode(xa)
        _, ib = b.encode(xb)
        _, ic = c.encode(xa)
        assert torch.equal(ia, ib)
        differs |= not torch.equal(ia, ic)
    assert differs


def test_randomk_summable_is_honest() -> None:
    n = 50
    w1, w2, ref = RandomK(0.3, seed=9), RandomK(0.3, seed=9), RandomK(0.3, seed=9)
    g = _gen(1)
    for _ in range(3):
        x1, x2 = (
            torch.randn(n, generator=g, dtype=torch.float64),
            torch.randn(n, generator=g, dtype=torch.float64),
        )
        (v1,), c1 = w1.encode(x1)
        (v2,), c2 = w2.encode(x2)
        (v12,), c12 = ref.encode(x1 + x2)
        assert torch.equal(c1, c2) and torch.equal(c1, c12)
        torch.testing.assert_close(v1 + v2, v12)  # payload of the sum == sum of payloads
        summed = w1.decode([v1 + v2], c1, n)
        torch.testing.assert_close(summed, w1.decode([v1], c1, n) + w2.decode([v2], c2, n))
        assert (summed != 0).any()


def test_randomk_state_dict_restores_stream() -> None:
    comp = RandomK(0.1, seed=4)
    x = torch.randn(200, generator=_gen(2))
    for _ in range(3):
        comp.encode(x)
    sd = comp.state_dict()
    first = [comp.encode(x)[1] for _ in range(3)]
    after = [comp.encode(x)[1] for _ in range(3)]
    assert any(not torch.equal(f, a) for f, a in zip(first, after, strict=True))  # the stream moves on
    comp.load_state_dict(sd)
    again = [comp.encode(x)[1] for _ in range(3)]
    assert all(torch.equal(f, a) for f, a in zip(first, again, strict=True))
    fresh = RandomK(0.1, seed=0)
    fresh.load_state_dict(sd)
    assert torch.equal(fresh.encode(x)[1], first[0])


# ------------------------------------------------------------------------------------------------ qsgd


def _mean_of_draws(comp: Compressor, x: torch.Tensor, draws: int) -> torch.Tensor:
    total = torch.zeros_like(x, dtype=torch.float64)
    for _ in range(draws):
        payload, ctx = comp.encode(x)
        total += comp.decode(payload, ctx, x.numel()).double()
    return total / draws


@pytest.mark.parametrize("levels", [1, 4])
def test_qsgd_unbiased_and_sign_is_not(levels: int) -> None:
    draws = 2000
    x = torch.randn(40, generator=_gen(levels))
    norm = float(x.norm())
    a = x.abs().double() / norm * levels
    frac = a - a.floor()
    std = norm / levels * torch.sqrt(frac * (1 - frac) / draws)  # std of the mean of the draws
    tol = 5 * std + 1e-5 * norm

    mean = _mean_of_draws(QSGD(levels, seed=3), x, draws)
    assert ((mean - x.double()).abs() <= tol).all()
    # Negative control: the biased scaled sign is far outside the same tolerance.
    biased = _mean_of_draws(ScaledSign(), x, 10)
    assert ((biased - x.double()).abs() > tol).float().mean() > 0.5
    # And the test can see a bias as small as one quantization step on one coordinate.
    shifted = mean.clone()
    shifted[0] += norm / levels * 0.2
    assert not ((shifted - x.double()).abs() <= tol).all()


@pytest.mark.parametrize("levels", [1, 4, 127])
def test_qsgd_levels_and_norm(levels: int) -> None:
    comp = QSGD(levels, seed=0)
    x = torch.randn(300, generator=_gen(levels))
    x[0] = x.abs().max() * 50  # one dominant element: a is close to s
    (norm, q), _ = comp.encode(x)
    assert norm.item() == pytest.approx(float(x.norm()), rel=1e-6)
    assert q.dtype == torch.int8
    assert int(q.abs().max()) <= levels
    assert int(q[0]) in (levels - 1, levels)
    a = x.abs() / x.norm() * levels
    lv = q.abs().to(torch.float32)
    assert ((lv == a.floor()) | (lv == a.floor() + 1)).all()
    nonzero = q != 0
    assert torch.equal(torch.sign(q[nonzero]).float(), torch.sign(x[nonzero]))


def test_qsgd_owns_its_generator() -> None:
    x = torch.randn(500, generator=_gen(0))
    torch.manual_seed(1234)
    state = torch.random.get_rng_state()
    a = QSGD(4, seed=21).encode(x)[0]
    assert torch.equal(torch.random.get_rng_state(), state)
    b = QSGD(4, seed=21).encode(x)[0]
    c = QSGD(4, seed=22).encode(x)[0]
    assert torch.equal(a[1], b[1]) and torch.equal(a[0], b[0])
    assert not torch.equal(a[1], c[1])
    # Global seeding does not change a seeded compressor's output either.
    torch.manual_seed(999)
    assert torch.equal(QSGD(4, seed=21).encode(x)[0][1], a[1])
