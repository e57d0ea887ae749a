"""``gradzip train`` with dedicated parameter servers: DoubleSqueeze's ``placement="server"`` and its
asynchronous variant.

The world is ``workers + servers`` processes; the last ``servers`` ranks serve, the others train through the
same loop as every other method (``gradzip.train.loop._train``), with a :class:`PSWorker` in place of DDP. The
training metrics' collectives run on a group of the workers only.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from gradzip.registry import get_spec
from gradzip.train.loop import Exchange, TrainConfig, optimizer_momentum


def server_count(method: str, options: dict[str, Any]) -> int:
    """Dedicated server processes a run of ``method`` needs (0: it trains with collectives only)."""
    if get_spec(method).kind == "server" or options.get("placement") == "server":
        return int(options.get("servers", 1))
    return 0


def _staleness_summary(stats: list[dict[str, Any]]) -> dict[str, Any]:
    if not stats or "staleness" not in stats[0]:
        return {}
    hist = {int(k): int(v) for k, v in stats[0]["staleness"].items()}  # every server sees every push
    pushes = sum(hist.values())
    return {
        "staleness": hist,
        "mean_staleness": sum(k * v for k, v in hist.items()) / max(1, pushes),
        "max_lead": max(int(s["max_lead"]) for s in stats),
        "max_staleness": int(stats[0]["max_staleness"]),
    }


def train_with_servers(cfg: TrainConfig, device: torch.device) -> dict[str, Any] | None:
    """One process of a parameter-server run: serve, or train; rank 0's summary, None elsewhere."""
    from gradzip.comm.paramserver import PSWorker, serve
    from gradzip.train.data import load_dataset, shard_indices
    from gradzip.train.loop import _train
    from gradzip.train.models import build_model

    servers = server_count(cfg.method, cfg.options)
    world = dist.get_world_size()
    workers = world - servers
    if workers < 1:
        raise ValueError(f"{world} processes cannot hold {servers} servers and at least one worker")
    # Every process must take part in creating a group, the servers too.
    group = dist.new_group(list(range(workers)))
    if dist.get_rank() >= workers:
        serve()
        return None
    asynchronous = get_spec(cfg.method).kind == "server"

    def make_exchange(cfg: TrainConfig, model: nn.Module, device: torch.device) -> Exchange:
        options = {k: v for k, v in cfg.options.items() if k not in ("servers", "placement")}
        # Asynchronous: the servers run the optimizer (with the run's lr and momentum) on the authoritative
        # model. With momentum correction the workers accumulate the momentum and the servers apply none.
        momentum = optimizer_momentum(cfg)
        extra: dict[str, Any] = {"lr": cfg.lr, "momentum": momentum} if asynchronous else {}
        ps = PSWorker(model, cfg.method, servers=servers, timeout=cfg.timeout, **extra, **options)
        optimizer = (
            None if asynchronous else torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=momentum)
        )

        def close() -> dict[str, Any]:
            stats = ps.close()
            if not stats:
                return {}
            steps = max(1, ps.step_count)
            return {
                "servers": servers,
                "server_bytes_sent_per_step": sum(s["bytes_sent"] for s in stats) / (len(stats) * steps),
                "server_bytes_received_per_step": sum(s["bytes_received"] for s in stats)
                / (len(stats) * steps),
                "server_stats": stats,
                **_staleness_summary(stats),
            }

        return Exchange(model, ps.stats, optimizer, ps.step, group, close)

    return _train(cfg, device, None, load_dataset, shard_indices, build_model, make_exchange, group)
