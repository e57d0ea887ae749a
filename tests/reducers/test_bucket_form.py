"""The element-wise compressors' bucket form (``Compressor.encode_bucket``/``aggregate_bucket``): what CUDA runs,
one set of torch calls per bucket. On the CPU it is forced (``ElementwiseReducer.bucket_form``) and compared
with the per-tensor form the CPU runs by default: the same gradients and residuals, bit for bit, on real
workers; and a count of the torch calls that does not grow with the number of tensors in the bucket."""

from __future__ import annotations

from collections import Counter
from typing import Any

import pytest
import torch

from gradzip.bench.kernels import CallCounter
from gradzip.comm.collectives import Comm, SoloComm
from gradzip.comm.finite import NonFiniteGradient
from gradzip.reducers.elementwise import ElementwiseReducer
from gradzip.reducers.reducer import Bucket
from gradzip.registry import get_spec, make_config
from tests.distributed import run_workers

# Odd shapes, a one-element and an empty matrix among them (min_compression_rate 0 compresses every matrix);
# the 1-D tensor travels raw beside them.
SHAPES = [(33, 17), (1, 1), (0, 5), (7,), (64, 9), (3, 100)]
KEYS = [f"t{i}" for i in range(len(SHAPES))]
CASES: list[tuple[str, dict[str, Any]]] = [
    ("signsgd", {}),
    ("signsgd", {"majority_vote": True}),
    ("qsgd", {}),
    ("qsgd", {"error_feedback": True, "levels": 127}),
]


def _reducer(name: str, options: dict[str, Any], comm: Comm, form: bool | None) -> ElementwiseReducer:
    cfg = make_config(name, min_compression_rate=0.0, **options)
    reducer = get_spec(name).build(cfg, comm).use_nan_policy("skip")
    assert isinstance(reducer, ElementwiseReducer)
    reducer.bucket_form = form
    return reducer


def _grads(
    rank: int, step: int, shapes: list[tuple[int, ...]] = SHAPES, dtype: torch.dtype = torch.float32
) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1000 * rank + step)
    return [(torch.randn(s, generator=g) * (1 + i)).to(dtype) for i, s in enumerate(shapes)]


# float64 gradients (the torch path on both forms; the sums in float64 on both)
FLOAT64_CASES = [("signsgd", {}), ("qsgd", {"error_feedback": True, "levels": 127})]


def _both_forms(rank: int, world: int) -> list[dict[str, Any]]:
    out = []
    cases = [(n, o, torch.float32) for n, o in CASES] + [(n, o, torch.float64) for n, o in FLOAT64_CASES]
    for name, options, dtype in cases:
        got: dict[bool, Any] = {}
        for form in (False, True):
            reducer = _reducer(name, options, Comm(), form)
            steps = []
            for step in range(3):
                bucket = Bucket.of(_grads(rank, step, dtype=dtype), KEYS)
                reducer.launch(bucket).wait()
                steps.append(bucket.buffer.clone())
            residuals = dict(reducer.ef.residuals) if reducer.ef else {}
            (plan,) = reducer._plans.values()
            got[form] = (steps, residuals, plan.segments is not None)
        out.append({"case": (name, options, dtype), "per_tensor": got[False], "bucket": got[True]})
    return out


def test_bucket_form_matches_the_per_tensor_form_on_three_workers() -> None:
    results = run_workers(_both_forms, 3, timeout=240)
    for rank_results in results:
        for r in rank_results:
            (a, ra, per_tensor_ran_bucket_form), (b, rb, bucket_form_ran) = r["per_tensor"], r["bucket"]
            case = r["case"]
            assert bucket_form_ran and not per_tensor_ran_bucket_form, case
            for step, (x, y) in enumerate(zip(a, b, strict=True)):
                assert torch.equal(x, y), (case, step, float((x - y).abs().max()))
            assert ra.keys() == rb.keys(), case
            for k in ra:
                assert torch.equal(ra[k], rb[k]), (case, k)
            if case[0] == "signsgd" or case[1].get("error_feedback"):
                assert len(ra) == 5, case  # every matrix has a residual: error feedback really ran
    # every worker ends with the same gradients (a mean over all three, not a local decode)
    for i in range(len(CASES) + len(FLOAT64_CASES)):
        assert results[0][i]["bucket"][0][-1].dtype == results[0][i]["case"][2]
        first = results[0][i]["bucket"][0][-1]
        for rank_results in results[1:]:
            assert torch.equal(rank_results[i]["bucket"][0][-1], first)
    # Negative control: the workers' own gradients differ, so agreeing is not vacuous.
    assert not torch.equal(_grads(0, 2)[0], _grads(1, 2)[0])


# Drawn on the CPU generator whatever the device: two numbers per tensor for QSGD's key, not a device launch.
CPU_DRAWS = {"aten.randint"}


def _calls(name: str, options: dict[str, Any], tensors: int, form: bool) -> Counter[str]:
    reducer = _reducer(name, options, SoloComm(), form)
    shapes = [(16 + i, 8) for i in range(tensors)]
    keys = [f"w{i}" for i in range(tensors)]
    for step in range(2):  # plans, allocates the residuals and their staged spares
        reducer.launch(Bucket.of(_grads(0, step, shapes), keys)).wait()
    bucket = Bucket.of(_grads(0, 2, shapes), keys)
    counter = CallCounter()
    with counter:
        reducer.launch(bucket).wait()
    return Counter({k: v for k, v in counter.calls.items() if k not in CPU_DRAWS})


@pytest.mark.parametrize(("name", "options"), CASES)
def test_bucket_form_calls_do_not_grow_with_the_tensors(name: str, options: dict[str, Any]) -> None:
    few, many = _calls(name, options, 4, True), _calls(name, options, 40, True)
    assert few == many, (few, many)
    assert sum(many.values()) < 120  # the whole bucket: encode, message, aggregate, raw all-reduce
    # Negative control: the per-tensor form makes calls for every tensor.
    assert sum(_calls(name, options, 40, False).values()) > 3 * sum(_calls(name, options, 4, False).values())


def test_bucket_form_screens_a_non_finite_tensor_by_its_head() -> None:
    grads = _grads(0, 0)
    grads[4][3, 2] = float("nan")
    reducer = _reducer("signsgd", {}, SoloComm(), True).use_nan_policy("raise")
    with pytest.raises(NonFiniteGradient, match=r"in 't4'"):
        reducer.launch(Bucket.of(grads, KEYS))
    skipping = _reducer("signsgd", {}, SoloComm(), True)
    bucket = Bucket.of(grads, KEYS)
    skipping.launch(bucket).wait()
    assert skipping.step_skipped and skipping.skipped_steps == 1 and not skipping.ef.residuals
    # Control: the same bucket without the NaN goes through, compressed.
    clean = _reducer("signsgd", {}, SoloComm(), True).use_nan_policy("raise")
    bucket = Bucket.of(_grads(0, 0), KEYS)
    clean.launch(bucket).wait()
    assert not clean.step_skipped and len(clean.ef.residuals) == 5


def test_bucket_form_keeps_bfloat16_gradients_in_their_own_dtype() -> None:
    """bfloat16 gradients (padded in their own dtype, so the bucket is not promoted): the same residuals and
    result as the per-tensor form, bit for bit, with one worker."""
    got = {}
    for form in (False, True):
        reducer = _reducer("signsgd", {}, SoloComm(), form)
        for step in range(3):  # from the second step on, p = e + g is rounded to bfloat16
            bucket = Bucket.of(_grads(0, step, dtype=torch.bfloat16), KEYS)
            reducer.launch(bucket).wait()
        assert reducer.ef is not None and bucket.buffer.dtype == torch.bfloat16
        got[form] = (bucket.buffer.clone(), {k: v.clone() for k, v in reducer.ef.residuals.items()})
    assert torch.equal(got[False][0], got[True][0])
    assert got[True][1].keys() == got[False][1].keys() and len(got[True][1]) == 5
    for k, e in got[False][1].items():
        assert e.dtype == torch.bfloat16 and torch.equal(got[True][1][k], e), k


def test_forcing_a_bucket_form_the_compressor_lacks_is_refused() -> None:
    reducer = get_spec("topk").build(make_config("topk", min_compression_rate=0.0), SoloComm())
    assert isinstance(reducer, ElementwiseReducer)
    reducer.bucket_form = True
    with pytest.raises(ValueError, match="'topk' has no bucket form"):
        reducer.launch(Bucket.of(_grads(0, 0), KEYS))
    reducer.bucket_form = False  # control: the per-tensor form is every compressor's
    reducer.launch(Bucket.of(_grads(0, 0), KEYS)).wait()
    assert reducer.step == 1


def test_qsgd_rounds_a_bucket_in_chunks_as_in_one_pass(monkeypatch: pytest.MonkeyPatch) -> None:
    """Chunks of 40 elements: boundaries inside tensors and between them; the same bits as the per-tensor form."""
    from gradzip.compress.qsgd import QSGD

    got, whole = {}, QSGD.bucket_chunk
    for form, chunk in ((False, whole), (True, whole), (True, 40)):
        monkeypatch.setattr(QSGD, "bucket_chunk", chunk)
        reducer = _reducer("qsgd", {"error_feedback": True, "levels": 127}, SoloComm(), form)
        bucket = Bucket.of(_grads(0, 0), KEYS)
        reducer.launch(bucket).wait()
        assert reducer.ef is not None
        got[form, chunk] = (bucket.buffer.clone(), dict(reducer.ef.residuals))
    reference = got[False, whole]
    for key in ((True, whole), (True, 40)):
        assert torch.equal(got[key][0], reference[0]), key
        assert all(torch.equal(got[key][1][k], e) for k, e in reference[1].items()), key
