"""One worker process of a training run: ``run_worker(cfg)``.

It is the entrypoint of every worker, whether it was spawned by ``gradzip train`` (through torch's elastic
launcher) or started by torchrun; it reads its rank and the rendezvous from the environment (``env://``). It
is a top-level function of a plain dataclass so that it pickles for ``start_method="spawn"``.
"""

from __future__ import annotations

import dataclasses
import gc
import os
import sys
import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from gradzip.comm.collectives import workers_group
from gradzip.integrations.paramserver import serve
from gradzip.registry import servers_needed
from gradzip.train import checkpoint
from gradzip.train.config import TrainConfig, parse_straggler, steps_per_epoch, total_steps
from gradzip.train.data import Dataset, label_skew_epoch, load_dataset, shard_indices
from gradzip.train.env import threads_per_worker
from gradzip.train.exchange import Exchange, Settings, build_exchange
from gradzip.train.loop import evaluate, run_steps
from gradzip.train.models import build_model
from gradzip.train.records import LoopResult
from gradzip.train.summary import (
    GossipSection,
    RunSummary,
    ServerSection,
    TargetResult,
    final_loss,
    median_step_time,
    params_agreement,
    reduce_metrics,
)
from gradzip.util import is_failed_wait


def run_worker(cfg: TrainConfig) -> RunSummary | None:
    """Train one worker of the run described by the environment (RANK, WORLD_SIZE, MASTER_ADDR, ...).

    Returns the run's summary on global rank 0 and None on the other ranks (and on parameter servers). The
    process group is destroyed on the way out, also when training fails.
    """
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if cfg.backend == "nccl":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
        torch.set_num_threads(threads_per_worker())

    init_process_group(cfg.backend, timedelta(seconds=cfg.timeout))
    try:
        return _train(cfg, device)
    except RuntimeError as err:
        if not is_failed_wait(str(err)):
            raise
        stalled = unanswering_workers(cfg.workers, min(10.0, cfg.timeout))
        if not stalled:
            raise
        raise PeerStalled(stalled, cfg.timeout) from err
    finally:
        # Free the model, DDP and the hook (reference cycles) while the interpreter is fully alive: gloo work
        # objects freed during interpreter teardown can abort the process (pytorch#190489).
        gc.collect()
        dist.destroy_process_group()


class PeerStalled(RuntimeError):
    """Workers that stopped answering (stalled, or gone): a wait on them failed, and they did not answer the
    survivors' roll call either. ``ranks`` are their global ranks."""

    def __init__(self, ranks: list[int], timeout: float) -> None:
        names = ", ".join(map(str, ranks))
        super().__init__(
            f"worker rank {names} stopped answering: a wait on {'it' if len(ranks) == 1 else 'them'} failed "
            f"after {timeout:g}s and {'it' if len(ranks) == 1 else 'they'} did not answer the other workers"
        )
        self.ranks = ranks


def unanswering_workers(workers: int, wait_s: float) -> list[int]:
    """After a wait on the others failed: the training workers (global ranks ``0..workers-1``) that do not
    answer a roll call in the run's store within ``wait_s`` seconds. Every survivor marks itself present and
    looks for the others' marks, so a stalled or dead worker is the one without a mark. Empty when all
    answer, or when the store is gone too (nothing can be said)."""
    try:
        store = dist.distributed_c10d._get_default_store()
        rank = dist.get_rank()
        store.set(f"gradzip/roll-call/{rank}", "here")
        deadline = time.monotonic() + wait_s
        missing = [r for r in range(workers) if r != rank]
        while missing and time.monotonic() < deadline:
            missing = [r for r in missing if not store.check([f"gradzip/roll-call/{r}"])]
            time.sleep(0.1)
    except Exception:  # the store itself failed: no roll call to go on
        return []
    return missing


def init_process_group(backend: str, timeout: timedelta) -> None:
    """``init_process_group`` from the environment (env://). Under an elastic agent (``gradzip train
    --max-restarts``, torchrun) every attempt gets keys of its own in the agent's store: the store outlives a
    restart, and a worker of the new attempt must not read an address its dead predecessor published
    (seen: "connectFullMesh failed ... Connection refused" on every restart)."""
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        dist.init_process_group(backend, timeout=timeout)
        return
    store = dist.TCPStore(
        os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), int(os.environ["WORLD_SIZE"]),
        is_master=False, timeout=timeout,
    )  # fmt: skip
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    dist.init_process_group(
        backend,
        store=dist.PrefixStore(f"/gradzip/attempt_{attempt}", store),
        rank=int(os.environ["RANK"]),
        world_size=int(os.environ["WORLD_SIZE"]),
        timeout=timeout,
    )


def _train(cfg: TrainConfig, device: torch.device) -> RunSummary | None:
    group = None
    servers = servers_needed(cfg.method, cfg.options)
    if servers:
        # The last ranks serve until every worker has closed; the metrics' collectives run on the workers'
        # group (every process must take part in creating it, the servers too).
        workers = dist.get_world_size() - servers
        if workers < 1:
            raise ValueError(
                f"{dist.get_world_size()} processes cannot hold {servers} servers and at least one worker"
            )
        group = workers_group(workers, timedelta(seconds=cfg.timeout))
        if dist.get_rank() >= workers:
            serve()
            return None
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    data, n_steps, per_epoch, batch, model = setup_run(cfg, device, world)
    root = Path(cfg.checkpoint_dir) if cfg.checkpoint_dir is not None else None
    meta = checkpoint.fingerprint(cfg, model, world)
    # The NaN policy may change on a resume, but every worker must run the same one (it decides who takes part
    # in the step's agreement).
    checkpoint.check_same_run_everywhere({**meta, "nan_policy": cfg.nan_policy}, group)
    saved = None
    # A restart after a worker died (the launcher's --max-restarts, or torchrun's) continues where it was.
    restarted = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) > 0
    if root is not None and (cfg.resume or restarted):
        step = checkpoint.agreed_step(root, group)  # the latest one every worker holds (a collective)
        if step is not None:
            if rank == 0:
                checkpoint.check_same_run(
                    checkpoint.read_meta(root, step), meta, checkpoint.step_dir(root, step)
                )
            saved = checkpoint.load(root, step, rank)
            if rank == 0 and not cfg.quiet:
                print(f"gradzip: resuming from {checkpoint.step_dir(root, step)}", file=sys.stderr)
            if step > n_steps:
                raise checkpoint.CheckpointError(
                    f"checkpoint {checkpoint.step_dir(root, step)} is past this run's {n_steps} steps"
                )
        elif rank == 0 and not cfg.quiet:
            print(f"gradzip: no checkpoint in {root} yet: starting from step 0", file=sys.stderr)
    run = Settings(
        cfg.method, cfg.options, cfg.lr, cfg.momentum, cfg.bucket_cap_mb, cfg.timeout, cfg.nan_policy
    )
    server_states = saved["exchange"].get("servers") if saved is not None else None
    ex = build_exchange(model, device, run, group, server_states)
    result = checkpoint.restore(saved, ex) if saved is not None else None
    start = len(result.records) if result is not None else 0
    checkpoints = (
        checkpoint.RunCheckpoints(root, cfg.checkpoint_every, cfg.keep, n_steps, ex, meta, group)
        if root is not None
        else None
    )
    straggler = parse_straggler(cfg.straggler)
    bar = step_bar(cfg, rank, world, n_steps, start)
    try:
        result = run_steps(
            ex,
            step_batches(cfg, data, rank, world, n_steps, per_epoch, batch, device, start),
            device,
            evaluate_model=lambda m: evaluate(m, data.x_test, data.y_test, device),
            eval_every=cfg.eval_every,
            slowdown=straggler[1] if straggler is not None and straggler[0] == rank else 1.0,
            bar=bar,
            time_parts=False,
            result=result,
            checkpoints=checkpoints,
        )
    finally:
        if bar is not None:
            bar.close()
    return summarize(cfg, data, world, batch, per_epoch, ex, result, device)


def setup_run(cfg: TrainConfig, device: torch.device, world: int) -> tuple[Dataset, int, int, int, nn.Module]:
    """What every run starts from: the dataset, the step count, steps per epoch, the per-worker batch, and
    the model, seeded the same everywhere so that every worker starts from the same parameters (DDP also
    broadcasts rank 0's at construction, but seeding keeps that a no-op and the run reproducible; D-PSGD
    assumes it)."""
    data = load_dataset(cfg.dataset, seed=cfg.seed)
    n_train = len(data.y_train)
    n_steps = total_steps(cfg, n_train, world)
    per_epoch = steps_per_epoch(n_train, world, cfg.batch_size)
    batch = min(cfg.batch_size, n_train // world)
    torch.manual_seed(cfg.seed)
    model = build_model(cfg.model, data.input_shape, data.num_classes).to(device)
    return data, n_steps, per_epoch, batch, model


def epoch_shard(cfg: TrainConfig, data: Dataset, rank: int, world: int, epoch: int) -> torch.Tensor:
    """This rank's samples for ``epoch``: a disjoint share of a fresh permutation (iid: every epoch sees every
    sample once), or a fixed label-skewed shard reshuffled (noniid)."""
    if cfg.data_split == "iid":
        return shard_indices(len(data.y_train), rank, world, cfg.seed, epoch)
    return label_skew_epoch(data.y_train, rank, world, cfg.seed, epoch)


def step_batches(
    cfg: TrainConfig,
    data: Dataset,
    rank: int,
    world: int,
    n_steps: int,
    per_epoch: int,
    batch: int,
    device: torch.device,
    start: int = 0,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(inputs, labels) of this rank for every step from ``start``: a new shard at each epoch's start (the
    shards depend on the seed and the epoch only, so a resumed run sees what the original would have)."""
    shard = None
    for step in range(start, n_steps):
        epoch, i = divmod(step, per_epoch)
        if i == 0 or shard is None:
            shard = epoch_shard(cfg, data, rank, world, epoch)
        idx = shard[i * batch : (i + 1) * batch]
        yield data.x_train[idx].to(device), data.y_train[idx].to(device)


def step_bar(cfg: TrainConfig, rank: int, world: int, n_steps: int, start: int = 0) -> Any:
    """The training progress bar (rank 0, unless quiet), or None."""
    if rank != 0 or cfg.quiet:
        return None
    from tqdm import tqdm

    return tqdm(total=n_steps, initial=start, desc=f"{cfg.method} x{world}", unit="step", dynamic_ncols=True)


def summarize(
    cfg: TrainConfig,
    data: Dataset,
    world: int,
    batch: int,
    per_epoch: int,
    ex: Exchange,
    result: LoopResult,
    device: torch.device,
) -> RunSummary | None:
    """The run's summary on rank 0 (None elsewhere), from the loop's records and the collectives after it,
    in the same order on every worker."""
    ex.close()
    assert ex.stats is not None  # every registry method counts its traffic
    losses, totals, worker_train_time_s = reduce_metrics(
        result.records, ex.stats, device, ex.group, ex.reference
    )
    # Not identical is the normal case for gossip: the models agree only up to the consensus distance.
    params_identical, params_max_abs_diff = params_agreement(ex.model, device, ex.group)
    accuracy, section = ex.report(lambda m: evaluate(m, data.x_test, data.y_test, device))
    if accuracy is None:
        return None
    n_steps = len(result.records)
    bytes_sent, bytes_received, bytes_uncompressed, ring, ring_uncompressed = totals
    history = [dataclasses.replace(r, loss=loss) for r, loss in zip(result.records, losses, strict=True)]
    return RunSummary(
        method=cfg.method,
        options=dict(cfg.options),
        model=cfg.model,
        dataset=data.name,
        workers=world,
        backend=cfg.backend,
        batch_size=batch,
        lr=cfg.lr,
        momentum=cfg.momentum,
        seed=cfg.seed,
        steps=n_steps,
        epochs=n_steps / per_epoch,
        data_split=cfg.data_split,
        final_loss=final_loss(losses),
        test_accuracy=accuracy,
        time_per_step_s=median_step_time(result.records),
        total_train_time_s=result.train_time_s,
        bytes_sent_per_step=bytes_sent,
        bytes_received_per_step=bytes_received,
        bytes_uncompressed_per_step=bytes_uncompressed,
        ring_bytes_per_step=ring,
        ring_bytes_uncompressed_per_step=ring_uncompressed,
        params_identical=params_identical,
        params_max_abs_diff=params_max_abs_diff,
        worker_train_time_s=worker_train_time_s,
        skipped_steps=sum(r.skipped for r in result.records),
        accuracy_history=result.evals,
        target=TargetResult.of(result.evals, cfg.target_accuracy)
        if cfg.target_accuracy is not None
        else None,
        servers=section if isinstance(section, ServerSection) else None,
        gossip=section if isinstance(section, GossipSection) else None,
        history=history,
    )
