"""Bytes on the wire: what a worker's link carried over the measured iterations, and a model of it.

**Measured.** On the emulated cluster each worker is alone in its network namespace, whose only link besides
``lo`` is the veth pair to the switch, so the link's counters are the worker's traffic. The benchmark tells
the worker its link's name (``GRADZIP_BENCH_LINK``, set by the runner for namespaced hosts only), and the
worker snapshots the counters right before its first measured iteration and right after its last one
(:func:`read_link`): warm-up, start-up, rendezvous and the results' exchange are outside the window.

* The interface counters come from ``/proc/net/dev``, which is per network namespace (``/proc/net`` is the
  reading process's own; sysfs would show the namespace of whoever mounted it).
* The veth links carry TCP's segmentation-offload packets whole: one packet of up to 64 KB counted with one
  set of headers, where an Ethernet wire carries MSS-sized frames, each with its own. (The ``tbf`` shaper
  charges every segment's headers all the same, so the emulated link's timing already includes them.) The
  headers of the segments so merged are added back: TCP's own segment counts (``TCP_INFO`` of this process's
  connections over the link, ``segs_out`` and ``segs_in``) less the interface's packet counts, times the
  headers of one segment (the path MTU less TCP's MSS, plus the 14-byte Ethernet header: 66 bytes).

Under torchrun, or on ``unlimited`` (every worker on this machine's loopback, whose counters add up every
process on it), there is no link of the worker's own: wire bytes are None, shown as "-".

**Model.** :func:`model` states per worker per step what gloo's algorithms put on the wire for the
collectives a method made, from their byte counts by kind (``CommStats``): checked against the counters on
this machine (1 Gbit/s emulated links; 2, 4 and 8 workers; one call of 16 B to 4 MB per collective).

* Payload: gloo's all-reduce is a ring (a reduce-scatter, then an all-gather, of ``n`` chunks): it sends
  and receives ``2(n-1)/n·B`` for a B-byte tensor. Its all-gather is a ring too: ``(n-1)·B`` for a B-byte
  payload per worker. All-to-all sends the ``n-1`` other rows directly, point-to-point a message as is.
* Framing: each gloo message carries a 144-byte header. An all-reduce is ``4(n-1)`` messages per worker
  (gloo cuts the tensor into ``2n`` segments, and each phase sends all but the worker's own two), an
  all-gather ``2(n-1)``, an all-to-all ``n-1``, a point-to-point send one. (A tensor over ``2n`` MB is cut
  into 1 MB segments instead: a few hundred bytes more per MB, left out.)
* TCP/IP/Ethernet: each message is cut into segments of at most ``MSS`` = 1448 bytes (1500-byte MTU, IPv4,
  TCP with timestamps), each with 66 bytes of headers. In the other direction the receiver sends segments
  without payload: measured, about 3 per message (acknowledgements and window updates; the receiver
  probably reads a message's header and body separately) plus one per 64 data segments of bulk data (the
  links carry 64 KB packets whole; a link at 100 Mbit/s, whose ``tbf`` splits them, acknowledges about
  every third segment, 1.5% more).
* The step's vote on non-finite gradients (an all-reduce of ``n`` floats, ``CommStats.votes``) is on the
  wire too: as a ring of ``2n`` one-float segments of which ``n`` hold data, ``2(n-1)`` messages of 4 bytes
  per worker on average.

For bulk transfers the model comes to ``1.046`` times the payload (headers 66/1448, acknowledgements
66/(64·1448)). Not modelled: a DDP model's buffer broadcasts (BatchNorm statistics, at every forward) and
collectives outside ``CommStats`` (the floor and torch's PowerSGD hook have no model).
"""

from __future__ import annotations

import os
import socket
import struct
from dataclasses import dataclass, field
from math import ceil
from typing import Any

from gradzip.comm.collectives import CommStats, ring_all_gather_bytes, ring_all_reduce_bytes

LINK_ENV = "GRADZIP_BENCH_LINK"
"""Set by the runner, for a worker inside an emulated host's namespace, to the name of its link."""

ETHERNET_HEADER = 14
SEGMENT_HEADERS = 66
"""Bytes of headers per TCP segment on Ethernet: 14 Ethernet, 20 IPv4, 20 TCP, 12 of the timestamp option."""
MSS = 1448
"""Payload bytes per TCP segment: a 1500-byte MTU less IPv4, TCP and timestamps."""
GLOO_HEADER = 144
"""Bytes gloo's TCP transport adds to every message (measured: 144 per message for every collective)."""
ACKS_PER_MESSAGE = 3
"""Segments without payload that the receiver of a gloo message sends back (measured: 2 to 3.3)."""
SEGMENTS_PER_ACK = 64
"""Data segments of bulk data per further acknowledgement (measured: 1 per 55 to 70 at 1 Gbit/s)."""

# struct tcp_info (linux/tcp.h): the fields read here, at their offsets since Linux 4.2 (segs_out/segs_in)
# and 2.6 (the rest); the kernel copies min(len asked, its struct's) bytes.
_TCPI_SND_MSS = 16  # u32 tcpi_snd_mss
_TCPI_PMTU = 60  # u32 tcpi_pmtu
_TCPI_SEGS = 136  # u32 tcpi_segs_out, u32 tcpi_segs_in
_TCPI_LEN = 144


# ------------------------------------------------------------------------------------------------ measured


@dataclass(frozen=True)
class LinkCounters:
    """One reading of a link's counters and of this process's TCP connections over it."""

    tx_bytes: int
    tx_packets: int
    rx_bytes: int
    rx_packets: int
    segments: dict[int, tuple[int, int]] = field(default_factory=dict)
    """Per connection (its socket's inode): TCP segments sent and received so far."""
    headers: int = SEGMENT_HEADERS
    """Bytes of headers per segment on this link (path MTU less MSS, plus Ethernet's)."""


def link_from_env() -> str | None:
    """The link whose counters are this worker's alone, or None where there is none (torchrun, loopback)."""
    return os.environ.get(LINK_ENV) or None


def read_link(dev: str) -> LinkCounters:
    """The counters of interface ``dev`` in this process's network namespace, and the segment counts of this
    process's TCP connections that leave through a network (not to this host itself). Cheap (well under a
    millisecond): no process is started, so reading it does not delay the iterations around it."""
    tx_bytes = tx_packets = rx_bytes = rx_packets = -1
    with open("/proc/net/dev") as f:
        for line in f:
            name, sep, rest = line.partition(":")
            if sep and name.strip() == dev:
                fields = [int(v) for v in rest.split()]
                rx_bytes, rx_packets, tx_bytes, tx_packets = fields[0], fields[1], fields[8], fields[9]
    if tx_bytes < 0:
        raise ValueError(f"no interface {dev!r} in this network namespace (/proc/net/dev)")
    segments: dict[int, tuple[int, int]] = {}
    headers = SEGMENT_HEADERS
    for inode, info in _tcp_infos():
        snd_mss, pmtu = (
            struct.unpack_from("I", info, _TCPI_SND_MSS)[0],
            struct.unpack_from("I", info, _TCPI_PMTU)[0],
        )
        segments[inode] = struct.unpack_from("II", info, _TCPI_SEGS)
        if 0 < snd_mss < pmtu:
            headers = pmtu - snd_mss + ETHERNET_HEADER
    return LinkCounters(tx_bytes, tx_packets, rx_bytes, rx_packets, segments, headers)


def _tcp_infos() -> list[tuple[int, bytes]]:
    """TCP_INFO of every connected TCP socket this process holds whose peer is another host."""
    out = []
    fd_dir = "/proc/self/fd"
    for name in os.listdir(fd_dir):
        try:
            target = os.readlink(f"{fd_dir}/{name}")
            if not target.startswith("socket:["):
                continue
            inode = int(target[8:-1])
            # A duplicate of the descriptor: closing the Python object closes the duplicate only.
            sock = socket.socket(fileno=os.dup(int(name)))
        except (OSError, ValueError):  # closed meanwhile, or not a socket Python can wrap
            continue
        try:
            if sock.type != socket.SOCK_STREAM or sock.family not in (socket.AF_INET, socket.AF_INET6):
                continue
            peer, local = sock.getpeername()[0], sock.getsockname()[0]
            # A connection to this host's own address runs over lo, not the link (rank 0's store client).
            if peer == local or peer.startswith("127.") or peer == "::1":
                continue
            out.append((inode, sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, _TCPI_LEN)))
        except OSError:  # a listening or unconnected socket has no peer
            continue
        finally:
            sock.close()
    return out


def wire_bytes(before: LinkCounters, after: LinkCounters) -> tuple[int, int]:
    """Bytes sent and received over the link between two readings, as an Ethernet wire carries them: the
    interface's bytes, plus the headers of the segments that offloading kept merged into larger packets."""
    segs_out = segs_in = 0
    for inode, (out_now, in_now) in after.segments.items():
        out_then, in_then = before.segments.get(inode, (0, 0))  # a connection opened meanwhile: all of it
        segs_out += out_now - out_then
        segs_in += in_now - in_then
    tx_packets, rx_packets = after.tx_packets - before.tx_packets, after.rx_packets - before.rx_packets
    sent = after.tx_bytes - before.tx_bytes + max(0, segs_out - tx_packets) * after.headers
    received = after.rx_bytes - before.rx_bytes + max(0, segs_in - rx_packets) * after.headers
    return sent, received


# --------------------------------------------------------------------------------------------------- model


@dataclass(frozen=True)
class Flow:
    """Traffic of one kind of collective through one worker in one direction: payload and gloo messages."""

    payload: float
    messages: float


def flows(stats: CommStats, world: int) -> list[tuple[Flow, Flow]]:
    """(out of, into) this worker, per kind of collective counted in ``stats`` (see the module's docstring)."""
    if world < 1:
        raise ValueError(f"world={world} is invalid: at least 1 worker")
    n = world  # a world of one: its collectives move nothing (the point-to-point messages still go)
    ring = [
        Flow(ring_all_reduce_bytes(stats.all_reduce_bytes, n), 4 * (n - 1) * stats.all_reduce_calls),
        Flow(ring_all_gather_bytes(stats.all_gather_bytes, n), 2 * (n - 1) * stats.all_gather_calls),
        Flow(stats.all_to_all_bytes, (n - 1) * stats.all_to_all_calls),
        Flow(4 * 2 * (n - 1) * stats.votes, 2 * (n - 1) * stats.votes),
    ]
    p2p = (Flow(stats.p2p_bytes_sent, stats.p2p_sends), Flow(stats.p2p_bytes_received, stats.p2p_recvs))
    return [(f, f) for f in ring] + [p2p]


def _data_segments(flow: Flow) -> float:
    if flow.messages <= 0:
        return 0.0
    per_message = flow.payload / flow.messages + GLOO_HEADER
    return flow.messages * ceil(per_message / MSS)


def _acks(flow: Flow) -> float:
    """Segments without payload sent back for ``flow``'s messages."""
    return ACKS_PER_MESSAGE * flow.messages + _data_segments(flow) / SEGMENTS_PER_ACK


def _frames(out: Flow, back: Flow) -> float:
    """Bytes on the wire one way: ``out``'s messages, and the acknowledgements of the messages ``back``."""
    data = out.payload + GLOO_HEADER * out.messages + SEGMENT_HEADERS * _data_segments(out)
    return data + SEGMENT_HEADERS * _acks(back)


def model(stats: CommStats, world: int, steps: int) -> dict[str, float]:
    """The modelled wire bytes per step of one worker whose collectives over ``steps`` steps are ``stats``:
    ``{"sent": ..., "received": ..., "payload": ...}``, ``payload`` being the ring payload alone
    (:meth:`CommStats.ring_bytes`, what ``compression_ratio`` compares)."""
    if steps < 1:
        raise ValueError(f"steps={steps} is invalid: the traffic of at least 1 step")
    sent = received = 0.0
    for out, into in flows(stats, world):
        sent += _frames(out, into)
        received += _frames(into, out)
    return {"sent": sent / steps, "received": received / steps, "payload": stats.ring_bytes(world) / steps}


def stats_between(before: dict[str, int], after: CommStats) -> CommStats:
    """The traffic counted between a ``to_dict()`` snapshot and now."""
    now = after.to_dict()
    return CommStats(**{k: now[k] - before.get(k, 0) for k in now})


def summary(per_worker: list[dict[str, Any]]) -> dict[str, float | None]:
    """The result's wire fields from each worker's measured and modelled bytes per step (means over workers;
    None where any worker has none)."""

    def mean(key: str) -> float | None:
        values = [w.get(key) for w in per_worker]
        if not values or any(v is None for v in values):
            return None
        return sum(float(v) for v in values if v is not None) / len(values)

    return {
        "wire_bytes_sent_per_step": mean("sent"),
        "wire_bytes_received_per_step": mean("received"),
        "model_wire_bytes_sent_per_step": mean("model_sent"),
        "model_wire_bytes_received_per_step": mean("model_received"),
        "ring_bytes_per_step": mean("payload"),
    }
