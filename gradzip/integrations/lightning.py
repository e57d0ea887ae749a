"""gradzip in PyTorch Lightning: ``L.Trainer(strategy="ddp", callbacks=[CommHook("acpsgd", rank=4)])``.

Why a callback and not ``DDPStrategy(ddp_comm_hook=...)``: Lightning registers a strategy's comm hook only
when its root device is CUDA, and on CPU drops it without a word (0 hook calls in a whole run). The callback
registers gradzip's hook on the DDP-wrapped model itself, on any device, once Lightning has wrapped it.

It also keeps what Lightning cannot: Lightning writes a checkpoint from rank 0 alone, but every rank holds its
own method state (error-feedback residuals, factors, random streams). Whenever the trainer saves a checkpoint
``PATH``, every rank writes its state to ``PATH.gradzip/rankR.pt`` beside it (atomically), removes it when
Lightning removes ``PATH``, and ``trainer.fit(ckpt_path=PATH)`` reads it back on every rank. On a cluster
without a shared file system each rank finds its file on its own machine, so ranks must keep their machines.

With ``nan_policy="skip"`` (the default) a step in which some rank's gradient holds a NaN or an Inf runs no
optimizer step on any rank (the training step's closure runs first, then the update only if the hook let
the step go ahead), so the model and the method's state stay exactly as they were; under fp16 mixed
precision the GradScaler backs off as it would have. Lightning still counts the step (``global_step``, LR
schedulers). Only this callback skips: ``DDPStrategy(ddp_comm_hook=...)`` on CUDA runs the optimizer on the
zeroed gradients of a skipped step.
"""

from __future__ import annotations

import contextlib
import warnings
from pathlib import Path
from typing import Any

import torch

from gradzip.comm.collectives import CommStats
from gradzip.integrations.ddp import back_off_scaler, ddp_hook
from gradzip.util import atomic_file

try:
    import lightning.pytorch as pl
    from lightning.pytorch.strategies import DDPStrategy
except ImportError as err:  # pragma: no cover - the dev extras install it
    raise ImportError(
        "gradzip.integrations.lightning needs PyTorch Lightning: pip install lightning"
    ) from err

__all__ = ["CommHook", "state_path"]


def state_path(checkpoint: str | Path, rank: int) -> Path:
    """Where rank ``rank`` keeps its method state for Lightning checkpoint ``checkpoint``."""
    return Path(f"{checkpoint}.gradzip") / f"rank{rank}.pt"


class CommHook(pl.Callback):
    """Compress DDP's gradient communication in a Lightning run with gradzip method ``method``.

    ``options`` are the method's (``gradzip methods`` lists them); ``nan_policy`` as in ``gradzip.ddp_hook``.
    ``stats`` are this rank's traffic counters (``steps`` grows by one per optimizer step that the hook
    served). Refused, when the run starts, under a strategy that is not DDP (FSDP shards gradients and
    DeepSpeed reduces its own; see ``gradzip.integrations.fsdp`` for FSDP2)."""

    def __init__(self, method: str, *, nan_policy: str = "skip", **options: Any) -> None:
        # Built (and checked) now: a bad method or option fails before any process starts training.
        self.state, self._hook = ddp_hook(method, nan_policy=nan_policy, **options)
        self._patched: Any = None

    @property
    def stats(self) -> CommStats:
        return self.state.stats

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        strategy = trainer.strategy
        if not isinstance(strategy, DDPStrategy):
            raise ValueError(
                f"CommHook needs Lightning's DDP strategy (strategy='ddp' or 'ddp_spawn' with more than one "
                f"process); this trainer runs {type(strategy).__name__}, which has no DDP communication hook to "
                "compress (FSDP shards its gradients: use gradzip.integrations.fsdp.compress; DeepSpeed "
                "reduces its own)"
            )
        if getattr(strategy, "_ddp_comm_hook", None) is not None:
            raise ValueError(
                "CommHook and DDPStrategy(ddp_comm_hook=...) would both register a hook: keep one"
            )
        if self._patched is not strategy:
            self._patch(strategy)

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        ddp = trainer.strategy.model
        if not isinstance(ddp, torch.nn.parallel.DistributedDataParallel):
            raise ValueError(f"CommHook found no DDP model to hook (the strategy holds {type(ddp).__name__})")
        self.state.name_parameters(ddp)
        ddp.register_comm_hook(self.state, self._hook)
        if trainer.ckpt_path is not None:
            self._load(trainer.ckpt_path, trainer.global_rank)

    # ------------------------------------------------------------------------------------ the strategy
    def _patch(self, strategy: DDPStrategy) -> None:
        """Follow the strategy's checkpoint saves and removals (called on every rank, unlike the file writes
        they lead to) and its optimizer steps (skipped where the hook skipped the step)."""
        save, remove, step = strategy.save_checkpoint, strategy.remove_checkpoint, strategy.optimizer_step

        def save_checkpoint(checkpoint: dict[str, Any], filepath: Any, *args: Any, **kwargs: Any) -> None:
            save(checkpoint, filepath, *args, **kwargs)
            with atomic_file(state_path(filepath, strategy.global_rank)) as f:
                torch.save(self.state.state_dict(), f)

        def remove_checkpoint(filepath: Any) -> None:
            remove(filepath)
            with contextlib.suppress(OSError):
                state_path(filepath, strategy.global_rank).unlink()
                state_path(filepath, strategy.global_rank).parent.rmdir()  # once the last rank's file is gone

        def optimizer_step(optimizer: Any, closure: Any, model: Any = None, **kwargs: Any) -> Any:
            inner = getattr(optimizer, "optimizer", optimizer)
            if self.state.nan_policy != "skip" or isinstance(inner, torch.optim.LBFGS):
                return step(optimizer, closure, model, **kwargs)  # LBFGS evaluates its closure many times
            skipped = self.state.skipped_steps
            result = closure()  # the training step and its backward: the hook decides the step here
            if self.state.skipped_steps > skipped:  # (a training step that returned None ran no hook)
                # fp16 AMP: the Inf was the scaler's signal to lower its scale; the skip must not swallow it.
                back_off_scaler(getattr(strategy.precision_plugin, "scaler", None))
                return result
            return step(optimizer, lambda: result, model, **kwargs)

        strategy.save_checkpoint = save_checkpoint  # type: ignore[method-assign]
        strategy.remove_checkpoint = remove_checkpoint  # type: ignore[method-assign]
        strategy.optimizer_step = optimizer_step  # type: ignore[method-assign]
        self._patched = strategy

    def _load(self, ckpt_path: Any, rank: int) -> None:
        path = state_path(ckpt_path, rank)
        if not path.is_file():
            warnings.warn(
                f"no gradzip state at {path} beside the checkpoint: {self.state.method} starts its state afresh "
                "(residuals, factors) on this rank",
                stacklevel=2,
            )
            return
        try:
            sd = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # pickle, zip and torch errors alike: the file is unusable
            raise ValueError(f"gradzip state {path} cannot be read: {err}") from None
        self.state.load_state_dict(sd)
