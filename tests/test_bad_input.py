"""Bad input, property-based: whatever values a user gives the Python API's configs or the command line, the
answer is a valid configuration or a one-line error naming what is wrong (ValueError from the API, exit 2
from the CLI) before any worker starts: never a traceback of another kind."""

from __future__ import annotations

import dataclasses
import math
import typing
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gradzip.cli import build_parser
from gradzip.cli.common import UsageError
from gradzip.cli.train import train_config
from gradzip.registry import METHODS, make_config, methods
from gradzip.train.config import TrainConfig

# Values of every kind a user might pass: numbers at and beyond every boundary, NaN and infinities, wrong types.
ANY = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(10**6), max_value=10**6),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([0, 1, -1, 0.0, 1.0, 1.5, -0.5, 127, 128, 1e-12, 1e12]),
    st.text(max_size=8),
    st.sampled_from(["ring", "torus", "sharded", "server", "signsgd", "topk", "nope", "", "1"]),
)


@settings(max_examples=300, deadline=None)
@given(
    method=st.sampled_from(methods()),
    values=st.dictionaries(st.text(max_size=3), ANY, max_size=1),
    data=st.data(),
)
def test_any_method_options_give_a_config_or_a_value_error_naming_them(
    method: str, values: dict[str, Any], data: st.DataObject
) -> None:
    fields = [f.name for f in dataclasses.fields(METHODS[method].config_cls)]
    chosen = data.draw(st.lists(st.sampled_from(fields), unique=True, max_size=3)) if fields else []
    options = {name: data.draw(ANY) for name in chosen} | values
    try:
        cfg = make_config(method, **options)
    except ValueError as err:
        message = str(err)
        assert "\n" not in message and any(repr(name) in message or name in message for name in options), (
            message
        )
        return
    # Accepted: every value is of its field's type, and a float is finite.
    hints = typing.get_type_hints(type(cfg))
    for name in options:
        value = getattr(cfg, name)
        if hints[name] is float:
            assert isinstance(value, float) and math.isfinite(value), (name, value)
        if hints[name] is int:
            assert isinstance(value, int) and not isinstance(value, bool), (name, value)


NUMERIC = ["workers", "batch_size", "lr", "momentum", "steps", "epochs", "bucket_cap_mb", "timeout",
           "eval_every", "target_accuracy", "checkpoint_every", "keep", "max_restarts"]  # fmt: skip


@settings(max_examples=300, deadline=None)
@given(field=st.sampled_from(NUMERIC), value=ANY)
def test_any_train_option_gives_a_config_or_a_value_error_naming_it(field: str, value: Any) -> None:
    extra = {"eval_every": 10} if field == "target_accuracy" else {}
    extra |= (
        {"checkpoint_dir": "/tmp/gz-never-written"} if field in ("checkpoint_every", "max_restarts") else {}
    )
    try:
        TrainConfig(method="ssgd", backend="gloo", **{field: value, **extra})  # type: ignore[arg-type]
    except ValueError as err:
        assert field in str(err) and "\n" not in str(err), (field, value, str(err))


@settings(max_examples=100, deadline=None)
@given(value=st.one_of(ANY, st.sampled_from(["skip", "raise", "off", "Skip", "nan"])))
def test_any_nan_policy_gives_a_config_or_a_value_error_naming_the_valid_ones(value: Any) -> None:
    try:
        cfg = TrainConfig(method="ssgd", backend="gloo", nan_policy=value)
    except ValueError as err:
        assert "nan_policy" in str(err) and "\n" not in str(err), (value, str(err))
    else:
        assert cfg.nan_policy in ("skip", "raise", "off")


FLAGS = {
    "--method": st.sampled_from([*methods(), "nope"]),
    "--workers": st.sampled_from(["0", "-1", "2", "x", "1e3"]),
    "--steps": st.sampled_from(["0", "-5", "3.5", "1"]),
    "--lr": st.sampled_from(["nan", "inf", "-0.1", "0", "0.1", "lots"]),
    "--momentum": st.sampled_from(["1", "1.5", "-0.1", "nan", "0.5"]),
    "--batch-size": st.sampled_from(["0", "-2", "8"]),
    "--bucket-cap-mb": st.sampled_from(["0", "-1", "nan", "1"]),
    "--timeout": st.sampled_from(["0", "-3", "inf", "10"]),
    "--rank": st.sampled_from(["0", "-1", "2.5", "2"]),
    "--density": st.sampled_from(["0", "1.5", "nan", "-1", "0.5"]),
    "--levels": st.sampled_from(["0", "128", "500", "8"]),
    "--model": st.sampled_from(["mlp", "nosuch", "bert_tiny"]),
    "--dataset": st.sampled_from(["digits", "nosuch", "/no/such/dir", "/proc/version"]),
    "--json": st.sampled_from(["/proc/nope/out.json", "/"]),
    "--checkpoint-every": st.sampled_from(["-1", "2"]),
    "--keep": st.sampled_from(["0", "2"]),
    "--nan-policy": st.sampled_from(["skip", "raise", "off", "ignore", ""]),
}


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    flags=st.dictionaries(st.sampled_from(sorted(FLAGS)), st.none(), min_size=1, max_size=4), data=st.data()
)
def test_any_command_line_is_valid_or_one_line_and_exit_2(
    flags: dict[str, None], data: st.DataObject, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["train", "--backend", "gloo"]
    for flag in flags:
        argv += [flag, data.draw(FLAGS[flag])]
    try:
        train_config(
            build_parser().parse_args(argv)
        )  # everything `gradzip train` checks before a worker starts
    except SystemExit as exc:  # argparse's own errors
        assert exc.code == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and err.startswith("gradzip: error: "), (argv, err)
    except UsageError as err:  # main() prints these as "gradzip: error: ..." and exits 2
        assert "\n" not in str(err) and str(err), (argv, str(err))
