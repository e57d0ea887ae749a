"""Every option of a ``gradzip train`` run, validated before any worker process starts."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

import torch

from gradzip.comm.finite import check_nan_policy
from gradzip.comm.topology import make_topology
from gradzip.config import check_type
from gradzip.registry import METHODS, family, get_spec, make_config
from gradzip.train.env import default_backend, local_processes

BACKENDS = ("gloo", "nccl")
DATA_SPLITS = ("iid", "noniid")

# Steps when neither steps nor epochs is given; see TrainConfig for the other defaults.
DEFAULT_STEPS = 600


def optimizer_momentum(options: dict[str, Any], momentum: float) -> float:
    """The optimizer's momentum: none where the method already applies it (momentum correction)."""
    return 0.0 if options.get("momentum_correction") else momentum


def parse_straggler(text: str | None) -> tuple[int, float] | None:
    """``"RANK:FACTOR"`` -> (rank, factor): that worker's steps take ``factor`` times as long."""
    if text is None:
        return None
    try:
        rank_text, factor_text = text.split(":")
        rank, factor = int(rank_text), float(factor_text)
    except ValueError:
        raise ValueError(f"straggler={text!r} is invalid: it must be RANK:FACTOR, e.g. 1:3") from None
    if rank < 0 or not (factor >= 1 and math.isfinite(factor)):
        raise ValueError(f"straggler={text!r} is invalid: RANK must be >= 0 and FACTOR >= 1")
    return rank, factor


@dataclass
class TrainConfig:
    """Every option of a training run; validated here so that a bad value fails before any process starts.

    Exactly one of ``steps`` and ``epochs`` is set (``steps`` defaults to ``DEFAULT_STEPS`` when neither is).
    ``options`` are the method's options (``gradzip.registry.make_config(method, **options)``).
    """

    method: str = "acpsgd"
    options: dict[str, Any] = field(default_factory=dict)
    model: str = "mlp"
    dataset: str = "digits"
    workers: int = 2
    batch_size: int = 32
    lr: float = 0.05
    momentum: float = 0.9
    steps: int | None = None
    epochs: float | None = None
    seed: int = 0
    backend: str = field(default_factory=default_backend)
    bucket_cap_mb: float = 25.0
    timeout: float = 300.0
    quiet: bool = False
    eval_every: int = 0
    """Evaluate the test accuracy every this many steps (0: only at the end), for time to accuracy."""
    target_accuracy: float | None = None
    """Report the training time and steps until the test accuracy first reaches this (needs eval_every)."""
    data_split: str = "iid"
    """``iid``: a fresh disjoint share of the data each epoch; ``noniid``: a fixed label-skewed shard per worker."""
    straggler: str | None = None
    """``RANK:FACTOR``: emulate a slow worker whose steps take FACTOR times as long (asynchronous studies)."""
    checkpoint_dir: str | None = None
    """Where checkpoints are written (and read with ``resume``): every worker's and every server's state."""
    checkpoint_every: int = 0
    """Write a checkpoint every this many steps, and after the last (0: after the last step only)."""
    resume: bool = False
    """Resume from the latest checkpoint in ``checkpoint_dir`` that every worker holds (start afresh if none)."""
    keep: int = 2
    """Checkpoints kept; older ones are removed once every worker has written a newer one."""
    max_restarts: int = 0
    """Restart every worker this many times at most when one dies; they continue from the latest checkpoint."""
    nan_policy: str = "skip"
    """A NaN or an Inf in any worker's gradient: ``skip`` the step on every worker, ``raise``, or ``off``
    (:mod:`gradzip.comm.finite`)."""

    def __post_init__(self) -> None:
        # Types first, so every later check compares numbers, and a wrong type is a ValueError naming it.
        for f in dataclasses.fields(self):
            if f.name != "options":
                setattr(self, f.name, check_type(f.name, f.type, getattr(self, f.name)))
        if not isinstance(self.options, dict):
            raise ValueError(f"options={self.options!r} is invalid: options must be a dict of method options")
        # Sparsifiers apply the run's momentum themselves (DGC momentum correction) unless told otherwise:
        # optimizer momentum on top of error-feedback sparsification diverges (random-k at 1% on digits).
        fields = (
            {f.name for f in dataclasses.fields(get_spec(self.method).config_cls)}
            if self.method in METHODS
            else set()
        )
        if "momentum_correction" in fields and "momentum_correction" not in self.options:
            self.options = {**self.options, "momentum_correction": self.momentum}
        # make_config raises ValueError naming an unknown method, an unknown option or a bad value.
        self.options = make_config(self.method, **self.options).to_dict()
        if self.steps is not None and self.epochs is not None:
            raise ValueError("give either steps or epochs, not both")
        if self.steps is None and self.epochs is None:
            self.steps = DEFAULT_STEPS
        if self.steps is not None and (not isinstance(self.steps, int) or self.steps < 1):
            raise ValueError(f"steps={self.steps!r} is invalid: steps must be an integer >= 1")
        if self.epochs is not None and not (self.epochs > 0 and math.isfinite(self.epochs)):
            raise ValueError(f"epochs={self.epochs!r} is invalid: epochs must be > 0")
        if not isinstance(self.eval_every, int) or self.eval_every < 0:
            raise ValueError(f"eval_every={self.eval_every!r} is invalid: eval_every must be an integer >= 0")
        if self.target_accuracy is not None:
            if not 0.0 < self.target_accuracy <= 1.0:
                raise ValueError(f"target_accuracy={self.target_accuracy!r} is invalid: it must be in (0, 1]")
            if self.eval_every == 0:
                raise ValueError("target_accuracy needs eval_every > 0 (how often to check the accuracy)")
        if not isinstance(self.workers, int) or self.workers < 1:
            raise ValueError(f"workers={self.workers!r} is invalid: workers must be an integer >= 1")
        if not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise ValueError(f"batch_size={self.batch_size!r} is invalid: batch_size must be an integer >= 1")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"lr={self.lr!r} is invalid: lr must be > 0")
        if not 0.0 <= self.momentum < 1.0:
            raise ValueError(f"momentum={self.momentum!r} is invalid: momentum must be in [0, 1)")
        if self.backend not in BACKENDS:
            raise ValueError(
                f"backend={self.backend!r} is invalid: backend must be one of {', '.join(BACKENDS)}"
            )
        if self.backend == "nccl" and self.family == "server":
            raise ValueError("the parameter-server placements run on gloo (CPU tensors): use --backend gloo")
        if self.backend == "nccl" and not torch.cuda.is_available():
            raise ValueError("backend='nccl' needs CUDA, which is not available here; use --backend gloo")
        if self.backend == "nccl" and local_processes(self.workers) > torch.cuda.device_count():
            raise ValueError(
                f"backend='nccl' needs a GPU per worker: {local_processes(self.workers)} workers on this "
                f"machine but {torch.cuda.device_count()} GPU(s); use --workers "
                f"{torch.cuda.device_count()} or --backend gloo"
            )
        if not self.bucket_cap_mb > 0:
            raise ValueError(f"bucket_cap_mb={self.bucket_cap_mb!r} is invalid: bucket_cap_mb must be > 0")
        if not self.timeout > 0:
            raise ValueError(f"timeout={self.timeout!r} is invalid: timeout must be > 0 seconds")
        if self.data_split not in DATA_SPLITS:
            raise ValueError(f"data_split={self.data_split!r} is invalid: data_split must be iid or noniid")
        if self.family == "gossip":
            make_topology(
                self.options["topology"], self.workers
            )  # a torus of 7 fails here, before any worker
        if not isinstance(self.checkpoint_every, int) or self.checkpoint_every < 0:
            raise ValueError(
                f"checkpoint_every={self.checkpoint_every!r} is invalid: checkpoint_every must be an integer >= 0"
            )
        if not isinstance(self.keep, int) or self.keep < 1:
            raise ValueError(f"keep={self.keep!r} is invalid: keep must be an integer >= 1")
        if self.checkpoint_dir is None and (self.checkpoint_every or self.resume):
            raise ValueError("checkpoint_every and resume need checkpoint_dir (where the checkpoints are)")
        if not isinstance(self.max_restarts, int) or self.max_restarts < 0:
            raise ValueError(
                f"max_restarts={self.max_restarts!r} is invalid: max_restarts must be an integer >= 0"
            )
        if self.max_restarts and self.checkpoint_dir is None:
            raise ValueError(
                "max_restarts needs checkpoint_dir: restarted workers continue from the latest checkpoint"
            )
        check_nan_policy(self.nan_policy)
        straggler = parse_straggler(self.straggler)
        if straggler is not None and straggler[0] >= self.workers:
            raise ValueError(
                f"straggler={self.straggler!r} is invalid: rank {straggler[0]} is not one of the {self.workers} workers"
            )

    @property
    def family(self) -> str:
        """How this run trains: "hook", "server" or "gossip" (``gradzip.registry.family``)."""
        return family(self.method, self.options)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def steps_per_epoch(n_train: int, world: int, batch_size: int) -> int:
    """Mini-batches per epoch, the same on every rank (DDP needs every rank to run the same number of steps).

    Each rank owns ``n_train // world`` samples of an epoch (a remainder is dropped so that shards are equal);
    a batch larger than the shard shrinks to the shard.
    """
    per_rank = n_train // world
    if per_rank < 1:
        raise ValueError(f"the training set has {n_train} samples, fewer than the {world} workers")
    return per_rank // min(batch_size, per_rank)


def total_steps(cfg: TrainConfig, n_train: int, world: int) -> int:
    if cfg.steps is not None:
        return cfg.steps
    assert cfg.epochs is not None
    return max(1, math.ceil(cfg.epochs * steps_per_epoch(n_train, world, cfg.batch_size)))
