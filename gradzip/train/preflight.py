"""Checks of a run that need its data and its model, made in the launching process before any worker starts:
a mistake there is one clear error, not a crash in every worker."""

from __future__ import annotations

from pathlib import Path

import torch

from gradzip.train import checkpoint
from gradzip.train.config import TrainConfig, steps_per_epoch, total_steps
from gradzip.train.data import DatasetError, load_dataset
from gradzip.train.models import build_model
from gradzip.util import check_writable, first_line


def preflight(cfg: TrainConfig) -> None:
    """Raise ValueError (one line) if the dataset cannot be read, holds fewer samples than workers, the model
    cannot take its samples, the checkpoint folder cannot be written, or the checkpoint to resume from is
    unreadable, of another run, or past the run's last step."""
    try:
        data = load_dataset(cfg.dataset, seed=cfg.seed)
    except DatasetError:
        raise
    except OSError as err:  # an unreadable path, a directory, ...
        raise ValueError(f"cannot read dataset {cfg.dataset!r}: {err}") from None
    steps_per_epoch(len(data.y_train), cfg.workers, cfg.batch_size)
    # On the meta device the model is built without allocating memory: even bert-large costs nothing, and a
    # forward pass on meta tensors checks shapes only, in no time.
    with torch.device("meta"):
        model = build_model(cfg.model, data.input_shape, data.num_classes)
    try:
        with torch.no_grad():
            model(data.x_train[:2].to("meta"))
    except Exception as err:
        raise ValueError(
            f"model {cfg.model!r} cannot take samples of dataset {cfg.dataset!r} (shape "
            f"{tuple(data.input_shape)}, {data.x_train.dtype}): {first_line(err)}"
        ) from None
    if cfg.checkpoint_dir is not None:
        root = Path(cfg.checkpoint_dir)
        check_writable(root / "checkpoint", "--checkpoint-dir")
        if cfg.resume:
            step = checkpoint.check_resumable(root, checkpoint.fingerprint(cfg, model, cfg.workers))
            last = total_steps(cfg, len(data.y_train), cfg.workers)
            if step is not None and step > last:
                raise checkpoint.CheckpointError(
                    f"checkpoint {checkpoint.step_dir(root, step)} is past this run's {last} steps: "
                    f"give --steps beyond {step}"
                )
