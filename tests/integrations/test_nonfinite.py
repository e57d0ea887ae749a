"""Non-finite gradients in the DDP hooks, on real processes: a NaN injected into one worker's gradient, in
the step's first bucket and (another step) in its last, is skipped by every worker together, leaving the
model, the optimizer and the method's whole state bit-identical to what they were before the step, so the
run ends exactly where a run that never had those steps ends; ``raise`` stops every worker naming the
worker and the step; ``off`` (the negative control) lets the NaN cross the wire."""

# No `from __future__ import annotations`: DDP checks a hook's annotations as real objects.

from typing import Any

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

import gradzip
from gradzip.comm.finite import NonFiniteGradient
from tests.distributed import differences, run_workers
from tests.integrations.test_ddp import batch, mixed_net

# Every hook method; the sparsifiers with DGC's momentum correction, so the staged velocity is covered too.
CASES: list[tuple[str, dict[str, Any]]] = [
    (m, {"momentum_correction": 0.9} if m in ("topk", "randomk", "doublesqueeze") else {})
    for m in gradzip.methods("hook")
]
STEPS = 7
# Step -> the parameter whose gradient is poisoned on worker 1: the last layer's weight is in DDP's first
# bucket (its gradient is ready first), the first conv's in the last bucket.
POISON = {2: "6.weight", 4: "0.weight"}
CPU = torch.device("cpu")


def _state(model: nn.Module, opt: torch.optim.Optimizer, hook: Any) -> dict[str, Any]:
    reducer = dict(hook.state_dict()["reducer"])
    reducer.pop("skipped")  # counts the skipped steps: the one thing a skip changes
    return {
        "model": {k: v.clone() for k, v in model.state_dict().items()},
        "optimizer": opt.state_dict(),
        "reducer": reducer,
    }


def _run(
    rank: int,
    method: str,
    options: dict[str, Any],
    policy: str,
    steps: list[int],
    poison: dict[int, str],
    device: torch.device = CPU,
) -> dict[str, Any]:
    ids = [device.index] if device.type == "cuda" else None
    model = DDP(mixed_net().to(device), device_ids=ids, bucket_cap_mb=0.004)  # several buckets
    state, hook = gradzip.ddp_hook(method, model=model, nan_policy=policy, **options)
    model.register_comm_hook(state, hook)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.0 if options else 0.9)
    params = dict(model.module.named_parameters())
    skipped, unchanged = [], []
    for step in steps:
        handle = None
        if rank == 1 and step in poison:
            handle = params[poison[step]].register_hook(lambda g: torch.full_like(g, float("nan")))
        before = _state(model.module, opt, state)
        x, y = batch(rank, step)
        opt.zero_grad()
        nn.functional.cross_entropy(model(x.to(device)), y.to(device)).backward()
        if handle is not None:
            handle.remove()
        if state.step_skipped:
            skipped.append(step)
            unchanged.append(not differences(before, _state(model.module, opt, state)))
            continue
        opt.step()
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    every = [torch.empty_like(flat) for _ in range(dist.get_world_size())]
    dist.all_gather(every, flat)
    return {
        "skipped": skipped,
        "unchanged": unchanged,
        "count": state.skipped_steps,
        "identical": all(torch.equal(every[0], f) for f in every),
        "finite": bool(torch.isfinite(flat).all()),
        "final": _state(model.module, opt, state),
    }


def skip_cases(
    rank: int, world: int, cases: list[tuple[str, dict[str, Any]]] = CASES, device: str = "cpu"
) -> dict[str, Any]:
    """Each case with NaNs at ``POISON``'s steps, and its reference without those steps (``tests_gpu`` runs
    it on CUDA)."""
    out = {}
    for method, options in cases:
        dev = torch.device(device)
        poisoned = _run(rank, method, options, "skip", list(range(STEPS)), POISON, dev)
        # The reference never had the poisoned steps: it must end bit for bit where the skipping run ends.
        reference = _run(rank, method, options, "skip", [s for s in range(STEPS) if s not in POISON], {}, dev)
        poisoned["same_as_reference"] = not differences(poisoned.pop("final"), reference.pop("final"))
        out[method] = poisoned
    return out


def check_skipped(results: list[dict[str, Any]]) -> None:
    for rank, per_method in enumerate(results):
        for method, r in per_method.items():
            where = f"rank {rank}, {method}"
            assert r["skipped"] == sorted(POISON), where  # every worker skipped exactly the poisoned steps
            assert all(r["unchanged"]), where  # model, optimizer, residuals, factors, velocity, phase, RNG
            assert r["count"] == len(POISON), where
            assert r["identical"] and r["finite"], where
            assert r["same_as_reference"], where


def test_a_nan_on_one_worker_is_skipped_by_every_worker_leaving_every_state_as_it_was() -> None:
    check_skipped(run_workers(skip_cases, 3))


def _policies(rank: int, world: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    try:
        _run(rank, "acpsgd", {}, "raise", list(range(4)), POISON)
        out["raise"] = None
    except NonFiniteGradient as err:
        out["raise"] = (err.ranks, err.step, str(err))
    # Negative control: without the policy the NaN crosses the wire and worker 0's model is poisoned too.
    off = _run(rank, "acpsgd", {}, "off", list(range(4)), POISON)
    out["off"] = (off["skipped"], off["finite"])
    return out


def test_raise_stops_every_worker_naming_the_worker_and_the_step_and_off_lets_the_nan_through() -> None:
    results = run_workers(_policies, 2)
    for rank, r in enumerate(results):
        assert r["raise"] is not None, f"rank {rank} did not raise"
        ranks, step, message = r["raise"]
        assert ranks == [1] and step == 2
        assert "worker 1 at step 2" in message
        if rank == 1:  # the worker that saw it also names the parameter
            assert "'6.weight'" in message
        assert r["off"] == ([], False), f"rank {rank}: with nan_policy='off' the NaN must spread"


def test_a_bad_nan_policy_is_refused_naming_the_valid_ones(group: None) -> None:
    with pytest.raises(
        ValueError, match="nan_policy='ignore' is invalid: it must be one of skip, raise, off"
    ):
        gradzip.ddp_hook("acpsgd", nan_policy="ignore")
