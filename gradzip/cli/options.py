"""Method options as flags, generated from the registry's config dataclasses: every field is a flag, its help
is the field's ``help``, and ``gradzip methods`` lists them per method."""

from __future__ import annotations

import argparse
import dataclasses
import typing
from typing import Any

from gradzip.cli.common import UsageError
from gradzip.registry import METHODS, get_spec, make_config, methods, option_flag

# Attribute prefix of method-option flags in the argparse namespace, to tell them from training flags.
_OPT_PREFIX = "method_option__"


def flag(field_name: str) -> str:
    # The registry names the flags, so the benchmark, which starts `gradzip train`, passes options the same way.
    return option_flag(field_name)


def _method_fields() -> dict[str, tuple[dataclasses.Field[Any], type]]:
    """Every option of every method: field name -> (a field of that name, its Python type)."""
    found: dict[str, tuple[dataclasses.Field[Any], type]] = {}
    for name in methods():
        cls = METHODS[name].config_cls
        hints = typing.get_type_hints(
            cls
        )  # resolves the string annotations of `from __future__ import annotations`
        for f in dataclasses.fields(cls):
            typ = hints[f.name]
            # ``float | None`` (an option that defaults to another object's own value) parses as a float.
            args = [a for a in typing.get_args(typ) if a is not type(None)]
            if args and len(args) == 1:
                typ = args[0]
            if f.name not in found:
                found[f.name] = (f, typ)
    return found


def _option_help(name: str) -> str:
    """The help of option ``name``: each distinct text (with its default) once, with the methods it has; an
    option several methods share may mean something slightly different to each (a compressor's density)."""
    groups: dict[str, list[str]] = {}
    for method in methods():
        for f in dataclasses.fields(METHODS[method].config_cls):
            if f.name == name:
                groups.setdefault(f"{f.metadata.get('help', '')} (default {f.default!r}", []).append(method)
    return " | ".join(f"{text}; {', '.join(owners)})" for text, owners in groups.items())


def add_method_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group(
        "method options", "each applies to the methods listed; the defaults are the method's own"
    )
    for name, (_, typ) in _method_fields().items():
        # SUPPRESS: an option not given stays absent, so the method's own default applies and an option the
        # method lacks is detectable (it is present only when the user typed it).
        common: dict[str, Any] = {
            "dest": _OPT_PREFIX + name,
            "default": argparse.SUPPRESS,
            "help": _option_help(name),
        }
        if typ is bool:
            group.add_argument(flag(name), action=argparse.BooleanOptionalAction, **common)
        else:
            group.add_argument(flag(name), type=typ, metavar=name.upper(), **common)


def method_options(args: argparse.Namespace) -> dict[str, Any]:
    """The method options the user typed, checked against the chosen method."""
    given = {k[len(_OPT_PREFIX) :]: v for k, v in vars(args).items() if k.startswith(_OPT_PREFIX)}
    valid = [f.name for f in dataclasses.fields(get_spec(args.method).config_cls)]
    for name in given:
        if name not in valid:
            flags = ", ".join(flag(v) for v in valid) or "none"
            raise UsageError(f"method {args.method!r} has no option {flag(name)}; its options: {flags}")
    try:
        make_config(args.method, **given)
    except ValueError as err:
        raise UsageError(str(err)) from None
    return given


def print_methods() -> int:
    """``gradzip methods``: every method with its wire format, aggregation and options."""
    for name in methods():
        spec = METHODS[name]
        print(f"{name}: {spec.summary}")
        print(f"    wire: {spec.wire}; aggregation: {spec.aggregation}")
        fields = dataclasses.fields(spec.config_cls)
        if not fields:
            print("    options: none")
        for f in fields:
            print(f"    {flag(f.name)} (default {f.default!r}): {f.metadata.get('help', '')}")
    return 0
