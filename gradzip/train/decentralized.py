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
import time
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from gradzip.gossip.config import build_gossip
from gradzip.registry import make_config
from gradzip.train.data import load_dataset, shard_indices
from gradzip.train.loop import (
    TrainConfig,
    evaluate,
    params_agreement,
    reduce_metrics,
    setup_run,
    step_bar,
    step_batches,
    summary,
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
    # Every worker starts from the same model, as D-PSGD assumes; from then on the models differ.
    data, n_steps, per_epoch, batch, model = setup_run(cfg, device, world, load_dataset, build_model)
    options = make_config(cfg.method, **cfg.options)
    gossip = build_gossip(cfg.method, model, options, timeout=timedelta(seconds=cfg.timeout))
    optimizer = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum)

    bar = step_bar(cfg, rank, world, n_steps)
    losses = torch.zeros(n_steps, dtype=torch.float64)
    times = torch.zeros(n_steps, dtype=torch.float64)
    sent = torch.zeros(n_steps, dtype=torch.float64)
    consensus = torch.full((n_steps,), math.nan, dtype=torch.float64)
    evals: list[dict[str, float]] = []
    model.train()
    try:
        for step, x, y in step_batches(
            cfg, data, shard_indices, rank, world, n_steps, per_epoch, batch, device
        ):
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
    losses, totals, worker_train_time_s = reduce_metrics(losses, times, gossip.stats, device)
    # Not identical is the normal case here: the models agree only up to the consensus distance.
    params_identical, params_max_abs_diff = params_agreement(model, device)
    own = torch.tensor(
        [evaluate(model, data.x_test, data.y_test, device)], dtype=torch.float64, device=device
    )
    gathered = [torch.zeros_like(own) for _ in range(world)]
    dist.all_gather(gathered, own)
    avg = averaged_model(model, world)
    if rank != 0:
        return None
    accuracy = evaluate(avg, data.x_test, data.y_test, device)
    return {
        **summary(cfg, data, world, batch, per_epoch, losses, times, totals, accuracy, evals),
        "topology": gossip.topology.name,
        "spectral_gap": gossip.topology.spectral_gap,
        "worker_accuracies": [float(a) for a in gathered],
        "consensus_distance": final_consensus,
        "params_identical": params_identical,
        "params_max_abs_diff": params_max_abs_diff,
        "worker_train_time_s": worker_train_time_s,
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
