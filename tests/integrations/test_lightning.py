"""gradzip in PyTorch Lightning, with the real library on 2 real CPU processes (gloo): the callback's hook
really runs (Lightning's own ``DDPStrategy(ddp_comm_hook=...)`` drops any hook on CPU: the negative
control), workers stay identical and the loss falls; a save and a ``fit(ckpt_path=...)`` resume give the
parameters and method state of an uninterrupted run; strategies it cannot serve are refused."""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import gradzip
from gradzip.integrations.lightning import CommHook, state_path
from tests.distributed import differences, run_workers

EPOCHS, HALF = 4, 2


class Classifier(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))
        self.losses: list[float] = []
        self.poison_at: int | None = None  # a batch whose inputs hold a NaN on rank 1

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        if batch_idx == self.poison_at and self.global_rank == 1 and self.current_epoch == 0:
            x = x * float("nan")
        loss = nn.functional.cross_entropy(self.net(x), y)
        self.losses.append(float(loss))
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)


def _data() -> DataLoader:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(256, 16, generator=g)
    y = (x[:, :4].argmax(1)).long()  # learnable
    return DataLoader(TensorDataset(x, y), batch_size=16, shuffle=False)


def _trainer(epochs: int, callbacks: list[Any], strategy: Any = "ddp") -> pl.Trainer:
    return pl.Trainer(
        accelerator="cpu", devices=2, strategy=strategy, max_epochs=epochs, callbacks=callbacks,
        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
    )  # fmt: skip


def _flat(module: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in module.parameters()])


def _identical(module: nn.Module) -> bool:
    flat = _flat(module)
    every = [torch.empty_like(flat) for _ in range(dist.get_world_size())]
    dist.all_gather(every, flat)
    return all(torch.equal(every[0], f) for f in every)


class _Snapshot(pl.Callback):
    """Keeps the flat parameters at the start of batch ``at`` and of the batch after it."""

    def __init__(self, at: int, into: list[torch.Tensor]) -> None:
        self.at, self.into = at, into

    def on_train_batch_start(self, trainer: pl.Trainer, module: Any, batch: Any, batch_idx: int) -> None:
        if batch_idx in (self.at, self.at + 1):
            self.into.append(_flat(module).clone())


def _fit(rank: int, world: int, root: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    # Straight: EPOCHS epochs with the callback.
    hook = CommHook("acpsgd", rank=2)
    model = Classifier()
    _trainer(EPOCHS, [hook]).fit(model, _data())
    out["steps"], out["identical"] = hook.stats.steps, _identical(model)
    out["loss"] = (sum(model.losses[:4]) / 4, sum(model.losses[-4:]) / 4)
    out["straight"] = (model.state_dict(), hook.state.state_dict()["reducer"])
    # Interrupted after HALF epochs, saved, and resumed to EPOCHS by fit(ckpt_path=...).
    hook = CommHook("acpsgd", rank=2)
    trainer = _trainer(HALF, [hook])
    trainer.fit(Classifier(), _data())
    ckpt = f"{root}/half.ckpt"
    trainer.save_checkpoint(ckpt)
    out["saved_here"] = state_path(ckpt, rank).is_file()
    hook = CommHook("acpsgd", rank=2)
    model = Classifier()
    _trainer(EPOCHS, [hook]).fit(model, _data(), ckpt_path=ckpt)
    out["resumed"] = (model.state_dict(), hook.state.state_dict()["reducer"])
    # A NaN on rank 1: every rank skips that optimizer step, and the run goes on with finite, equal models.
    hook = CommHook("acpsgd", rank=2)
    model = Classifier()
    model.poison_at = 3
    before: list[torch.Tensor] = []
    _trainer(1, [hook, _Snapshot(3, before)]).fit(model, _data())
    out["nan"] = (
        hook.state.skipped_steps,
        hook.stats.steps,
        _identical(model),
        bool(_flat(model).isfinite().all()),
    )
    out["nan_unchanged"] = torch.equal(before[0], before[1])  # parameters before and after the skipped step
    # Negative control: Lightning's own way, on CPU, never calls the hook.
    state, fn = gradzip.ddp_hook("acpsgd", rank=2)
    _trainer(1, [], pl.strategies.DDPStrategy(ddp_comm_state=state, ddp_comm_hook=fn)).fit(
        Classifier(), _data()
    )
    out["lightning_own_steps"] = state.stats.steps
    return out


def test_lightning_runs_the_hook_on_cpu_and_resumes_every_rank_exactly(tmp_path: Path) -> None:
    results = run_workers(_fit, 2, str(tmp_path), init=False, timeout=400)
    steps_per_epoch = 256 // 16 // 2
    for rank, r in enumerate(results):
        assert r["steps"] == EPOCHS * steps_per_epoch, (rank, r["steps"])  # one hook step per optimizer step
        assert r["identical"], rank
        assert r["loss"][1] < 0.5 * r["loss"][0], (rank, r["loss"])
        assert r["saved_here"], rank  # every rank wrote its own state beside the checkpoint
        for part, (a, b) in enumerate(zip(r["straight"], r["resumed"], strict=True)):
            assert not differences(a, b), (rank, part, differences(a, b)[:5])
        assert r["lightning_own_steps"] == 0  # what the callback is for
        assert r["nan"] == (1, steps_per_epoch - 1, True, True), (rank, r["nan"])
        assert r["nan_unchanged"], rank
    # Not vacuous: the two ranks' method states differ (each keeps its own residuals).
    assert differences(results[0]["straight"][1], results[1]["straight"][1])


def test_strategies_without_a_ddp_hook_are_refused() -> None:
    from lightning.pytorch.strategies import SingleDeviceStrategy

    trainer = pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False)
    assert isinstance(trainer.strategy, SingleDeviceStrategy)
    with pytest.raises(ValueError, match="CommHook needs Lightning's DDP strategy"):
        CommHook("acpsgd").setup(trainer, Classifier(), "fit")
    with pytest.raises(ValueError, match="unknown method 'nope'"):
        CommHook("nope")
    # Lightning's ddp_spawn pickles the callbacks.
    assert pickle.loads(pickle.dumps(CommHook("topk", density=0.1))).state.options["density"] == 0.1
    with pytest.raises(ValueError, match="decentralized"):
        CommHook("powergossip")


def test_a_skipped_step_lowers_the_fp16_grad_scaler_as_its_own_overflow_would() -> None:
    """Under fp16 mixed precision an Inf gradient is the GradScaler's signal to back off; a step the hook
    skipped must not swallow it (the callback calls this on every skipped step)."""
    from gradzip.integrations.ddp import back_off_scaler

    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    scaler.scale(torch.tensor(1.0))  # a step's scaled loss, as AMP's backward makes it
    back_off_scaler(scaler)
    assert scaler.get_scale() == 512.0
    back_off_scaler(None)  # no scaler (fp32 or bf16): nothing to do
