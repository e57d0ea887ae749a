"""Non-finite gradients in ``gradzip train``, on real processes, for each family (a DDP hook, a dedicated
parameter server, gossip): a NaN in worker 1's inputs at one step makes every worker skip that step, with
checkpoints before and after it bit-identical (model, optimizer, the method's whole state, the servers'
included); ``--nan-policy raise`` stops every process naming worker 1 and the step; a run that does nothing
but skip stops; without the policy (the negative control) the same NaN ends the run."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

import gradzip.train.worker as worker
from gradzip.train import checkpoint
from gradzip.train.config import TrainConfig
from gradzip.train.worker import run_worker
from tests.distributed import differences, free_port, run_workers

STEPS, POISONED = 7, 4
FAMILIES: list[tuple[str, dict[str, Any], int]] = [
    ("acpsgd", {}, 3),
    ("doublesqueeze", {"placement": "server", "compressor": "randomk"}, 2),  # 2 workers + 1 server
    ("powergossip", {"topology": "ring"}, 3),
]


@contextlib.contextmanager
def nan_inputs(steps: set[int]) -> Iterator[None]:
    """On global rank 1, the inputs of ``steps`` hold a NaN (so does every gradient of that step)."""
    original = worker.run_steps
    if os.environ["RANK"] != "1":
        yield
        return

    def poisoned(ex: Any, batches: Any, *args: Any, **kwargs: Any) -> Any:
        def batch_at() -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
            for step, (x, y) in enumerate(batches):
                yield (x * float("nan") if step in steps else x), y

        return original(ex, batch_at(), *args, **kwargs)

    worker.run_steps = poisoned  # type: ignore[assignment]
    try:
        yield
    finally:
        worker.run_steps = original  # type: ignore[assignment]


def _runs(rank: int, world: int, cases: list[dict[str, Any]], root: str, ports: list[int]) -> list[Any]:
    out: list[Any] = []
    for i, (case, port) in enumerate(zip(cases, ports, strict=True)):
        os.environ["MASTER_PORT"] = str(port)
        method, options, workers = case["family"]
        cfg = TrainConfig(
            method=method, options=dict(options), workers=workers, steps=case.get("steps", STEPS), quiet=True,
            backend="gloo", checkpoint_dir=f"{root}/{i}", checkpoint_every=1, keep=100,
            nan_policy=case["policy"], timeout=case.get("timeout", 60),
        )  # fmt: skip
        with nan_inputs(case["nan"]):
            try:
                summary = run_worker(cfg)
                out.append(summary.to_dict() if summary is not None else None)
            except Exception as err:
                out.append(f"{type(err).__name__}: {err}")
    return out


def _strip(state: Any) -> Any:
    """A state without its traffic counters and skip counts: the only things a skipped step may change."""
    if isinstance(state, dict):
        return {k: _strip(v) for k, v in state.items() if k not in ("stats", "skipped")}
    if isinstance(state, list):
        return [_strip(v) for v in state]
    return state


def test_every_family_skips_a_poisoned_step_on_every_worker_leaving_every_state_as_it_was(
    tmp_path: Path,
) -> None:
    cases = [{"family": f, "policy": "skip", "nan": {POISONED}} for f in FAMILIES]
    results = run_workers(
        _runs, 3, cases, str(tmp_path), [free_port() for _ in cases], init=False, timeout=400
    )
    for i, (method, _, workers) in enumerate(FAMILIES):
        summary = results[0][i]
        assert isinstance(summary, dict), (method, summary)
        assert summary["steps"] == STEPS and summary["skipped_steps"] == 1, method
        history = summary["history"]
        assert [h["skipped"] for h in history] == [s == POISONED for s in range(STEPS)], method
        assert history[POISONED]["loss"] is None and all(
            h["loss"] is not None for h in history if not h["skipped"]
        ), method
        if method != "powergossip":  # gossip's workers agree only up to the consensus distance
            assert summary["params_identical"], method
        for rank in range(workers):
            before, after, end = (checkpoint.load(tmp_path / str(i), s, rank) for s in (POISONED, 5, STEPS))
            for part in ("model", "optimizer", "exchange"):
                diff = differences(_strip(before[part]), _strip(after[part]))
                assert not diff, (method, rank, part, diff[:5])
            assert after["records"][POISONED]["skipped"] and not before["records"][-1]["skipped"]
            assert differences(after["model"], end["model"]), (method, "the run moved on after the skip")
        if method == "doublesqueeze":  # the server's residuals travel in worker 0's checkpoint
            assert checkpoint.load(tmp_path / str(i), POISONED, 0)["exchange"]["servers"][0]["residuals"]


ASYNC = ("doublesqueeze-async", {}, 2)  # 2 workers + 1 server


def test_the_asynchronous_servers_drop_a_poisoned_push_alone(tmp_path: Path) -> None:
    """Asynchronous: no step is common to every worker, so the poisoned push alone is dropped; that worker's
    residuals and velocity stay as they were, it still takes the servers' update, and the others go on."""
    cases = [{"family": ASYNC, "policy": "skip", "nan": {POISONED}}]
    results = run_workers(_runs, 3, cases, str(tmp_path), [free_port()], init=False, timeout=400)
    assert isinstance(results[0][0], dict), results[0][0]
    before, after = (checkpoint.load(tmp_path / "0", s, 1) for s in (POISONED, POISONED + 1))
    for part in ("residuals", "velocity"):
        assert not differences(before["exchange"]["worker"][part], after["exchange"]["worker"][part]), part
    assert differences(before["model"], after["model"])  # the others' pushes reached it all the same
    assert after["records"][POISONED]["skipped"]
    final = checkpoint.load(tmp_path / "0", STEPS, 0)["exchange"]["servers"][0]
    assert final["version"] == 2 * STEPS - 1  # every push applied but the poisoned one


def test_raise_stops_every_process_naming_the_worker_and_the_step(tmp_path: Path) -> None:
    families = [*FAMILIES, ASYNC]
    cases = [{"family": f, "policy": "raise", "nan": {POISONED}} for f in families]
    results = run_workers(
        _runs, 3, cases, str(tmp_path), [free_port() for _ in cases], init=False, timeout=400
    )
    for rank, per_case in enumerate(results):
        for (method, _, _), r in zip(families, per_case, strict=True):
            # Every process, the server too, stops with the same words, before any step after it.
            assert isinstance(r, str) and r.startswith("NonFiniteGradient"), (method, rank, r)
            assert f"on worker 1 at step {POISONED}" in r, (method, rank, r)


def test_a_run_that_only_skips_stops_and_without_the_policy_the_nan_ends_the_run(tmp_path: Path) -> None:
    hook = FAMILIES[0]
    cases = [
        {"family": hook, "policy": "skip", "nan": set(range(2, 40)), "steps": 40},
        # The negative control: the same NaN with nothing to stop it.
        {"family": hook, "policy": "off", "nan": {POISONED}, "timeout": 5},
    ]
    results = run_workers(
        _runs, 3, cases, str(tmp_path), [free_port() for _ in cases], init=False, timeout=400
    )
    for rank, (only_skips, off) in enumerate(results):
        assert (
            isinstance(only_skips, str) and "the last 20 steps (to step 21) were all skipped" in only_skips
        ), (
            rank,
            only_skips,
        )
        if rank == 1:
            assert off == f"FloatingPointError: loss is nan at step {POISONED}; try a smaller --lr"
        else:  # its model took the NaN through the all-reduce, or its peer was gone: no run survives it
            assert isinstance(off, str), (rank, off)
