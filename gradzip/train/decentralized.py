"""The per-worker training function of the decentralized methods (``dpsgd``, ``choco``, ``powergossip``).

No DDP and no all-reduce in the step: each worker trains its own model with SGD and, after every
``optimizer.step()``, gossips with its neighbours (``g.step()``). The metrics are collectives outside the
gossip: the consensus distance after every step (unless the method's ``metrics`` option is off, and left out
of the step time either way), and after training the averaged model's accuracy and each worker's own.
Runs inside the process group ``run_worker`` has initialised; returns the summary on rank 0.
"""

from __future__ import annotations

import copy
import math
import statistics
import time
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from gradzip.gossip.config import build_gossip
from gradzip.registry import make_config
from gradzip.train.data import label_skew_epoch, load_dataset, shard_indices
from gradzip.train.loop import (
    FINAL_LOSS_WINDOW,
    TIMING_WARMUP_STEPS,
    TrainConfig,
    _params_checksum,
    evaluate,
    steps_per_epoch,
    time_to_target,
    total_steps,
)
from gradzip.train.models import build_model


@torch.no_grad()
def averaged_model(model: nn.Module, world: int) -> nn.Module:
    """A copy of ``model`` holding the mean of every worker's parameters (a collective, for metrics)."""
    avg = copy.deepcopy(model)
    for p in avg.parameters():
        total = p.detach().double()
        dist.all_reduce(total)
        p.copy_(total / world)
    return avg


def train_decentralized(cfg: TrainConfig, device: torch.device) -> dict[str, Any] | None:
    rank, world = dist.get_rank(), dist.get_world_size()
    data = load_dataset(cfg.dataset, seed=cfg.seed)
    n_train = len(data.y_train)
    n_steps = total_steps(cfg, n_train, world)
    per_epoch = steps_per_epoch(n_train, world, cfg.batch_size)
    batch = min(cfg.batch_size, n_train // world)

    # Every worker starts from the same model, as D-PSGD assumes; from then on the models differ.
    torch.manual_seed(cfg.seed)
    model = build_model(cfg.model, data.input_shape, data.num_classes).to(device)
    options = make_config(cfg.method, **cfg.options)
    gossip = build_gossip(cfg.method, model, options, timeout=timedelta(seconds=cfg.timeout))
    optimizer = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum)

    bar = None
    if rank == 0 and not cfg.quiet:
        from tqdm import tqdm

        bar = tqdm(total=n_steps, desc=f"{cfg.method} x{world}", unit="step", dynamic_ncols=True)

    losses = torch.zeros(n_steps, dtype=torch.float64)
    times = torch.zeros(n_steps, dtype=torch.float64)
    sent = torch.zeros(n_steps, dtype=torch.float64)
    consensus = torch.full((n_steps,), math.nan, dtype=torch.float64)
    shard = torch.empty(0, dtype=torch.long)
    evals: list[dict[str, float]] = []
    model.train()
    try:
        for step in range(n_steps):
            epoch, i = divmod(step, per_epoch)
            if i == 0:
                shard = (
                    shard_indices(n_train, rank, world, cfg.seed, epoch)
                    if cfg.data_split == "iid"
                    else label_skew_epoch(data.y_train, rank, world, cfg.seed, epoch)
                )
            idx = shard[i * batch : (i + 1) * batch]
            x, y = data.x_train[idx].to(device), data.y_train[idx].to(device)
            sent_before, metrics_before = gossip.stats.bytes_sent, gossip.metrics_s
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            t0 = time.perf_counter()
            optimizer.zero_grad(set_to_none=True)
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            optimizer.step()  # adapt: the local gradient step ...
            gossip.step()  # ... then combine with the neighbours' models
            loss_value = loss.item()
            # The consensus-distance all-reduce is a metric: its time is not the method's.
            times[step] = time.perf_counter() - t0 - (gossip.metrics_s - metrics_before)
            losses[step] = loss_value
            sent[step] = gossip.stats.bytes_sent - sent_before
            if gossip.last_consensus_distance is not None:
                consensus[step] = gossip.last_consensus_distance
            if not math.isfinite(loss_value):
                raise FloatingPointError(f"loss is {loss_value} at step {step}; try a smaller --lr")
            if cfg.eval_every and (step + 1) % cfg.eval_every == 0:
                # The averaged model is what decentralized training delivers; averaging it is a collective.
                acc = evaluate(averaged_model(model, world), data.x_test, data.y_test, device)
                evals.append(
                    {"step": step + 1, "train_time_s": float(times[: step + 1].sum()), "accuracy": acc}
                )
            if bar is not None:
                bar.update(1)
                postfix = {"loss": f"{loss_value:.4f}"}
                if gossip.last_consensus_distance is not None:
                    postfix["consensus"] = f"{gossip.last_consensus_distance:.2e}"
                bar.set_postfix(postfix, refresh=False)
    finally:
        if bar is not None:
            bar.close()

    # Metrics after the timed loop (collectives, never part of the gossip).
    final_consensus = gossip.consensus_distance()
    losses = losses.to(device)
    dist.all_reduce(losses)
    losses = losses.cpu() / world
    totals = torch.tensor(
        [gossip.stats.bytes_sent, gossip.stats.bytes_received, gossip.stats.bytes_uncompressed],
        dtype=torch.float64,
        device=device,
    )
    dist.all_reduce(totals)
    totals = totals.cpu() / (world * n_steps)

    checksum = _params_checksum(model).to(device)
    high, low = checksum.clone(), checksum.clone()
    dist.all_reduce(high, op=dist.ReduceOp.MAX)
    dist.all_reduce(low, op=dist.ReduceOp.MIN)
    params_identical = bool(torch.equal(high, low))
    params_max_abs_diff = 0.0
    if not params_identical:  # the normal case here: the models agree only up to the consensus distance
        vec = torch.cat([p.detach().reshape(-1).double() for p in model.parameters()])
        high, low = vec.clone(), vec
        dist.all_reduce(high, op=dist.ReduceOp.MAX)
        dist.all_reduce(low, op=dist.ReduceOp.MIN)
        params_max_abs_diff = float((high - low).max())

    own = torch.tensor(
        [evaluate(model, data.x_test, data.y_test, device)], dtype=torch.float64, device=device
    )
    gathered = [torch.zeros_like(own) for _ in range(world)]
    dist.all_gather(gathered, own)
    avg = averaged_model(model, world)
    if rank != 0:
        return None
    accuracy = evaluate(avg, data.x_test, data.y_test, device)
    timed = times[TIMING_WARMUP_STEPS:] if n_steps > 2 * TIMING_WARMUP_STEPS else times[n_steps // 2 :]
    bytes_sent, bytes_received, bytes_uncompressed = (float(v) for v in totals)
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
        "topology": gossip.topology.name,
        "spectral_gap": gossip.topology.spectral_gap,
        "final_loss": float(losses[-FINAL_LOSS_WINDOW:].mean()),
        "test_accuracy": accuracy,
        "worker_accuracies": [float(a) for a in gathered],
        "consensus_distance": final_consensus,
        "time_per_step_s": statistics.median(timed.tolist()),
        "total_train_time_s": float(times.sum()),
        "bytes_sent_per_step": bytes_sent,
        "bytes_received_per_step": bytes_received,
        "bytes_uncompressed_per_step": bytes_uncompressed,
        "compression_ratio": bytes_uncompressed / bytes_sent if bytes_sent > 0 else None,
        "params_identical": params_identical,
        "params_max_abs_diff": params_max_abs_diff,
        "accuracy_history": evals,
        **time_to_target(evals, cfg.target_accuracy),
        "history": [
            {
                "step": s,
                "loss": float(losses[s]),
                "time": float(times[s]),
                "bytes_sent": int(sent[s]),
                "consensus_distance": None if math.isnan(consensus[s]) else float(consensus[s]),
            }
            for s in range(n_steps)
        ],
    }
