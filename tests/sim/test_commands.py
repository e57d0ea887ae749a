"""gradzip profile, simulate and advise, in-process: what they write and print, and user mistakes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from gradzip.sim.profile import ModelProfile
from tests.test_cli import run_main


@pytest.fixture(scope="module")
def mlp_profile(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real profile of the MLP (on the benchmark's 3x32x32 inputs), measured here, kernels included."""
    from gradzip.cli import main

    out = tmp_path_factory.mktemp("profile") / "mlp.json"
    assert main(["profile", "--model", "mlp", "--repeats", "2", "--out", str(out)]) == 0
    return out


def test_profile_measures_every_layer_in_ready_order(mlp_profile: Path) -> None:
    prof = ModelProfile.load(mlp_profile)
    assert prof.measured and prof.model == "mlp" and prof.batch_size == 32
    # The MLP's gradients: the last layer's become ready first in backward.
    assert prof.layers[0].name.startswith("net.") or prof.layers[0].name
    names = [layer.name for layer in prof.layers]
    from gradzip.train.models import build_model

    model_names = [n for n, _ in build_model("mlp", (3, 32, 32), 10).named_parameters()]
    assert sorted(names) == sorted(model_names)
    assert names.index(model_names[-1]) < names.index(model_names[0])
    assert prof.numel == sum(p.numel() for p in build_model("mlp", (3, 32, 32), 10).parameters())
    assert all(layer.backward_s >= 0 for layer in prof.layers) and prof.backward_s > 0
    assert set(prof.compress_s_per_element) == {
        "sign",
        "topk",
        "randomk",
        "qsgd",
        "fp16",
        "powersgd",
        "acpsgd",
    }
    assert all(v > 0 for v in prof.compress_s_per_element.values())
    assert set(prof.decode_s_per_element) == {"signsgd", "topk", "qsgd"}


def test_simulate_writes_a_table_and_a_plot(
    mlp_profile: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = run_main(
        ["simulate", "--profile", str(mlp_profile), "--workers", "2,8", "--bandwidth", "100mbit,10gbit",
         "--methods", "acpsgd,topk:density=0.05", "--out", str(tmp_path)], capsys
    )  # fmt: skip
    assert code == 0, err
    assert "| topk:density=0.05 |" in out and "8 x 100mbit" in out and "(1.00x)" in out
    assert (tmp_path / "simulate-mlp.md").read_text() in out
    assert (tmp_path / "simulate-mlp.png").stat().st_size > 1000


def test_advise_ranks_and_explains(mlp_profile: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run_main(
        ["advise", "--profile", str(mlp_profile), "--workers", "16", "--bandwidth", "1gbit"], capsys
    )
    assert code == 0, err
    ranked = [line.split()[1] for line in out.splitlines() if line[:3].strip().isdigit()]
    assert len(ranked) == 13 and "ssgd" in ranked
    assert f"{ranked[0]} wins" in out and f"Runner-up {ranked[1]}" in out


def test_the_shipped_paper_profiles_are_labelled_derived() -> None:
    from gradzip.sim.shipped import shipped_names, shipped_profile

    for name in ("resnet50", "resnet152", "bert_base", "bert_large"):
        assert name in shipped_names()
        prof = shipped_profile(name)
        assert prof is not None and prof.source.startswith("derived:") and "RTX 2080 Ti" in prof.device


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["simulate", "--model", "nope"], "unknown model 'nope'"),
        (["simulate", "--profile", "/nonexistent.json"], "does not exist"),
        (["simulate", "--model", "resnet50", "--bandwidth", "unlimited"], "needs a rate"),
        (["simulate", "--model", "resnet50", "--workers", "1"], "workers=1"),
        (["simulate", "--model", "resnet50", "--methods", "torch-powersgd"], "not simulated"),
        (
            ["advise", "--model", "resnet50", "--workers", "8", "--bandwidth", "fast"],
            "invalid bandwidth 'fast'",
        ),
        (["simulate"], "--model M or --profile FILE"),
        (["profile", "--model", "nope"], "unknown model 'nope'"),
        (["profile", "--model", "mlp", "--device", "cuda:0"], "CUDA is not available"),
        (["profile", "--model", "mlp", "--device", "tpu"], "--device 'tpu' is invalid"),
        (
            ["advise", "--model", "resnet50", "--workers", "8", "--bandwidth", "1gbit", "--methods", "ssgd"],
            "nothing to rank",
        ),
        (["simulate", "--model", "resnet50", "--methods", "floor"], "not a method to simulate"),
        (["simulate", "--model", "resnet50", "--workers", "7", "--methods", "dpsgd:topology=torus"], "torus"),
        (["simulate", "--paper", "--model", "resnet50"], "drop --model"),
        (["simulate", "--model", "resnet50", "--measure"], "--measure applies to --paper only"),
        (["simulate", "--validate", "--paper"], "choose one"),
        (["simulate", "--profile", "x.json", "--batch-size", "8"], "--batch-size does not apply"),
        (["simulate", "--validate", "--model", "nope"], "unknown model 'nope'"),
        (["simulate", "--validate", "--methods", "torch-powersgd"], "not simulated"),
        (["simulate", "--validate", "--bandwidth", "fast"], "invalid bandwidth 'fast'"),
    ],
)
def test_mistakes_are_one_line_errors(
    args: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = run_main(args, capsys)
    assert code == 2
    assert message in err and err.count("\n") == 1


def test_profile_file_format_is_json(mlp_profile: Path) -> None:
    data = json.loads(mlp_profile.read_text())
    assert data["model"] == "mlp" and isinstance(data["layers"][0], list)
