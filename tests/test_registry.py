"""The method registry and every method's options, validated once, here: unknown names and options list the
valid ones, bad values say what is valid, and the methods that are not DDP hooks say what to use instead."""

from __future__ import annotations

from typing import Any

import pytest

import gradzip
from gradzip.config import ChocoConfig, PowerGossipConfig, compressor_options, make_compressor
from gradzip.registry import METHODS, family, get_spec, make_config, methods, servers_needed


def test_registry_lists_the_methods() -> None:
    assert set(methods()) >= {"ssgd", "fp16", "signsgd", "topk", "randomk", "qsgd", "powersgd", "acpsgd"}
    assert set(methods()) == set(METHODS) and len(METHODS) == 13
    assert methods("gossip") == ["choco", "dpsgd", "powergossip"]
    assert methods("server") == ["doublesqueeze-async"]
    assert gradzip.methods() == methods()


@pytest.mark.parametrize(
    ("name", "options", "needles"),
    [
        ("nope", {}, ["'nope'", "acpsgd", "powersgd", "topk", "ssgd"]),
        ("topk", {"desnity": 0.1}, ["'desnity'", "density", "min_compression_rate", "seed"]),
        ("acpsgd", {"ranks": 4}, ["'ranks'", "valid options: ", "rank"]),
        ("powersgd", {"rank": 0}, ["rank=0", ">= 1"]),
        ("topk", {"density": 1.5}, ["density=1.5", "(0, 1]"]),
        ("qsgd", {"levels": 0}, ["levels=0", "1..127"]),
        ("qsgd", {"levels": 500}, ["levels=500", "1..127"]),
        ("qsgd", {"levels": 4.5}, ["levels=4.5", "integer"]),
        ("acpsgd", {"rank": True}, ["rank=True", "integer"]),
        ("acpsgd", {"warmup_steps": 1.5}, ["warmup_steps=1.5", "integer"]),
        ("signsgd", {"majority_vote": "no"}, ["majority_vote='no'", "true or false"]),
        ("topk", {"density": "0.1"}, ["density='0.1'", "number"]),
        ("topk", {"min_compression_rate": None}, ["min_compression_rate=None", "number"]),
        ("randomk", {"seed": 0.5}, ["seed=0.5", "integer"]),
        ("choco", {"gamma": 0.0}, ["gamma"]),
        ("choco", {"compressor": "nope"}, ["unknown compressor 'nope'"]),
        ("choco", {"compressor": "signsgd", "levels": 4}, ["no option 'levels'"]),
        ("powergossip", {"rank": 0}, ["rank"]),
        ("powergossip", {"iterations": 0}, ["iterations"]),
        ("dpsgd", {"topology": "moebius"}, ["moebius"]),
        ("doublesqueeze", {"compressor": "powersgd"}, ["unknown compressor 'powersgd'"]),
        ("doublesqueeze", {"compressor": "signsgd", "density": 0.1}, ["has no option 'density'"]),
        ("doublesqueeze", {"placement": "ring"}, ["placement must be sharded or server"]),
        ("doublesqueeze-async", {"max_staleness": -1}, ["max_staleness"]),
    ],
)
def test_make_config_errors(name: str, options: dict[str, Any], needles: list[str]) -> None:
    with pytest.raises(ValueError) as info:
        gradzip.make_config(name, **options)
    for needle in needles:
        assert needle in str(info.value)


def test_make_config_valid_control() -> None:
    assert gradzip.make_config("topk", density=1.0).density == 1.0  # type: ignore[attr-defined]
    assert gradzip.make_config("qsgd", levels=127).levels == 127  # type: ignore[attr-defined]
    assert gradzip.make_config("powersgd", rank=1).rank == 1  # type: ignore[attr-defined]


def test_carried_compressors_and_gossip_options() -> None:
    assert make_config("choco").to_dict() == {
        "topology": "ring",
        "metrics": True,
        "compressor": "signsgd",
        "gamma": ChocoConfig().gamma,
        "seed": 0,
    }
    assert make_config("choco", compressor="topk", density=0.1).compressor_options() == {  # type: ignore[attr-defined]
        "density": 0.1,
        "seed": 0,
    }
    assert PowerGossipConfig().rank == 1 and PowerGossipConfig().iterations == 1
    # A carried compressor takes its method's options, less the pattern's.
    assert compressor_options("topk") == ["seed", "density"]
    with pytest.raises(ValueError, match="compressor 'signsgd' has no option 'density'"):
        make_compressor("signsgd", density=0.1)
    with pytest.raises(ValueError, match="unknown compressor 'gzip'; valid compressors: fp16, identity"):
        make_compressor("gzip")


def test_methods_that_are_not_hooks_say_what_to_use() -> None:
    # A decentralized method is not a DDP hook, and says what to use instead.
    for method in ("dpsgd", "choco", "powergossip"):
        assert get_spec(method).kind == "gossip"
        with pytest.raises(ValueError, match="decentralized.*gradzip.gossip"):
            get_spec(method).build(make_config(method), None)
    for method, options in [("doublesqueeze", {"placement": "server"}), ("doublesqueeze-async", {})]:
        with pytest.raises(ValueError, match="dedicated server"):
            get_spec(method).build(gradzip.make_config(method, **options), None)  # type: ignore[arg-type]


def test_family_and_servers_follow_the_placement() -> None:
    assert (family("acpsgd", {}), servers_needed("acpsgd", {})) == ("hook", 0)
    assert (family("doublesqueeze", {}), servers_needed("doublesqueeze", {})) == ("hook", 0)
    assert family("doublesqueeze", {"placement": "server"}) == "server"
    assert servers_needed("doublesqueeze", {"placement": "server", "servers": 3}) == 3
    assert (family("doublesqueeze-async", {}), servers_needed("doublesqueeze-async", {})) == ("server", 1)
    assert family("powergossip", {}) == "gossip"
