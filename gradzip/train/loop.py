"""The per-worker training function: one process of a data-parallel run, DDP with a gradzip comm hook.

``run_worker(cfg)`` is the entrypoint of every worker, whether it was spawned by ``gradzip train`` (through
torch's elastic launcher) or started by torchrun; it reads its rank and the rendezvous from the environment
(``env://``). It is a top-level function of a plain dataclass so that it pickles for ``start_method="spawn"``.
"""

from __future__ import annotations

import dataclasses
import gc
import math
import os
import statistics
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from gradzip.registry import METHODS, get_spec, make_config
from gradzip.train.data import label_skew_epoch

BACKENDS = ("gloo", "nccl")
DATA_SPLITS = ("iid", "noniid")

# Steps when neither steps nor epochs is given; see TrainConfig for the other defaults.
DEFAULT_STEPS = 600

# Steps excluded from the median step time: the first iterations build DDP's buckets, warm the allocator and
# (for low-rank methods) allocate factors, so they are not representative.
TIMING_WARMUP_STEPS = 5

# The final loss is averaged over this many last steps (and over all workers): one mini-batch loss is noisy.
FINAL_LOSS_WINDOW = 10

# Test-set evaluation batch, bounding activation memory for the large models.
EVAL_BATCH = 1024


def optimizer_momentum(cfg: TrainConfig) -> float:
    """The optimizer's momentum: none where the method already applies it (momentum correction)."""
    return 0.0 if cfg.options.get("momentum_correction") else cfg.momentum


def local_processes(workers: int) -> int:
    """Worker processes on this machine: torchrun's LOCAL_WORLD_SIZE under torchrun, else ``workers``."""
    from gradzip.train.launch import under_torchrun

    return int(os.environ.get("LOCAL_WORLD_SIZE", workers)) if under_torchrun() else workers


def default_backend(workers: int | None = None) -> str:
    """nccl where every local worker can have a GPU of its own (NCCL refuses two ranks on one device), else
    gloo on the CPU."""
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    return "nccl" if gpus and (workers is None or local_processes(workers) <= gpus) else "gloo"


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

    def __post_init__(self) -> None:
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
        if self.backend == "nccl" and self.options.get("placement") == "server":
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
        if get_spec(self.method).kind == "gossip":
            from gradzip.gossip import make_topology

            make_topology(
                self.options["topology"], self.workers
            )  # a torus of 7 fails here, before any worker
        straggler = parse_straggler(self.straggler)
        if straggler is not None and straggler[0] >= self.workers:
            raise ValueError(
                f"straggler={self.straggler!r} is invalid: rank {straggler[0]} is not one of the {self.workers} workers"
            )

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


def _threads_per_worker() -> int:
    """Intra-op threads per worker: the cores this process may use divided by the workers on this machine.

    Without it every worker starts one thread per core, and N workers on C cores run N*C busy threads that
    preempt each other; for the small models that are the default this makes each step several times slower.
    """
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    return max(1, cores // local_world)


def _params_checksum(model: nn.Module) -> torch.Tensor:
    """A few float64 numbers per parameter tensor that differ between ranks if the parameters differ.

    Identical tensors reduce identically on the same hardware, so identical parameters give bit-identical
    checksums; comparing the element-wise max and min across ranks is then an exact test for them being equal
    and costs one tiny all-reduce instead of shipping the model.
    """
    parts = []
    for p in model.parameters():
        v = p.detach().reshape(-1).double()
        parts.append(torch.stack([v.sum(), (v * v).sum(), v[0], v[-1], v[v.numel() // 2]]))
    return torch.cat(parts) if parts else torch.zeros(1, dtype=torch.float64)


def time_to_target(evals: list[dict[str, float]], target: float | None) -> dict[str, Any]:
    """Training time and steps until the accuracy first reached ``target`` (None if it never did)."""
    if target is None:
        return {}
    hit = next((e for e in evals if e["accuracy"] >= target), None)
    return {
        "target_accuracy": target,
        "time_to_target_s": hit["train_time_s"] if hit else None,
        "steps_to_target": int(hit["step"]) if hit else None,
    }


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, device: torch.device) -> float:
    was_training = model.training
    model.eval()
    correct = 0
    for i in range(0, len(y), EVAL_BATCH):
        logits = model(x[i : i + EVAL_BATCH].to(device))
        correct += int((logits.argmax(dim=1).cpu() == y[i : i + EVAL_BATCH]).sum())
    model.train(was_training)
    return correct / max(1, len(y))


def run_worker(cfg: TrainConfig) -> dict[str, Any] | None:
    """Train one worker of the run described by the environment (RANK, WORLD_SIZE, MASTER_ADDR, ...).

    Returns the run's summary (with ``history``, its per-step records) on global rank 0 and None on the
    other ranks. The process group is destroyed on the way out, also when training fails.
    """
    import gradzip
    from gradzip.train.data import load_dataset, shard_indices
    from gradzip.train.models import build_model

    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if cfg.backend == "nccl":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
        torch.set_num_threads(_threads_per_worker())

    dist.init_process_group(cfg.backend, timeout=timedelta(seconds=cfg.timeout))
    try:
        if get_spec(cfg.method).kind == "gossip":  # decentralized: no DDP, no all-reduce in the step
            from gradzip.train.decentralized import train_decentralized

            return train_decentralized(cfg, device)
        from gradzip.train.paramserver import server_count, train_with_servers

        if server_count(cfg.method, cfg.options):
            return train_with_servers(cfg, device)
        return _train(cfg, device, gradzip.ddp_hook, load_dataset, shard_indices, build_model)
    finally:
        # Free the model, DDP and the hook (reference cycles) while the interpreter is fully alive: gloo work
        # objects freed during interpreter teardown can abort the process (pytorch#190489).
        gc.collect()
        dist.destroy_process_group()


@dataclass
class Exchange:
    """How one worker's training step talks to the others (DDP with a gradzip hook, or a parameter-server
    client): the training loop and its summary are the same for every pattern."""

    module: nn.Module
    """What the forward pass runs on (the DDP wrapper, or the model itself)."""
    stats: Any
    """The pattern's CommStats (bytes_sent, bytes_received, bytes_uncompressed)."""
    optimizer: torch.optim.Optimizer | None
    """The worker's optimizer; None where the update is applied by the pattern (asynchronous servers)."""
    after_backward: Callable[[], None] = lambda: None
    """Runs between backward and the optimizer step (a parameter-server exchange)."""
    group: dist.ProcessGroup | None = None
    """The process group of the training workers, for the metrics' collectives."""
    close: Callable[[], dict[str, Any]] = dict
    """Ends the exchange after the last step; returns extra summary items (rank 0)."""


def _ddp_exchange(cfg: TrainConfig, model: nn.Module, device: torch.device, ddp_hook: Any) -> Exchange:
    ddp_model = DDP(
        model,
        device_ids=[device.index] if device.type == "cuda" else None,
        bucket_cap_mb=cfg.bucket_cap_mb,
    )
    state, hook = ddp_hook(cfg.method, model=ddp_model, **cfg.options)
    ddp_model.register_comm_hook(state, hook)
    optimizer = torch.optim.SGD(ddp_model.parameters(), lr=cfg.lr, momentum=optimizer_momentum(cfg))
    return Exchange(ddp_model, state.stats, optimizer)


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


def epoch_shard(
    cfg: TrainConfig, data: Any, shard_indices: Any, rank: int, world: int, epoch: int
) -> torch.Tensor:
    """This rank's samples for ``epoch``: a disjoint share of a fresh permutation (iid: every epoch sees every
    sample once), or a fixed label-skewed shard reshuffled (noniid)."""
    if cfg.data_split == "iid":
        return shard_indices(len(data.y_train), rank, world, cfg.seed, epoch)
    return label_skew_epoch(data.y_train, rank, world, cfg.seed, epoch)


def step_batches(
    cfg: TrainConfig,
    data: Any,
    shard_indices: Any,
    rank: int,
    world: int,
    n_steps: int,
    per_epoch: int,
    batch: int,
    device: torch.device,
) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
    """(step, inputs, labels) of this rank for every step: a new shard at each epoch's start."""
    shard = torch.empty(0, dtype=torch.long)
    for step in range(n_steps):
        epoch, i = divmod(step, per_epoch)
        if i == 0:
            shard = epoch_shard(cfg, data, shard_indices, rank, world, epoch)
        idx = shard[i * batch : (i + 1) * batch]
        yield step, data.x_train[idx].to(device), data.y_train[idx].to(device)


def step_bar(cfg: TrainConfig, rank: int, world: int, n_steps: int) -> Any:
    """The training progress bar (rank 0, unless quiet), or None."""
    if rank != 0 or cfg.quiet:
        return None
    from tqdm import tqdm

    return tqdm(total=n_steps, desc=f"{cfg.method} x{world}", unit="step", dynamic_ncols=True)


def reduce_metrics(
    losses: torch.Tensor,
    times: torch.Tensor,
    stats: Any,
    device: torch.device,
    group: dist.ProcessGroup | None = None,
) -> tuple[torch.Tensor, list[float], list[float]]:
    """After the timed loop: the per-step losses averaged over the workers, the mean bytes sent, received and
    uncompressed per worker per step, and each worker's training time.

    One collective each after the loop rather than one per step. NCCL only reduces CUDA tensors: metrics
    travel on the training device and come back."""
    world, n_steps = dist.get_world_size(group), len(losses)
    losses = losses.to(device)
    dist.all_reduce(losses, group=group)
    mine = torch.tensor(
        [stats.bytes_sent, stats.bytes_received, stats.bytes_uncompressed, float(times.sum())],
        dtype=torch.float64,
        device=device,
    )
    every = [torch.zeros_like(mine) for _ in range(world)]
    dist.all_gather(every, mine, group=group)
    totals = torch.stack(every).sum(0).cpu()[:3] / (world * n_steps)
    return losses.cpu() / world, [float(v) for v in totals], [float(t[3]) for t in every]


def params_agreement(
    model: nn.Module, device: torch.device, group: dist.ProcessGroup | None = None
) -> tuple[bool, float]:
    """Whether every worker holds bit-identical parameters, and otherwise the largest difference."""
    checksum = _params_checksum(model).to(device)
    high, low = checksum.clone(), checksum.clone()
    dist.all_reduce(high, op=dist.ReduceOp.MAX, group=group)
    dist.all_reduce(low, op=dist.ReduceOp.MIN, group=group)
    if torch.equal(high, low):
        return True, 0.0
    # Worth a number: how far apart are they? The full vector travels only in this case (every rank takes
    # this branch, as the all-reduced checksums are the same everywhere).
    vec = torch.cat([p.detach().reshape(-1).double() for p in model.parameters()])
    high, low = vec.clone(), vec
    dist.all_reduce(high, op=dist.ReduceOp.MAX, group=group)
    dist.all_reduce(low, op=dist.ReduceOp.MIN, group=group)
    return False, float((high - low).max())


def summary(
    cfg: TrainConfig,
    data: Any,
    world: int,
    batch: int,
    per_epoch: int,
    losses: torch.Tensor,
    times: torch.Tensor,
    totals: list[float],
    accuracy: float,
    evals: list[dict[str, float]],
) -> dict[str, Any]:
    """The summary items every kind of run reports (rank 0)."""
    n_steps = len(losses)
    timed = times[TIMING_WARMUP_STEPS:] if n_steps > 2 * TIMING_WARMUP_STEPS else times[n_steps // 2 :]
    bytes_sent, bytes_received, bytes_uncompressed = totals
    return {
        "method": cfg.method,
        "options": dict(cfg.options),
        "model": cfg.model,
        "dataset": data.name,
        "workers": world,
        "backend": cfg.backend,
        "batch_size": batch,
        "lr": cfg.lr,
        "momentum": cfg.momentum,
        "seed": cfg.seed,
        "steps": n_steps,
        "epochs": n_steps / per_epoch,
        "data_split": cfg.data_split,
        "final_loss": float(losses[-FINAL_LOSS_WINDOW:].mean()),
        "test_accuracy": accuracy,
        "time_per_step_s": statistics.median(timed.tolist()),
        "total_train_time_s": float(times.sum()),
        "bytes_sent_per_step": bytes_sent,
        "bytes_received_per_step": bytes_received,
        "bytes_uncompressed_per_step": bytes_uncompressed,
        # None rather than inf when nothing was sent (JSON has no infinity).
        "compression_ratio": bytes_uncompressed / bytes_sent if bytes_sent > 0 else None,
        "accuracy_history": evals,
        **time_to_target(evals, cfg.target_accuracy),
    }


def setup_run(
    cfg: TrainConfig, device: torch.device, world: int, load_dataset: Any, build_model: Any
) -> tuple[Any, int, int, int, nn.Module]:
    """What every kind of run starts from: the dataset, the step count, steps per epoch, the per-worker batch,
    and the model, seeded the same everywhere so that every worker starts from the same parameters (DDP
    also broadcasts rank 0's at construction, but seeding keeps that a no-op and the run reproducible;
    D-PSGD assumes it)."""
    data = load_dataset(cfg.dataset, seed=cfg.seed)
    n_train = len(data.y_train)
    n_steps = total_steps(cfg, n_train, world)
    per_epoch = steps_per_epoch(n_train, world, cfg.batch_size)
    batch = min(cfg.batch_size, n_train // world)
    torch.manual_seed(cfg.seed)
    model = build_model(cfg.model, data.input_shape, data.num_classes).to(device)
    return data, n_steps, per_epoch, batch, model


def _train(
    cfg: TrainConfig,
    device: torch.device,
    ddp_hook: Any,
    load_dataset: Any,
    shard_indices: Any,
    build_model: Any,
    make_exchange: Callable[[TrainConfig, nn.Module, torch.device], Exchange] | None = None,
    group: dist.ProcessGroup | None = None,
) -> dict[str, Any] | None:
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    data, n_steps, per_epoch, batch, model = setup_run(cfg, device, world, load_dataset, build_model)
    if make_exchange is None:
        ex = _ddp_exchange(cfg, model, device, ddp_hook)
    else:
        ex = make_exchange(cfg, model, device)
    straggler = parse_straggler(cfg.straggler)
    slowdown = straggler[1] if straggler is not None and straggler[0] == rank else 1.0

    bar = step_bar(cfg, rank, world, n_steps)
    losses = torch.zeros(n_steps, dtype=torch.float64)
    times = torch.zeros(n_steps, dtype=torch.float64)
    sent = torch.zeros(n_steps, dtype=torch.float64)
    evals: list[dict[str, float]] = []
    ex.module.train()
    try:
        for step, x, y in step_batches(
            cfg, data, shard_indices, rank, world, n_steps, per_epoch, batch, device
        ):
            sent_before = ex.stats.bytes_sent
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            t0 = time.perf_counter()
            if ex.optimizer is not None:
                ex.optimizer.zero_grad(set_to_none=True)
            else:
                ex.module.zero_grad(set_to_none=True)
            loss = F.cross_entropy(ex.module(x), y)
            loss.backward()
            if slowdown > 1:  # an emulated straggler: its compute takes `slowdown` times as long
                time.sleep((slowdown - 1) * (time.perf_counter() - t0))
            ex.after_backward()
            if ex.optimizer is not None:
                ex.optimizer.step()
            # .item() synchronizes with the device, so the time includes the step's kernels and collectives.
            loss_value = loss.item()
            times[step] = time.perf_counter() - t0
            losses[step] = loss_value
            sent[step] = ex.stats.bytes_sent - sent_before
            if not math.isfinite(loss_value):
                raise FloatingPointError(f"loss is {loss_value} at step {step}; try a smaller --lr")
            if cfg.eval_every and (step + 1) % cfg.eval_every == 0:
                # Every replica holds the same model, so each evaluates it alone: no collective, and the
                # evaluation's own time is left out of the training time it is stamped with.
                acc = evaluate(model, data.x_test, data.y_test, device)
                evals.append(
                    {"step": step + 1, "train_time_s": float(times[: step + 1].sum()), "accuracy": acc}
                )
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{loss_value:.4f}", refresh=False)
    finally:
        if bar is not None:
            bar.close()
    extra = ex.close()

    losses, totals, worker_train_time_s = reduce_metrics(losses, times, ex.stats, device, ex.group)
    params_identical, params_max_abs_diff = params_agreement(model, device, ex.group)
    if rank != 0:
        return None
    return {
        **summary(
            cfg,
            data,
            world,
            batch,
            per_epoch,
            losses,
            times,
            totals,
            evaluate(model, data.x_test, data.y_test, device),
            evals,
        ),
        "params_identical": params_identical,
        "params_max_abs_diff": params_max_abs_diff,
        "worker_train_time_s": worker_train_time_s,
        **extra,
        "history": [
            {"step": s, "loss": float(losses[s]), "time": float(times[s]), "bytes_sent": int(sent[s])}
            for s in range(n_steps)
        ],
    }
