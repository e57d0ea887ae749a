"""Checkpoints of a training run: every process's whole state, written atomically, found and checked on resume.

Layout: ``DIR/step-00000400/rank3.pt`` holds worker 3's state after 400 steps (its model, optimizer, the
method's state, RNG states, the loop's records so far); worker 0's file also holds every dedicated server's
state, which the servers hand it at each checkpoint, and ``meta.json`` beside it the run's fingerprint. Each
file is written to a temporary name, fsynced and renamed, so a crash while saving leaves the previous
checkpoint whole. A step's checkpoint is usable once every worker has its file there; old ones are pruned only
after every worker has written a newer one, so a run killed at any moment can resume from the latest
checkpoint that every worker holds. Files load with ``torch.load(weights_only=True)``: tensors, numbers,
strings, lists and dicts only.
"""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

import gradzip
from gradzip.train.exchange import Exchange
from gradzip.train.records import EvalRecord, LoopResult, StepRecord
from gradzip.util import atomic_file, first_line, write_atomic

_STEP_DIR = re.compile(r"^step-(\d{8})$")
META = "meta.json"


class CheckpointError(ValueError):
    """A checkpoint that cannot be used: corrupt, truncated, or from another run; the message says why."""


def step_dir(root: Path, step: int) -> Path:
    return root / f"step-{step:08d}"


def rank_file(root: Path, step: int, rank: int) -> Path:
    return step_dir(root, step) / f"rank{rank}.pt"


def steps_with(root: Path, rank: int) -> list[int]:
    """The steps of the checkpoints in ``root`` that hold this rank's file, ascending."""
    if not root.is_dir():
        return []
    found = []
    for entry in root.iterdir():
        m = _STEP_DIR.match(entry.name)
        if m and (entry / f"rank{rank}.pt").is_file():
            found.append(int(m.group(1)))
    return sorted(found)


def fingerprint(cfg: Any, model: torch.nn.Module, world: int) -> dict[str, Any]:
    """What a checkpoint must share with the run that resumes from it: the same method and options, the
    same model (every parameter's name and shape), data, seed, batch and worker count, and gradzip version."""
    return {
        "gradzip": gradzip.__version__,
        "method": cfg.method,
        "options": dict(cfg.options),
        "model": cfg.model,
        "parameters": {name: list(p.shape) for name, p in model.named_parameters()},
        "dataset": cfg.dataset,
        "data_split": cfg.data_split,
        "seed": cfg.seed,
        "batch_size": cfg.batch_size,
        "workers": world,
    }


def first_difference(theirs: dict[str, Any], mine: dict[str, Any], verb: str = "was") -> str | None:
    """The first thing two fingerprints disagree on, in words ("method was 'acpsgd', this run has ..."), or
    None when they agree."""
    for key, value in mine.items():
        if theirs.get(key) != value:
            if key == "parameters":
                names = sorted(set(theirs.get(key, {})) ^ set(value)) or [
                    n for n in value if theirs[key].get(n) != value[n]
                ]
                return f"the model's parameters differ (first: {names[0]!r})"
            return f"{key} {verb} {theirs.get(key)!r}, this run has {value!r}"
    return None


def check_same_run(saved: dict[str, Any], current: dict[str, Any], where: Path) -> None:
    """Refuse a checkpoint of another run, naming the first thing that differs."""
    detail = first_difference(saved, current)
    if detail is not None:
        raise CheckpointError(f"checkpoint {where} is of another run: {detail}")


def check_same_run_everywhere(mine: dict[str, Any], group: dist.ProcessGroup | None = None) -> None:
    """Before the first step, every worker compares its run's fingerprint with worker 0's (a collective):
    workers started with different methods, options, models or gradzip versions fail at once, every one of
    them with a message saying what differs, instead of hanging in mismatched collectives or training on
    garbage."""
    everyone: list[Any] = [None] * dist.get_world_size(group)
    dist.all_gather_object(everyone, mine, group=group)
    for rank, theirs in enumerate(everyone[1:], start=1):
        detail = first_difference(everyone[0], theirs, verb="is")
        if detail is not None:
            detail = detail.replace("this run has", f"on worker {rank} it is")
            raise ValueError(f"the workers were started differently: on worker 0 {detail}")


def save(root: Path, step: int, rank: int, state: dict[str, Any], meta: dict[str, Any] | None = None) -> None:
    """Write this rank's ``state`` for ``step`` atomically (and, on rank 0, the run's fingerprint)."""
    with atomic_file(rank_file(root, step, rank)) as f:
        torch.save(state, f)
    if meta is not None:
        write_atomic(step_dir(root, step) / META, json.dumps(meta, indent=1) + "\n")


def load(root: Path, step: int, rank: int) -> dict[str, Any]:
    """This rank's state at ``step``; CheckpointError (one line) for a file that is corrupt or truncated."""
    path = rank_file(root, step, rank)
    try:
        state: dict[str, Any] = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # pickle, zip and torch errors alike: the file is unusable
        raise CheckpointError(f"checkpoint {path} cannot be read: {first_line(err)}") from None
    return state


def read_meta(root: Path, step: int) -> dict[str, Any]:
    path = step_dir(root, step) / META
    try:
        meta: dict[str, Any] = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise CheckpointError(f"checkpoint {path} cannot be read: {first_line(err)}") from None
    return meta


def agreed_step(root: Path, group: dist.ProcessGroup | None = None) -> int | None:
    """The latest step every worker of ``group`` holds a checkpoint of (a collective); None when none."""
    mine = steps_with(root, dist.get_rank(group))
    everyone: list[Any] = [None] * dist.get_world_size(group)
    dist.all_gather_object(everyone, mine, group=group)
    common = set(everyone[0]).intersection(*everyone[1:])
    return max(common) if common else None


def prune(root: Path, rank: int, keep: int) -> None:
    """Remove this rank's files of all but the ``keep`` latest checkpoints (call it once every worker holds
    the latest), and step folders left empty."""
    for step in steps_with(root, rank)[:-keep]:
        path = rank_file(root, step, rank)
        path.unlink(missing_ok=True)
        if rank == 0:
            (step_dir(root, step) / META).unlink(missing_ok=True)
        folder = step_dir(root, step)
        if folder.is_dir() and not any(p for p in folder.iterdir() if not p.name.startswith(".")):
            shutil.rmtree(folder, ignore_errors=True)


def check_resumable(root: Path, current: dict[str, Any]) -> int | None:
    """Before any worker starts: the latest checkpoint in ``root`` (by rank 0's file) is readable and of this
    run; its step, or None when there is none yet. CheckpointError otherwise."""
    steps = steps_with(root, 0)
    if not steps:
        return None
    step = steps[-1]
    check_same_run(read_meta(root, step), current, step_dir(root, step))
    for path in sorted(step_dir(root, step).glob("rank*.pt")):  # corrupt or truncated: said now, not later
        load(root, step, int(path.stem.removeprefix("rank")))
    return step


class RunCheckpoints:
    """The training loop's checkpoints (``gradzip.train.loop.Checkpoints``): every ``every`` steps and after
    the last, each worker writes its file; once every worker has, old ones are pruned to ``keep``."""

    def __init__(
        self,
        root: Path,
        every: int,
        keep: int,
        n_steps: int,
        ex: Exchange,
        meta: dict[str, Any],
        group: dist.ProcessGroup | None = None,
    ) -> None:
        self.root, self.every, self.keep, self.n_steps = root, every, keep, n_steps
        self.ex, self.meta, self.group = ex, meta, group

    def due(self, step: int) -> bool:
        return (self.every > 0 and (step + 1) % self.every == 0) or step == self.n_steps - 1

    def save(self, steps_done: int, result: LoopResult) -> None:
        rank = dist.get_rank(self.group)
        ex = self.ex
        state = {
            "step": steps_done,
            "model": ex.model.state_dict(),
            "optimizer": ex.optimizer.state_dict() if ex.optimizer is not None else None,
            "exchange": ex.state_dict(),
            "rng": _rng_state(),
            "records": [dataclasses.asdict(r) for r in result.records],
            "evals": [dataclasses.asdict(e) for e in result.evals],
        }
        save(self.root, steps_done, rank, state, {**self.meta, "step": steps_done} if rank == 0 else None)
        dist.barrier(group=self.group)  # every worker holds this one: older ones may go
        prune(self.root, rank, self.keep)


def _rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore(state: dict[str, Any], ex: Exchange) -> LoopResult:
    """Put a worker back where its checkpoint left it: model, optimizer, the method's state, RNG states;
    returns the loop's records so far."""
    ex.model.load_state_dict(state["model"])
    if ex.optimizer is not None:
        ex.optimizer.load_state_dict(state["optimizer"])
    ex.load_state_dict(state["exchange"])
    torch.set_rng_state(state["rng"]["cpu"])
    if "cuda" in state["rng"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["rng"]["cuda"])
    return LoopResult([StepRecord(**r) for r in state["records"]], [EvalRecord(**e) for e in state["evals"]])
