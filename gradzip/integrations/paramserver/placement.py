"""Who serves: the last ``servers`` ranks of the world, and what worker 0 tells them at the start."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

SYNC, ASYNC = "doublesqueeze", "doublesqueeze-async"


def server_ranks(world: int, servers: int) -> list[int]:
    """The global ranks of the servers: the last ``servers`` of the world."""
    if not 1 <= servers < world:
        raise ValueError(f"servers={servers} is invalid with {world} processes: it must be in 1..{world - 1}")
    return list(range(world - servers, world))


def is_server(servers: int) -> bool:
    """True on the processes that must call :func:`~gradzip.integrations.paramserver.serve` (the world's last
    ``servers`` ranks)."""
    return dist.get_rank() in server_ranks(dist.get_world_size(), servers)


@dataclass
class Setup:
    """What worker 0 tells every server at the start, so a server needs no model and no options of its own."""

    method: str
    options: dict[str, Any]
    names: list[str]
    numels: list[int]
    workers: int
    timeout: float
    lr: float = 0.0
    momentum: float = 0.0
    initial: list[torch.Tensor] = field(default_factory=list)  # async: the server's part of the model
    nan_policy: str = "skip"
    """The workers' ``nan_policy``: under ``raise`` a server stops too once it has told every worker."""
    state: dict[str, Any] | None = None
    """The server's state to continue from (a resumed run), as its ``state_dict()`` gave it."""
