"""Profiles that ship with gradzip (``gradzip/sim/profiles/*.json``): the ACP-SGD paper's four models at its
batch sizes, derived from CPU profiles (:mod:`gradzip.sim.paper`); how each was made is in its ``source``."""

from __future__ import annotations

import json
from importlib import resources

from gradzip.sim.profile import ModelProfile


def shipped_names() -> list[str]:
    root = resources.files("gradzip.sim") / "profiles"
    return sorted(p.name.removesuffix(".json") for p in root.iterdir() if p.name.endswith(".json"))


def shipped_profile(model: str) -> ModelProfile | None:
    """The shipped profile of ``model``, or None."""
    path = resources.files("gradzip.sim") / "profiles" / f"{model}.json"
    if not path.is_file():
        return None
    return ModelProfile.from_dict(json.loads(path.read_text()))
