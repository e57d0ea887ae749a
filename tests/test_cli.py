"""The ``gradzip`` command line: flags built from the registry, ``gradzip methods``, and user mistakes ending in
one line on stderr with exit code 2 before any worker starts (so these tests spawn nothing)."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from gradzip.cli import build_parser, main
from gradzip.cli.options import method_options
from gradzip.registry import METHODS


def run_main(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    """main(argv) in-process; argparse's own errors exit through SystemExit, the rest return the code."""
    try:
        code = main(argv)
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    out, err = capsys.readouterr()
    return code, out, err


BAD_INPUTS = [
    (["--method", "nosuchmethod"], "nosuchmethod"),
    # A method option's bad value: the registry's message (tests/test_registry.py), as one line.
    (["--method", "acpsgd", "--rank", "0"], "rank=0"),
    (["--method", "topk", "--density", "1.5"], "1.5"),
    (["--method", "qsgd", "--levels", "500"], "500"),
    (["--dataset", "/no/such/dir/anywhere"], "/no/such/dir/anywhere"),
    (["--dataset", "nosuchdataset"], "nosuchdataset"),
    (["--model", "nosuchmodel"], "nosuchmodel"),
    (["--method", "ssgd", "--rank", "4"], "--rank"),
    (["--method", "powersgd", "--density", "0.1"], "--density"),
    (["--workers", "0"], "0"),
    (["--workers", "two"], "two"),
    (["--steps", "0"], "0"),
    (["--steps", "5", "--epochs", "1"], "--epochs"),
    (["--lr", "-0.1"], "-0.1"),
    (["--momentum", "1.5"], "1.5"),
    (["--batch-size", "0"], "0"),
    (["--timeout", "0"], "0"),
    (["--compressor-seed", "x"], "'x'"),
    # Output paths are checked before training: a wrong one must not cost the whole run.
    (["--json", "/proc/nope/out.json"], "cannot write --json /proc/nope/out.json"),
    (["--json", "/"], "--json / is a directory"),
]


@pytest.mark.parametrize(("args", "needle"), BAD_INPUTS, ids=[" ".join(a) for a, _ in BAD_INPUTS])
def test_user_mistakes_are_one_line_exit_2(
    args: list[str], needle: str, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = run_main(["train", *args], capsys)
    assert code == 2
    assert out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("gradzip: error: ")
    assert needle in lines[0]
    assert "Traceback" not in err


def test_option_of_another_method_lists_the_valid_ones(capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run_main(["train", "--method", "acpsgd", "--majority-vote"], capsys)
    assert code == 2
    assert "'acpsgd' has no option --majority-vote" in err
    assert "--rank" in err and "--warmup-steps" in err and "--compressor-seed" in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="nccl is valid where CUDA is")
def test_nccl_without_cuda_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run_main(["train", "--backend", "nccl"], capsys)
    assert code == 2
    assert "nccl" in err and "CUDA" in err


def test_model_that_cannot_take_the_data_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    # BERT takes token ids, not 8x8 images: found by a forward pass on meta tensors in the parent.
    code, _, err = run_main(["train", "--model", "bert_tiny"], capsys)
    assert code == 2
    assert err.startswith("gradzip: error: model 'bert_tiny'") and len(err.strip().splitlines()) == 1


def test_real_process_exit_code_and_stderr() -> None:
    # Once through a real interpreter: the exit status and stderr are what a shell sees.
    proc = subprocess.run(
        [sys.executable, "-m", "gradzip", "train", "--method", "acpsgd", "--rank", "0"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2
    assert proc.stdout == ""
    assert proc.stderr.strip() == "gradzip: error: rank=0 is invalid: rank must be an integer >= 1"


def test_every_method_option_is_a_flag_with_its_help(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run_main(["train", "--help"], capsys)
    assert code == 0
    help_text = " ".join(out.split())
    for spec in METHODS.values():
        for f in dataclasses.fields(spec.config_cls):
            flag = "--compressor-seed" if f.name == "seed" else "--" + f.name.replace("_", "-")
            assert flag in help_text
            # The help of the field, as written in the config dataclass (argparse re-wraps whitespace).
            assert " ".join(f.metadata["help"].split())[:40] in help_text


def test_boolean_options_have_a_negative_form(capsys: pytest.CaptureFixture[str]) -> None:
    # --no-majority-vote parses (and is valid for signsgd); the model check then fails on a bad model,
    # which proves parsing got that far without starting anything.
    code, _, err = run_main(["train", "--method", "signsgd", "--no-majority-vote", "--model", "x"], capsys)
    assert code == 2 and "invalid choice: 'x'" in err


def test_compressor_seed_is_not_the_training_seed() -> None:
    args = build_parser().parse_args(
        ["train", "--method", "randomk", "--seed", "3", "--compressor-seed", "7"]
    )
    assert args.seed == 3
    assert method_options(args) == {"seed": 7}


def test_methods_lists_every_method_and_option(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run_main(["methods"], capsys)
    assert code == 0 and err == ""
    for name, spec in METHODS.items():
        assert f"{name}: {spec.summary}" in out
        assert spec.wire in out and spec.aggregation in out
    # Each method's block (its line and the indented lines under it) names its options with their defaults.
    sections = out.split("\n")
    for name, spec in METHODS.items():
        start = sections.index(next(line for line in sections if line.startswith(f"{name}: ")))
        end = next(
            (i for i in range(start + 1, len(sections)) if sections[i] and not sections[i][0].isspace()),
            len(sections),
        )
        block = "\n".join(sections[start:end])
        for f in dataclasses.fields(spec.config_cls):
            flag = "--compressor-seed" if f.name == "seed" else "--" + f.name.replace("_", "-")
            assert f"{flag} (default {f.default!r})" in block
        if not dataclasses.fields(spec.config_cls):
            assert "options: none" in block


def test_no_command_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run_main([], capsys)
    assert code == 2 and err.startswith("gradzip: error: ")


def test_bench_refuses_an_unwritable_out_before_measuring(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run_main(["bench", "--kernels", "--out", "/proc/nope"], capsys)
    assert code == 2 and out == "" and "cannot write --out /proc/nope/results.json" in err


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--device", "gpu"], "'gpu'"),
        (["--shapes", "resnet9000"], "resnet9000"),
        (["--methods", "floor"], "floor"),
    ]
    + ([] if torch.cuda.is_available() else [(["--device", "cuda"], "CUDA")]),
)
def test_bench_kernels_bad_device_or_shapes_is_a_usage_error(
    args: list[str], needle: str, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    code, out, err = run_main(["bench", "--kernels", "--out", str(tmp_path), *args], capsys)
    assert code == 2 and out == ""
    assert needle in err and "Traceback" not in err


def test_a_bad_topology_or_worker_count_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    for argv, needle in [
        (["--method", "powergossip", "--topology", "torus", "--workers", "7"], "cannot take 7 workers"),
        (["--method", "dpsgd", "--topology", "moebius"], "moebius"),
        (["--method", "ssgd", "--topology", "ring"], "--topology"),
        (["--data-split", "sorted"], "sorted"),
    ]:
        code, out, err = run_main(["train", "--backend", "gloo", *argv], capsys)
        assert code == 2 and out == ""
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("gradzip: error: ") and needle in lines[0], err
