"""The rendezvous of a local run (``gradzip train --workers N``), on loopback only.

torch's c10d rendezvous binds its stores to every interface of the machine, so a local run would listen on
the network for as long as it trains. This backend is the c10d one with both of its stores (the
rendezvous's own, and the one it shares with the workers) listening on 127.0.0.1: a socket is bound there
and handed to the store, which then accepts only local connections.
"""

from __future__ import annotations

import socket
from datetime import timedelta
from typing import Any

import torch.distributed as dist
from torch.distributed.elastic.rendezvous import RendezvousHandler, RendezvousParameters
from torch.distributed.elastic.rendezvous import registry as rdzv_registry
from torch.distributed.elastic.rendezvous.c10d_rendezvous_backend import C10dRendezvousBackend
from torch.distributed.elastic.rendezvous.dynamic_rendezvous import create_handler

BACKEND = "gradzip-local"


def loopback_store(port: int = 0, timeout: timedelta = timedelta(seconds=60)) -> dist.TCPStore:
    """A TCPStore server listening on 127.0.0.1 only (``port`` 0: a free one)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", port))
    sock.listen(128)
    bound = sock.getsockname()[1]
    # detach(): the store owns the socket from now on (a collected socket object would close it).
    return dist.TCPStore(
        "127.0.0.1", bound, None, True, timeout, wait_for_workers=False, multi_tenant=True,
        master_listen_fd=sock.detach(),
    )  # fmt: skip


class _Backend(C10dRendezvousBackend):
    """c10d's rendezvous state, under this backend's name (the launcher checks that the two agree)."""

    @property
    def name(self) -> str:
        return BACKEND


def _create_handler(params: RendezvousParameters) -> RendezvousHandler:
    _, _, port = params.endpoint.rpartition(":")
    timeout = timedelta(seconds=int(params.get_as_int("read_timeout", 60) or 60))
    store = loopback_store(int(port), timeout)
    handler = create_handler(store, _Backend(store, params.run_id), params)
    shared: list[Any] = []

    def shared_store(master_addr: str, master_port: int) -> dist.TCPStore:
        shared.append(loopback_store(master_port, timeout))
        return shared[-1]

    # The store the workers share is made by this method of torch's handler (torch >= 2.4).
    handler._create_tcp_store_server = shared_store  # type: ignore[method-assign]
    return handler


def register() -> str:
    """Make the backend known to torch's launcher (idempotent); returns its name."""
    if BACKEND not in rdzv_registry.handler_registry._registry:
        rdzv_registry.handler_registry.register(BACKEND, _create_handler)
    return BACKEND
