"""The element-wise compressors' C kernels against their torch path: the same payload bits, the same residuals
and the same aggregate, on odd shapes, empty and one-element tensors, one and two threads."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch

from gradzip.compress import elementwise_kernels, fused, topk
from gradzip.compress.base import Compressor
from gradzip.compress.qsgd import QSGD, counter_uniforms
from gradzip.compress.sign import ScaledSign
from gradzip.compress.topk import TopK, k_of

# Empty, one element, around a byte of sign bits, odd; the largest take top-k's sampled selection.
SIZES = [0, 1, 7, 8, 9, 1001, 40_009, 300_007]


@pytest.fixture(params=[1, 3], ids=["1thread", "3threads"])
def threads(request: pytest.FixtureRequest) -> Iterator[int]:
    previous = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(previous)


def torch_path(monkeypatch: pytest.MonkeyPatch, run: Callable[[], Any]) -> Any:
    with monkeypatch.context() as m:
        m.setattr(fused, "_library", lambda: None)
        return run()


def make(name: str) -> Compressor:
    return {"sign": ScaledSign(), "qsgd": QSGD(16, seed=3), "topk": TopK(0.01)}[name]


def encode(
    name: str, e: torch.Tensor, g: torch.Tensor, staged: bool
) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Error feedback's step as the reducers run it: ``p = e + g`` formed by the encoding (into a second
    buffer, or into ``e`` itself), then the residual in place. Returns the payload and the residual."""
    comp = make(name)
    comp.select_stream("layer.weight", 5)
    e = e.clone()
    p = torch.empty_like(e) if staged else e
    payload, ctx = comp.encode_sum(e, g, p)
    comp.residual_(p, payload, ctx)
    return payload, p


def same_payload(name: str, got: list[torch.Tensor], want: list[torch.Tensor]) -> None:
    if name == "topk":  # the same entries, in whatever order each path lists them
        gv, gi = got
        wv, wi = want
        go, wo = gi.argsort(), wi.argsort()
        assert torch.equal(gi[go], wi[wo]) and torch.equal(gv[go], wv[wo])
        return
    for a, b in zip(got, want, strict=True):
        assert a.dtype == b.dtype and torch.equal(a, b)


@pytest.mark.parametrize("staged", [True, False], ids=["staged", "in-place"])
@pytest.mark.parametrize("numel", SIZES)
@pytest.mark.parametrize("name", ["sign", "qsgd", "topk"])
def test_encode_and_residual_match_torch(
    name: str, numel: int, staged: bool, threads: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    gen = torch.Generator().manual_seed(numel)
    e, g = torch.randn(numel, generator=gen) * 0.3, torch.randn(numel, generator=gen)
    if numel > 4:
        g[3] = 0.0
        g[4] = -0.0  # sign(-0.0) is +1 for both paths: >= 0
        e[3] = e[4] = 0.0
    got_payload, got_residual = encode(name, e, g, staged)
    want_payload, want_residual = torch_path(monkeypatch, lambda: encode(name, e, g, staged))
    same_payload(name, got_payload, want_payload)
    assert torch.equal(got_residual, want_residual)
    if name == "topk" and numel:  # every entry left out is smaller than every one sent
        sent = got_payload[0].abs().min()
        assert got_residual.abs().max() <= sent


@pytest.mark.parametrize("numel", [0, 1, 9, 1001, 140_009])  # the largest is split over threads
@pytest.mark.parametrize("name", ["sign", "sign-vote", "qsgd"])
def test_aggregate_matches_torch(
    name: str, numel: int, threads: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Three workers' payloads, decoded one worker at a time into the output."""
    comp: Compressor = ScaledSign(majority_vote=True) if name == "sign-vote" else make(name.split("-")[0])
    rows = []
    for w in range(3):
        x = torch.randn(numel, generator=torch.Generator().manual_seed(w)) * (w + 1)
        comp.select_stream("t", w)
        rows.append(comp.encode(x)[0])
    gathered = [torch.stack([r[i] for r in rows]) for i in range(len(rows[0]))]
    got = comp.aggregate(gathered, numel, out=torch.full((numel,), float("nan")))
    want = torch_path(monkeypatch, lambda: comp.aggregate(gathered, numel))
    assert torch.equal(got, want)
    if numel:  # against decoding all at once (the old [world, numel] way), for a reference by other means
        if name == "sign-vote":
            ref = torch.sign(
                sum(comp.decode([s, b], None, numel).sign() for s, b in zip(*gathered, strict=True))
            )
            ref = ref * gathered[0].mean()
        else:
            ref = comp.decode(gathered, None, numel).mean(0)
        torch.testing.assert_close(got, ref)


def test_aggregate_streams_over_workers() -> None:
    """Peak extra memory O(numel), not O(world x numel): no allocation of a [world, numel] float temporary
    (a negative control decodes all at once and is seen)."""
    world, numel = 16, 50_000
    comp = ScaledSign()
    payloads = [comp.encode(torch.randn(numel))[0] for _ in range(world)]
    gathered = [torch.stack([p[i] for p in payloads]) for i in range(2)]

    def largest_allocation(run: Callable[[], object]) -> int:
        with torch.profiler.profile(
            activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True
        ) as prof:
            run()
        return max((ev.cpu_memory_usage for ev in prof.events()), default=0)

    out = torch.empty(numel)
    for lib in (fused._library, lambda: None):  # the C kernel and the torch path
        fused_lib = fused._library
        fused._library = lib  # type: ignore[method-assign]
        try:
            assert largest_allocation(lambda: comp.aggregate(gathered, numel, out=out)) < 2 * numel * 4
        finally:
            fused._library = fused_lib  # type: ignore[method-assign]
    assert largest_allocation(lambda: comp.decode(gathered, None, numel).mean(0)) >= world * numel * 4


def test_qsgd_uniforms_are_the_kernels_and_look_uniform() -> None:
    u = counter_uniforms(1 << 20, (12345, 678), torch.device("cpu"))
    assert float(u.min()) >= 0 and float(u.max()) < 1
    assert abs(float(u.mean()) - 0.5) < 2e-3 and abs(float(u.var()) - 1 / 12) < 2e-3
    # Neighbouring elements are not correlated, and another key gives other numbers.
    assert abs(float(torch.corrcoef(torch.stack([u[:-1], u[1:]]))[0, 1])) < 5e-3
    assert not torch.equal(u, counter_uniforms(1 << 20, (12346, 678), torch.device("cpu")))


def test_sampled_topk_falls_back_when_the_estimate_misses(monkeypatch: pytest.MonkeyPatch) -> None:
    """An estimate that lets too few or too many entries through is caught: the result is still the exact
    top-k (a negative control shows the sampled selection ran at all)."""
    gen = torch.Generator().manual_seed(0)
    e, g = torch.randn(300_007, generator=gen), torch.randn(300_007, generator=gen)
    k = k_of(0.01, e.numel())
    want = set(torch.topk((e + g).abs(), k).indices.tolist())
    calls = []
    real = elementwise_kernels.select_abs_ge

    def counting(*args: Any, **kw: Any) -> Any:
        calls.append(1)
        return real(*args, **kw)

    monkeypatch.setattr(elementwise_kernels, "select_abs_ge", counting)
    for margin in (1.5, 0.2, 50.0):  # about right, far too few, far too many (more than CAP * k)
        monkeypatch.setattr(topk, "MARGIN", margin)
        x = torch.empty_like(e)
        payload, idx = TopK(0.01).encode_sum(e, g, x)
        assert torch.equal(x, e + g)
        assert set(idx.tolist()) == want and torch.equal(payload[0], x[idx])
        found = topk.sampled_topk(x.clone(), k)
        assert (found is not None) == (margin == 1.5)
    assert len(calls) == 6


def test_every_chunk_runs_when_the_runtime_grants_fewer_threads() -> None:
    """The kernels loop over chunks rather than give one to each thread they ask for: with OpenMP limited to
    one thread while torch asks for four, the result is still the whole tensor's (a fresh process, since the
    limit is read when OpenMP starts)."""
    import subprocess
    import sys

    code = (
        "import torch; from gradzip.compress import elementwise_kernels as k; torch.set_num_threads(4);"
        "x = torch.randn(300_007, generator=torch.Generator().manual_seed(0));"
        "total, bits = k.sign_pack(x);"
        "assert abs(total - float(x.abs().sum(dtype=torch.float64))) < 1e-6 * total, total;"
        "assert torch.equal(bits[:-1], k.sign_pack(x.clone())[1][:-1]);"
        "print('ok')"
    )
    env = {**__import__("os").environ, "OMP_THREAD_LIMIT": "1", "OMP_DYNAMIC": "true"}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert done.stdout.strip() == "ok", done.stderr


def test_topk_with_a_nan_sends_what_torch_sends(monkeypatch: pytest.MonkeyPatch) -> None:
    """Under nan_policy="off" a NaN reaches the compressor: both paths rank it first (torch.topk's order)."""
    x = torch.randn(300_007, generator=torch.Generator().manual_seed(2))
    x[12345] = float("nan")
    got, _ = TopK(0.01).encode(x.clone())
    want, _ = torch_path(monkeypatch, lambda: TopK(0.01).encode(x.clone()))
    assert 12345 in got[1].tolist() and 12345 in want[1].tolist()
    assert set(got[1].tolist()) == set(want[1].tolist())


def test_keep_top_breaks_ties_toward_the_lower_index() -> None:
    values = torch.tensor([1.0, -3.0, 2.0, 3.0, -2.0, 2.0, 0.0, -0.0])
    idx = torch.arange(8, dtype=torch.int64)
    got_idx, got_val = elementwise_kernels.keep_top(idx.clone(), values.clone(), 4)
    assert got_idx.tolist() == [1, 2, 3, 4]  # both 3s, then the first two of the three 2s
    assert torch.equal(got_val, values[got_idx])
    for k in range(9):  # every k, against a stable sort by magnitude
        got_idx, _ = elementwise_kernels.keep_top(idx.clone(), values.clone(), k)
        order = sorted(range(8), key=lambda i: (-abs(float(values[i])), i))[:k]
        assert got_idx.tolist() == sorted(order)
