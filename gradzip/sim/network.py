"""What a collective costs on a link: the alpha-beta model of the algorithms gloo and NCCL actually run.

A cluster is ``workers`` processes, one per host link (the emulated cluster's shape; a multi-GPU host's NVLink
is not modelled), each link full-duplex at ``bandwidth`` with a one-way ``latency``. A message of ``b`` bytes
costs ``alpha + b / beta`` where ``alpha`` is the per-message latency (wire delay plus the library's per-message
software cost) and ``beta`` the payload rate (the link rate less framing: TCP/IP/Ethernet headers put
``WIRE_OVERHEAD`` times the payload on the wire for bulk transfers, see :mod:`gradzip.bench.wire`).

* all-reduce (ring: reduce-scatter then all-gather of ``n`` chunks): ``2(n-1)`` steps of ``B/n`` bytes.
* all-gather (ring): ``n-1`` steps of the ``b``-byte payload of one worker, so its cost grows with ``n``.
* all-to-all: ``n-1`` messages of ``B/n`` (every peer at once; the link is the bound).
* server: ``n`` workers push ``b`` to one server link and pull ``b`` back: the server's link carries ``n·b``
  each way, split over ``servers`` links when the tensors are split over that many servers.
* gossip: ``b`` bytes to each of ``d`` neighbours and ``b`` back from each, both directions at once.

Each kind moves bytes at ``beta`` times its ``Link`` efficiency (1 by default: what the algorithm allows, as
NCCL comes close to). gloo falls short of that on some kinds: on the emulated cluster its all-gather and its
point-to-point exchange are markedly slower than its ring all-reduce (D-PSGD on wide_mlp, 4 workers at
1 Gbit/s, waits 2.5 s per step for 151 MB sent, as if the two directions of a pair took turns).
``gradzip.sim.calibrate`` measures each kind on a cluster, and the validation uses those efficiencies.
"""

from __future__ import annotations

from dataclasses import dataclass

from gradzip.bench.wire import MSS, SEGMENT_HEADERS, SEGMENTS_PER_ACK
from gradzip.comm.collectives import ring_all_gather_bytes, ring_all_reduce_bytes

__all__ = [
    "Link", "all_gather", "all_reduce", "all_to_all", "gossip", "ring_all_gather_bytes",
    "ring_all_reduce_bytes", "server_round",
]  # fmt: skip

# Bulk bytes on an Ethernet wire per payload byte: headers per MSS-sized segment, and the acknowledgements'
# segments (one per SEGMENTS_PER_ACK data segments): the model of gradzip.bench.wire, checked against link
# counters within 1% (1.046).
WIRE_OVERHEAD = 1 + SEGMENT_HEADERS / MSS * (1 + 1 / SEGMENTS_PER_ACK)

# Per-message software cost of gloo over TCP on a CPU (framing, a syscall pair, a wakeup): fitted on the
# emulated cluster by `gradzip profile --network`; this default is what that fit gave on this project's
# 2-core machine, used when no fit is at hand.
DEFAULT_MESSAGE_S = 60e-6


@dataclass(frozen=True)
class Link:
    """One worker's link: ``bandwidth`` bits per second (None: not the bound, e.g. loopback, where
    ``unbounded_bytes_per_s`` applies), one-way ``latency`` seconds, and the per-message ``message_s`` cost."""

    bandwidth: float | None
    """Bits per second of the link; None for an unlimited link (then ``unbounded_bytes_per_s`` is the rate)."""
    latency: float = 0.0
    """One-way delay in seconds."""
    message_s: float = DEFAULT_MESSAGE_S
    """Software cost of one message, seconds (fitted per cluster by ``gradzip profile --network``)."""
    unbounded_bytes_per_s: float = 2e9
    """Payload rate when ``bandwidth`` is None: what copying through the kernel's loopback reaches."""
    overhead: float = WIRE_OVERHEAD
    """Wire bytes per payload byte (framing)."""
    gather: float = 1.0
    """All-gather's payload rate as a fraction of ``beta`` (all-reduce's)."""
    alltoall: float = 1.0
    """All-to-all's payload rate as a fraction of ``beta``."""
    exchange: float = 1.0
    """The point-to-point neighbour exchange's payload rate (each direction) as a fraction of ``beta``."""
    uses_cpu: bool = False
    """Moving bytes takes the workers' own cores (the emulated cluster's ``unlimited`` loopback, where every
    worker shares the machine's cores): transfers cannot overlap compute."""

    def __post_init__(self) -> None:
        if self.bandwidth is not None and not self.bandwidth > 0:
            raise ValueError(f"bandwidth={self.bandwidth!r} is invalid: bits per second > 0, or None")
        for name in ("latency", "message_s"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}={getattr(self, name)!r} is invalid: seconds >= 0")
        if not self.unbounded_bytes_per_s > 0 or not self.overhead >= 1.0:
            raise ValueError("unbounded_bytes_per_s must be > 0 and overhead >= 1")
        for name in ("gather", "alltoall", "exchange"):
            if not 0 < getattr(self, name) <= 10:
                raise ValueError(f"{name}={getattr(self, name)!r} is invalid: an efficiency in (0, 10]")

    @property
    def alpha(self) -> float:
        """Seconds per message."""
        return self.latency + self.message_s

    @property
    def beta(self) -> float:
        """Payload bytes per second."""
        if self.bandwidth is None:
            return self.unbounded_bytes_per_s
        return self.bandwidth / 8 / self.overhead

    def send(self, nbytes: float, messages: int = 1, efficiency: float = 1.0) -> float:
        """Seconds for ``messages`` messages carrying ``nbytes`` in all over this link, one after another, at
        ``efficiency`` times ``beta``."""
        return messages * self.alpha + nbytes / (self.beta * efficiency)


def all_reduce(link: Link, nbytes: float, n: int) -> float:
    """Ring all-reduce of an ``nbytes`` tensor over ``n`` workers."""
    if n <= 1:
        return 0.0
    return link.send(ring_all_reduce_bytes(nbytes, n), 2 * (n - 1))


def all_gather(link: Link, nbytes: float, n: int) -> float:
    """Ring all-gather of an ``nbytes`` payload from each of ``n`` workers."""
    if n <= 1:
        return 0.0
    return link.send(ring_all_gather_bytes(nbytes, n), n - 1, link.gather)


def all_to_all(link: Link, nbytes: float, n: int) -> float:
    """All-to-all of an ``nbytes`` message per worker, cut in ``n`` rows (``n-1`` go out)."""
    if n <= 1:
        return 0.0
    return link.send((n - 1) / n * nbytes, n - 1, link.alltoall)


def server_round(link: Link, nbytes: float, n: int, servers: int = 1) -> float:
    """``n`` workers push an ``nbytes`` payload (split over ``servers``) and pull one back: each server link
    carries ``n·nbytes/servers`` in, then as much out; a worker's link carries ``nbytes`` each way."""
    per_server = n * nbytes / servers
    # Each worker sends one message to each server and gets one back; the servers' links are the bound.
    return 2 * servers * link.alpha + 2 * max(per_server, nbytes) / link.beta


def gossip(link: Link, nbytes: float, degree: int, rounds: int = 1) -> float:
    """``rounds`` exchanges of ``nbytes`` with each of ``degree`` neighbours."""
    return rounds * link.send(degree * nbytes, degree, link.exchange)
