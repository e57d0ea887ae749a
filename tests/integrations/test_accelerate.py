"""gradzip in HF Accelerate, with the real library on 2 real CPU processes (gloo): the hook registered on the
prepared model really runs, workers stay identical and the loss falls, and ``save_state`` / ``load_state``
give every process back its own method state, so a resume equals an uninterrupted run. Accelerate's own
``DistributedDataParallelKwargs(comm_hook=...)`` cannot carry a gradzip hook: it takes its built-in names only
(the negative control)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from gradzip.integrations.accelerate import register, state_file
from tests.distributed import differences, run_workers

STEPS, HALF = 32, 16


def _setup(method: str, handlers: list[Any] | None = None, **options: Any) -> tuple[Any, Any, Any, Any, Any]:
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    accelerator = Accelerator(cpu=True, kwargs_handlers=handlers)
    set_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1024, 16, generator=g)
    data = DataLoader(TensorDataset(x, x[:, :4].argmax(1)), batch_size=16, shuffle=False)
    model, opt, data = accelerator.prepare(model, opt, data)
    state = register(accelerator, model, method, **options) if handlers is None else None
    return accelerator, model, opt, data, state


def _train(
    accelerator: Any, model: Any, opt: Any, data: Any, state: Any, start: int, stop: int
) -> list[float]:
    losses = []
    for i, (x, y) in enumerate(data):
        if i < start:
            continue
        if i >= stop:
            break
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        accelerator.backward(loss)
        if state is None or not state.step_skipped:
            opt.step()
        losses.append(float(loss))
    return losses


def _flat(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def _run(rank: int, world: int, root: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    accelerator, model, opt, data, state = _setup("acpsgd", rank=2)
    losses = _train(accelerator, model, opt, data, state, 0, STEPS)
    flat = _flat(model)
    every = [torch.empty_like(flat) for _ in range(dist.get_world_size())]
    dist.all_gather(every, flat)
    out["steps"], out["identical"] = state.stats.steps, all(torch.equal(every[0], f) for f in every)
    out["loss"] = (sum(losses[:3]) / 3, sum(losses[-3:]) / 3)
    out["straight"] = (model.module.state_dict(), opt.state_dict(), state.state_dict()["reducer"])
    # HALF steps, save_state; a fresh set-up, load_state, the other steps.
    accelerator, model, opt, data, state = _setup("acpsgd", rank=2)
    _train(accelerator, model, opt, data, state, 0, HALF)
    accelerator.save_state(f"{root}/half")
    out["saved_here"] = state_file(f"{root}/half", rank).is_file()
    accelerator, model, opt, data, state = _setup("acpsgd", rank=2)
    accelerator.load_state(f"{root}/half")
    _train(accelerator, model, opt, data, state, HALF, STEPS)
    out["resumed"] = (model.module.state_dict(), opt.state_dict(), state.state_dict()["reducer"])
    # Negative control: Accelerate's own comm_hook option, given a gradzip hook, registers nothing.
    from accelerate.utils import DistributedDataParallelKwargs

    from gradzip import ddp_hook

    theirs, hook = ddp_hook("acpsgd", rank=2)
    accelerator, model, opt, data, _ = _setup("acpsgd", [DistributedDataParallelKwargs(comm_hook=hook)])
    _train(accelerator, model, opt, data, None, 0, 4)
    out["their_option_steps"] = theirs.stats.steps
    return out


def test_accelerate_runs_the_hook_and_every_process_resumes_exactly(tmp_path: Path) -> None:
    results = run_workers(_run, 2, str(tmp_path), init=False, timeout=400)
    for rank, r in enumerate(results):
        assert r["steps"] == STEPS and r["identical"], rank
        assert r["loss"][1] < 0.7 * r["loss"][0], (rank, r["loss"])
        assert r["saved_here"], rank
        for part, (a, b) in enumerate(zip(r["straight"], r["resumed"], strict=True)):
            assert not differences(a, b), (rank, part, differences(a, b)[:5])
        assert r["their_option_steps"] == 0  # Accelerate's comm_hook option drops it: why register() exists
    assert differences(results[0]["straight"][2], results[1]["straight"][2])  # each process's own residuals


def test_register_refuses_a_model_that_is_not_ddp() -> None:
    from accelerate import Accelerator

    with pytest.raises(ValueError, match="several processes"):
        register(Accelerator(cpu=True), nn.Linear(2, 2), "acpsgd")
