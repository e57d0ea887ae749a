"""The validation's report: errors, the bounds, and an end-to-end run on two real workers."""

from __future__ import annotations

from pathlib import Path

import pytest

from gradzip.sim.validate import MAX_BOUND, MEDIAN_BOUND, Check, load, markdown, run_validation, summary


def checks(errors: list[float]) -> list[Check]:
    return [Check(f"m{i}", 4, "1gbit", 1.0 + e, 1.0) for i, e in enumerate(errors)]


def test_summary_holds_only_within_both_bounds() -> None:
    assert summary(checks([0.05, -0.1, 0.12]))["holds"]
    s = summary(checks([0.05, -0.1, 0.35]))
    assert not s["holds"] and s["max"] == pytest.approx(0.35)  # one method beyond MAX_BOUND
    s = summary(checks([0.2, -0.2, 0.1]))
    assert not s["holds"] and s["median"] == pytest.approx(0.2)  # the median beyond MEDIAN_BOUND
    assert MEDIAN_BOUND == 0.15 and MAX_BOUND == 0.30
    # A failed measurement is reported, never counted as a pass.
    failed = [Check("x", 4, "1gbit", 1.0, None, "rank 1 failed")]
    assert summary(failed)["holds"] is False
    assert "failed: rank 1 failed" in markdown(failed)


def test_markdown_states_each_error_and_the_verdict() -> None:
    text = markdown(checks([0.1, -0.05]))
    assert "| 4 | 1gbit | m0 | 1000 | 1100 | +10% |" in text
    assert "| 4 | 1gbit | m1 | 1000 | 950 | -5% |" in text
    assert "Median absolute error 7.5%" in text and "holds" in text


def test_a_real_validation_of_two_workers(tmp_path: Path) -> None:
    """Profile two copies side by side, calibrate the link, measure ssgd on two real workers, predict it:
    every step of ``gradzip simulate --validate`` on the smallest cluster; run again, it measures nothing and
    predicts the same."""
    out = run_validation(
        "mlp",
        tmp_path,
        workers=(2,),
        bandwidths=("unlimited",),
        methods=("ssgd",),
        warmup=1,
        iters=3,
        progress=False,
    )
    model, saved = load(tmp_path / "validation.json")
    assert model == "mlp" and saved == out
    assert [c.method for c in out] == ["ssgd"]
    for c in out:
        assert c.measured_s is not None and c.measured_s > 0, c.error
        assert c.predicted_s > 0
        assert c.measured_parts is not None and c.predicted_parts is not None
    assert (tmp_path / "profile-mlp-x2.json").exists()
    again = run_validation(
        "mlp", tmp_path, workers=(2,), bandwidths=("unlimited",), methods=("ssgd",), progress=False
    )
    assert again == out
