"""Point-to-point messages of the parameter-server placements: a fixed header, then the payload bytes.

Every message is ``HEADER_BYTES`` of header (four int64: the sender's step, flags, and two more that a
``NONFINITE`` reply fills in) followed by the payload row, so a receiver can post a receive of the right size
before it knows what arrives. A wait that fails or times out is raised as an error that names the peer: a
dead server or worker is never a hang.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import torch

from gradzip.util import first_line

HEADER_BYTES = 32
STOP = 1
"""Flag of a worker's last message: it is done, and the server may stop once every worker said so."""
CHECKPOINT = 2
"""Flag of a step's pushes after which every server hands its state to worker 0 (for a checkpoint)."""
NONFINITE = 4
"""On a push: the worker's gradient held a NaN or an Inf, and the payload is zeros. On a reply: some worker's
did, so the step is skipped (synchronous), or this worker's push was dropped (asynchronous); the header's
third and fourth fields then say which worker (the first one) and how many."""


class ServerError(RuntimeError):
    """A parameter server died or did not answer in time; ``rank`` is its global rank."""

    def __init__(self, message: str, rank: int) -> None:
        super().__init__(message)
        self.rank = rank


class WorkerLost(RuntimeError):
    """A server lost a worker (it died, or sent nothing within the timeout)."""


def message(width: int, step: int = 0, flags: int = 0, poisoned: tuple[int, int] = (0, 0)) -> torch.Tensor:
    """A zeroed message with its header written and ``width`` payload bytes after it (the padding travels
    too, and must not carry stale memory). ``poisoned``: a ``NONFINITE`` reply's first worker and count."""
    msg = torch.zeros(HEADER_BYTES + width, dtype=torch.uint8)
    msg[:HEADER_BYTES].view(torch.int64)[:] = torch.tensor([step, flags, *poisoned])
    return msg


def payload(msg: torch.Tensor) -> torch.Tensor:
    """The payload bytes of a message (a view)."""
    return msg[HEADER_BYTES:]


def header(msg: torch.Tensor) -> tuple[int, int]:
    """``(step, flags)`` of a message."""
    step, flags = msg[:HEADER_BYTES].view(torch.int64)[:2].tolist()
    return int(step), int(flags)


def poisoned(msg: torch.Tensor) -> tuple[int, int]:
    """A ``NONFINITE`` reply's first poisoned worker and how many there were."""
    first, count = msg[:HEADER_BYTES].view(torch.int64)[2:].tolist()
    return int(first), int(count)


def wait_for_server(work: Any, server: int, rank: int, timeout: float) -> None:
    """Wait for a message to or from parameter server ``server`` (global ``rank``); ServerError naming it."""
    try:
        work.wait(timedelta(seconds=timeout))
    except RuntimeError as err:
        raise ServerError(
            f"parameter server {server} (rank {rank}) died or did not answer within {timeout:g}s: "
            f"{first_line(err)}",
            rank,
        ) from None
