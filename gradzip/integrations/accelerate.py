"""gradzip in HF Accelerate: ``state = register(accelerator, model, "acpsgd", rank=4)`` after ``prepare``.

Why not ``DistributedDataParallelKwargs(comm_hook=...)``: Accelerate's ``comm_hook`` takes only the names of
its built-in hooks (``DDPCommunicationHookType``: fp16, bf16, power_sgd, batched_power_sgd) and maps each to
torch's own function; any other value registers nothing, without a word. So gradzip registers its hook on the
DDP model that ``accelerator.prepare`` returned, as ``model.register_comm_hook(state, hook)`` does by hand.

``register`` also hooks ``accelerator.save_state`` / ``load_state``: Accelerate writes a registered object
from the main process alone, but every process holds its own method state (error-feedback residuals,
factors, random streams), so every process writes ``gradzip_rank{R}.pt`` into the state folder and reads it
back from there (with ``weights_only=True``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch.nn.parallel import DistributedDataParallel as DDP

from gradzip.integrations.ddp import HookState, ddp_hook
from gradzip.util import atomic_file

__all__ = ["register", "state_file"]


def state_file(folder: str | Path, process_index: int) -> Path:
    """Where process ``process_index`` keeps its method state in an ``accelerator.save_state`` folder."""
    return Path(folder) / f"gradzip_rank{process_index}.pt"


def register(
    accelerator: Any, model: Any, method: str, *, nan_policy: str = "skip", **options: Any
) -> HookState:
    """Register gradzip method ``method`` (with its ``options``) on ``model``, the DDP model that
    ``accelerator.prepare`` returned, and every process's method state with ``save_state`` / ``load_state``.
    Returns the hook's state: ``state.stats`` counts this process's traffic; with ``nan_policy="skip"`` call
    ``optimizer.step()`` only when ``not state.step_skipped``, and under fp16 mixed precision call
    ``gradzip.integrations.ddp.back_off_scaler(accelerator.scaler)`` when it is (the skipped Inf was the
    scaler's signal to lower its scale)."""
    if not isinstance(model, DDP):
        kind = type(model).__name__
        if getattr(accelerator, "num_processes", 1) <= 1:
            raise ValueError(
                f"gradzip needs a run of several processes (accelerate launch / torchrun): with one, "
                f"accelerator.prepare returns the bare {kind}, and there is no gradient communication to compress"
            )
        raise ValueError(
            f"gradzip compresses DDP's gradient communication: pass the model accelerator.prepare returned "
            f"(a DistributedDataParallel), not a {kind} (FSDP shards its gradients: use "
            "gradzip.integrations.fsdp.compress)"
        )
    state, hook = ddp_hook(method, model=model, nan_policy=nan_policy, **options)
    model.register_comm_hook(state, hook)
    rank = accelerator.process_index

    def save(models: list[Any], weights: list[Any], output_dir: str) -> None:
        with atomic_file(state_file(output_dir, rank)) as f:
            torch.save(state.state_dict(), f)

    def load(models: list[Any], input_dir: str) -> None:
        path = state_file(input_dir, rank)
        if not path.is_file():
            raise FileNotFoundError(
                f"no gradzip state for process {rank} in {input_dir} ({path.name}): was it saved by a run "
                "with gradzip registered, and this many processes?"
            )
        try:
            sd = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # pickle, zip and torch errors alike: the file is unusable
            raise ValueError(f"gradzip state {path} cannot be read: {err}") from None
        state.load_state_dict(sd)

    accelerator.register_save_state_pre_hook(save)
    accelerator.register_load_state_pre_hook(load)
    return state
