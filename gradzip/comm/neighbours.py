"""Neighbour exchange: the communication of decentralized training (besides the NaN check's tiny all-reduce).

Each worker sends a list of tensors to each of its neighbours and receives the same-shaped list from each,
with point-to-point messages (``batch_isend_irecv``): no all-reduce, no all-gather. A list travels fused into
one uint8 message per neighbour (one send and one receive per edge and exchange), so messages cannot be
matched out of order. Knows nothing about what the payload means.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from datetime import timedelta

import torch
import torch.distributed as dist

from gradzip.comm.collectives import CommStats
from gradzip.compress.fusion import ByteLayout


class NeighbourExchange:
    """Symmetric exchanges with neighbours on ``group`` (group ranks), counted in ``stats``.

    ``timeout`` bounds every wait: a dead or stuck neighbour raises instead of hanging. ``None`` waits as
    long as the process group's own timeout (the one given to ``init_process_group``), which gloo applies to
    point-to-point messages too.
    """

    def __init__(
        self,
        group: dist.ProcessGroup | None = None,
        stats: CommStats | None = None,
        timeout: timedelta | None = None,
    ) -> None:
        self.group = group
        self.stats = stats if stats is not None else CommStats()
        self.timeout = timeout
        self.rank = dist.get_rank(group)
        self.world = dist.get_world_size(group)
        self.wait_s = 0.0  # seconds blocked on neighbours' messages (the benchmark's communication wait)

    def _global(self, peer: int) -> int:
        # P2POp takes global ranks; topology nodes are ranks within the group.
        return peer if self.group is None else dist.get_global_rank(self.group, peer)

    def exchange(self, outgoing: Mapping[int, Sequence[torch.Tensor]]) -> dict[int, list[torch.Tensor]]:
        """Send ``outgoing[j]`` to every neighbour ``j`` and return what ``j`` sent here.

        The exchange is symmetric: ``j`` sends tensors of the same shapes and dtypes as the ones sent to it
        (every gossip method's messages are), so the receive buffers are laid out like the sent ones."""
        peers = sorted(outgoing)
        if not peers:
            return {}
        layouts, sends, recvs = {}, {}, {}
        ops = []
        for peer in peers:
            if not 0 <= peer < self.world or peer == self.rank:
                raise ValueError(
                    f"peer {peer} is invalid: a neighbour is another rank in 0..{self.world - 1}"
                )
            tensors = list(outgoing[peer])
            device = tensors[0].device if tensors else None
            layouts[peer] = ByteLayout([(t.dtype, t.numel()) for t in tensors])
            sends[peer] = layouts[peer].pack(tensors, device)
            recvs[peer] = torch.empty_like(sends[peer])
            ops.append(dist.P2POp(dist.isend, sends[peer], self._global(peer), self.group))
            ops.append(dist.P2POp(dist.irecv, recvs[peer], self._global(peer), self.group))
        works = dist.batch_isend_irecv(ops)
        start = time.perf_counter()
        for work in works:
            if self.timeout is None:
                work.wait()
            else:
                work.wait(self.timeout)
        self.wait_s += time.perf_counter() - start
        received = {}
        for peer in peers:
            self.stats.collectives += 1
            self.stats.bytes_sent += sends[peer].nbytes
            self.stats.bytes_received += recvs[peer].nbytes
            self.stats.p2p_bytes_sent += sends[peer].nbytes
            self.stats.p2p_bytes_received += recvs[peer].nbytes
            self.stats.p2p_sends += 1
            self.stats.p2p_recvs += 1
            views = layouts[peer].views(recvs[peer])
            received[peer] = [v.view(t.shape) for v, t in zip(views, outgoing[peer], strict=True)]
        return received
