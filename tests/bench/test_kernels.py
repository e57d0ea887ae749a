"""The kernel benchmark: every method times on real shapes, the table reads back, names are checked."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from gradzip.bench import kernels
from gradzip.bench.kernels import METHODS, REFERENCE, format_table, format_targets, run_kernels, shape_sets

# A handful of ResNet-50's smallest real shapes: each under torch's parallel grain, so a busy CPU does not
# make the test wait on OpenMP workers.
TINY = 20_000


@pytest.fixture(scope="module")
def tiny_results() -> list[kernels.KernelResult]:
    return run_kernels("resnet50", repeats=2, max_numel=TINY)


def test_every_method_has_a_row_with_consistent_numbers(tiny_results: list[kernels.KernelResult]) -> None:
    assert [r.method for r in tiny_results] == list(METHODS)
    assert REFERENCE in METHODS
    expected_numel = sum(s.numel() for s in shape_sets("resnet50", max_numel=TINY)["resnet50"])
    for r in tiny_results:
        assert r.shapes == "resnet50"
        assert 0 < r.numel == expected_numel <= TINY
        assert r.seconds > 0 and r.gbytes_per_s > 0 and r.copy_gbytes_per_s > 0
        assert math.isclose(r.gbytes_per_s, r.numel * 4 / r.seconds / 1e9)
        assert math.isclose(r.fraction_of_copy, r.gbytes_per_s / r.copy_gbytes_per_s)
    # One copy measurement serves the whole set.
    assert len({r.copy_gbytes_per_s for r in tiny_results}) == 1
    assert all(r.calls is not None and r.calls > 0 for r in tiny_results)  # every pass counted


def test_form_rows_compare_the_bucket_form_with_the_per_tensor_form() -> None:
    results = run_kernels(
        "resnet50", ["sign-bucket", "sign-per-tensor", "qsgd-bucket", "qsgd-per-tensor"], repeats=1,
        max_numel=150_000, pass_budget_s=None,
    )  # fmt: skip
    rows = {r.method: r for r in results}
    assert "one set of calls per bucket" in rows["sign-bucket"].note
    assert "per tensor" in rows["qsgd-per-tensor"].note
    assert len(shape_sets("resnet50", max_numel=150_000)["resnet50"]) == 7
    for name in ("sign", "qsgd"):
        bucket, per_tensor = rows[f"{name}-bucket"].calls, rows[f"{name}-per-tensor"].calls
        assert bucket is not None and per_tensor is not None
        # one bucket here: a fixed number of calls (tests/reducers/test_bucket_form.py), against some per tensor
        assert bucket < per_tensor, (name, bucket, per_tensor)


def test_format_table(tiny_results: list[kernels.KernelResult]) -> None:
    lines = format_table(tiny_results).splitlines()
    assert lines[0].startswith("| method |") and "of copy" in lines[0] and "torch calls" in lines[0]
    assert set(lines[1]) <= set("|-:")
    assert len(lines) == 2 + len(tiny_results)
    for line, r in zip(lines[2:], tiny_results, strict=True):
        assert line.startswith(f"| {r.method} | resnet50 |")


def test_targets_are_read_off_the_rows(tiny_results: list[kernels.KernelResult]) -> None:
    rows = [
        dataclasses.replace(r, fraction_of_copy=0.3 if r.method == "sign" else 0.01) for r in tiny_results
    ]
    rows = [dataclasses.replace(r, seconds=4.0 if r.method == REFERENCE else 1.0) for r in rows]
    lines = format_targets(rows).splitlines()
    assert "- resnet50 sign: 0.300 of copy speed (target >= 0.25): holds" in lines
    assert "- resnet50 qsgd: 0.010 of copy speed (target >= 0.25): MISSED" in lines
    assert f"- resnet50 topk: 4.00x faster than {REFERENCE} alone (target >= 3x): holds" in lines
    slow = [dataclasses.replace(r, seconds=2.0) for r in rows]  # negative control: 1x is no speed-up
    assert "1.00x faster" in format_targets(slow) and "MISSED" in format_targets(slow).splitlines()[-1]


def test_topk_brings_its_reference_and_slow_passes_run_on_a_subset() -> None:
    # A budget no pass can meet: every method is timed on every other tensor and scaled up, and says so.
    results = run_kernels("resnet50", ["topk"], repeats=1, max_numel=TINY, pass_budget_s=1e-9)
    assert [r.method for r in results] == ["topk", REFERENCE]
    assert all("scaled by element count" in r.note and r.seconds > 0 for r in results)


def test_resnet50_shapes_are_real_and_built_on_meta(monkeypatch: pytest.MonkeyPatch) -> None:
    devices: set[str] = set()
    build = kernels.build_model

    def spy(*args: object, **kwargs: object) -> torch.nn.Module:
        model = build(*args, **kwargs)  # type: ignore[arg-type]
        devices.update(p.device.type for p in model.parameters())
        return model

    monkeypatch.setattr(kernels, "build_model", spy)
    shapes = shape_sets("resnet50")["resnet50"]
    assert devices == {"meta"}
    assert torch.Size([64, 3, 7, 7]) in shapes and torch.Size([1000, 2048]) in shapes
    assert torch.Size([512, 512, 3, 3]) in shapes
    assert len(shapes) == 54  # 53 convolutions and the classifier; BatchNorm and biases are 1-D
    assert sum(s.numel() for s in shapes) == 25_502_912
    assert all(len(s) >= 2 for s in shapes)


def test_shape_sets_several_names_and_cap() -> None:
    sets = shape_sets(["resnet50", "bert_base", "wide_mlp"], max_numel=3_000_000)
    assert set(sets) == {"resnet50", "bert_base", "wide_mlp"}
    for shapes in sets.values():
        assert shapes and sum(s.numel() for s in shapes) <= 3_000_000
    assert torch.Size([768, 768]) in sets["bert_base"]
    assert torch.Size([30522, 768]) in shape_sets("bert_base")["bert_base"]  # the word embeddings


def test_unknown_names_list_the_valid_ones() -> None:
    with pytest.raises(ValueError, match=r"valid methods: .*powersgd.*torch\.topk"):
        run_kernels("resnet50", ["gzip"], max_numel=TINY)
    with pytest.raises(ValueError, match=r"valid shape sets: .*resnet50.*bert_base"):
        run_kernels("vgg16", max_numel=TINY)
    with pytest.raises(ValueError, match=r"valid shape sets: .*wide_mlp"):
        shape_sets(["resnet50", "alexnet"])
