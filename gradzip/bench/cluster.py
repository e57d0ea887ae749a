"""An emulated cluster on one machine: each worker runs in its own network namespace, and every namespace
reaches the others only through a rate-limited link, so torch.distributed (gloo over TCP) between workers
crosses a network of the chosen bandwidth.

Topology of one cluster named ``N`` with hosts ``0..n-1``::

    N-h0 [lo, eth0 10.77.0.1/24] ==veth== [h0] \\
    N-h1 [lo, eth0 10.77.0.2/24] ==veth== [h1] -- br0   (all inside the "switch" namespace N-sw)
    ...                                        /

Everything lives in namespaces this module creates: the veth pairs are created directly inside the switch
namespace with their peer placed in the host namespace, so the root namespace never sees an interface, an
address, a bridge or a route, and the private addresses can repeat across concurrent clusters.

Shaping: each veth end's egress has a token bucket (``tc tbf``), the host end for the uplink and the switch
end for the downlink, like a switch port at the link speed in both directions. ``latency`` is the one-way
delay between two hosts: half of it is added (``netem``) on each of the two links a packet crosses, so the
round trip between two hosts is ``2 * latency``. Cleanup is guaranteed on every exit Python sees
(:mod:`gradzip.bench.guard`); only SIGKILL leaves namespaces, which :func:`~gradzip.bench.netns.remove_leftovers`
(``gradzip bench --cleanup``) deletes.

Only the standard library is imported here (and by the modules it uses), so a child process that only needs a
cluster starts without torch.
"""

from __future__ import annotations

import itertools
import math
import os
import re
import time
import warnings
from dataclasses import dataclass
from types import TracebackType

from gradzip.bench.guard import GUARD
from gradzip.bench.iproute import ClusterError, run, run_all, tool
from gradzip.bench.netns import NETNS_DIR, PREFIX, delete_namespaces, existing_namespaces
from gradzip.bench.network import check_can_emulate, parse_bandwidth, parse_latency

# Addresses are private to each cluster's namespaces, so every cluster can use the same subnet.
SUBNET = "10.77.0"
HOST_IF = "eth0"  # inside a host namespace: its only link besides lo (the bench worker relies on that)
BRIDGE = "br0"

# tbf refills tokens when its timer fires; classically that is once per kernel tick, so a bucket smaller than
# one tick's worth of bytes caps the rate below the configured one. 250 Hz is the most common HZ (Debian,
# Ubuntu and this machine's kernel); hrtimer-based kernels do fine with it at 100 or 1000 Hz too. The bucket
# is what may pass at line rate after an idle period: one tick, 50 KB at 100 Mbit/s, keeps that small.
_TICKS_PER_S = 250
# Floor of the bucket: about ten full Ethernet frames, so a few frames may leave back to back even at very
# low rates (tbf drops any packet larger than its bucket outright).
_MIN_BURST_BYTES = 16 * 1024
# How long a packet may wait in tbf's queue before it is dropped (sets the queue length from the rate):
# deep enough that TCP is not starved by drops, bounded so the queueing delay stays small.
_TBF_QUEUE = "50ms"

_MAX_HOSTS = 253  # 10.77.0.1 .. 10.77.0.253 on a /24
_NAME_RE = re.compile(r"^[A-Za-z0-9_.-]{1,48}$")


@dataclass
class Host:
    index: int
    address: str  # the IP other hosts reach it at ("127.0.0.1" when unlimited)
    netns: str | None  # namespace name, None when unlimited


_counter = itertools.count()


class EmulatedCluster:
    """``hosts`` network namespaces joined by links of ``bandwidth`` (and one-way ``latency``).

    ``with EmulatedCluster(4, "1gbit") as c:`` then start host ``i``'s process with ``c.command(i, argv)``
    and reach it at ``c.hosts[i].address``. ``"unlimited"`` creates nothing: every host is this machine's
    loopback. ``name`` fixes the namespaces' base name (default ``<prefix><pid>x<n>``, unique per cluster);
    ``prefix`` is what :func:`leftover_namespaces` looks for.
    """

    def __init__(
        self,
        hosts: int,
        bandwidth: str = "1gbit",
        latency: str = "0ms",
        name: str | None = None,
        *,
        prefix: str = PREFIX,
    ) -> None:
        if not 1 <= hosts <= _MAX_HOSTS:
            raise ValueError(f"invalid number of hosts {hosts}: use 1 to {_MAX_HOSTS}")
        self.bandwidth = bandwidth
        self.rate = parse_bandwidth(bandwidth)
        self.delay = parse_latency(latency)
        if self.rate is None and self.delay > 0:
            raise ClusterError(
                f"--latency {latency} needs an emulated link, and --bandwidth unlimited is plain loopback; "
                "pick a bandwidth such as 10gbit"
            )
        if not _NAME_RE.match(prefix) or (name is not None and not _NAME_RE.match(name)):
            raise ValueError(
                f"invalid cluster name {name or prefix!r}: use up to 48 letters, digits, '_', '.' or '-'"
            )
        self.owner = os.getpid()
        self._created: list[str] = []  # namespaces made and not yet removed, switch first
        self._closed = False
        self.setup_s = 0.0  # wall time of the last open() / close(), for the benchmark's log
        self.teardown_s = 0.0
        if self.rate is None:
            self.name = name or "loopback"
            self.hosts = [Host(i, "127.0.0.1", None) for i in range(hosts)]
            self._switch: str | None = None
            return
        if name is None:
            # The pid makes names unique among running processes; skip numbers a dead process with a
            # recycled pid left behind.
            while True:
                name = f"{prefix}{os.getpid()}x{next(_counter)}"
                if not (NETNS_DIR / f"{name}-sw").exists():
                    break
        self.name = name
        self.hosts = [Host(i, f"{SUBNET}.{i + 1}", f"{name}-h{i}") for i in range(hosts)]
        self._switch = f"{name}-sw"

    @property
    def namespaces(self) -> list[str]:
        """Every namespace this cluster creates (hosts, then the switch); empty when unlimited."""
        if self._switch is None:
            return []
        return [h.netns for h in self.hosts if h.netns is not None] + [self._switch]

    def command(self, index: int, argv: list[str]) -> list[str]:
        """``argv`` run inside host ``index``'s namespace (unchanged when unlimited)."""
        host = self.hosts[index]
        if host.netns is None:
            return list(argv)
        return [tool("ip") or "ip", "netns", "exec", host.netns, *argv]

    def __enter__(self) -> EmulatedCluster:
        self.open()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        try:
            self.close()
        except ClusterError as err:
            if exc_type is None:
                raise
            # Do not hide the exception that ended the block behind a cleanup failure.
            warnings.warn(str(err), RuntimeWarning, stacklevel=2)

    # ------------------------------------------------------------------------------------- setup

    def open(self) -> None:
        """Create the namespaces, links and shaping (what ``with`` does); on any failure, remove them."""
        if self._switch is None or self._created:
            return
        if self._closed:
            raise ClusterError(f"cluster {self.name} was closed; make a new one")
        check_can_emulate(self.bandwidth)
        clash = sorted(set(self.namespaces) & set(existing_namespaces()))
        if clash:
            raise ClusterError(
                f"namespace {clash[0]} already exists (left by a killed run? `gradzip bench --cleanup` "
                "removes those)"
            )
        started = time.perf_counter()
        GUARD.register(self)
        try:
            with GUARD.deferring_signals():
                self._build()
        except BaseException:
            try:
                self.close()
            except ClusterError as err:
                warnings.warn(str(err), RuntimeWarning, stacklevel=2)
            raise
        self.setup_s = time.perf_counter() - started

    def _build(self) -> None:
        ip, tc = tool("ip") or "ip", tool("tc") or "tc"
        assert self._switch is not None
        names = self.namespaces
        # Recorded before running: if the batch fails halfway, close() deletes what exists of these (the
        # clash check above proved none of them existed before).
        self._created = [self._switch, *names[:-1]]
        run([ip, "-batch", "-"], "".join(f"netns add {n}\n" for n in self._created))

        # The switch: a bridge, and one veth per host created in place, its peer put straight into the
        # host's namespace (never through the root namespace).
        sw = [f"link add {BRIDGE} type bridge", f"link set {BRIDGE} up"]
        for h in self.hosts:
            port = f"h{h.index}"
            sw += [
                f"link add {port} type veth peer name {HOST_IF} netns {h.netns}",
                f"link set {port} master {BRIDGE}",
                f"link set {port} up",
            ]
        run([ip, "-n", self._switch, "-batch", "-"], "".join(f"{line}\n" for line in sw))

        jobs: list[tuple[list[str], str | None]] = []
        for h in self.hosts:
            assert h.netns is not None
            # lo too: gloo and other libraries may resolve or bind through loopback.
            script = f"link set lo up\naddr add {h.address}/24 dev {HOST_IF}\nlink set {HOST_IF} up\n"
            jobs.append(([ip, "-n", h.netns, "-batch", "-"], script))
            jobs.append(([tc, "-n", h.netns, "-batch", "-"], _qdisc_lines(HOST_IF, self.rate, self.delay)))
        switch_tc = "".join(_qdisc_lines(f"h{h.index}", self.rate, self.delay) for h in self.hosts)
        jobs.append(([tc, "-n", self._switch, "-batch", "-"], switch_tc))
        try:
            run_all(jobs)
        except ClusterError as exc:
            if "qdisc kind is unknown" in str(exc) and self.delay > 0:
                raise ClusterError(
                    "emulating latency needs the netem qdisc, which this kernel lacks (CONFIG_NET_SCH_NETEM, "
                    "module sch_netem); use --latency 0ms"
                ) from None
            raise

    # ---------------------------------------------------------------------------------- teardown

    def close(self) -> None:
        """Remove everything this cluster created (idempotent; safe from signal handlers and atexit)."""
        if os.getpid() != self.owner:
            return
        self._closed = True
        if not self._created:
            GUARD.unregister(self)
            return
        started = time.perf_counter()
        with GUARD.deferring_signals():
            names = list(self._created)
            delete_namespaces(names)
            remaining = sorted(set(existing_namespaces()) & set(names))
            self._created = remaining
            if not remaining:
                GUARD.unregister(self)
        self.teardown_s = time.perf_counter() - started
        if remaining:
            raise ClusterError(
                f"could not delete namespace(s) {', '.join(remaining)}; `gradzip bench --cleanup` retries"
            )


def _qdisc_lines(dev: str, rate: int | None, delay: float) -> str:
    """tc -batch lines shaping ``dev``'s egress to ``rate`` bit/s, with half the one-way ``delay`` (the
    other half is on the link's other end)."""
    assert rate is not None
    burst = max(rate // 8 // _TICKS_PER_S, _MIN_BURST_BYTES)
    tbf = f"tbf rate {rate}bit burst {burst} latency {_TBF_QUEUE}"
    if delay <= 0:
        return f"qdisc add dev {dev} root handle 1: {tbf}\n"
    half_us = max(1, round(delay / 2 * 1e6))
    # netem holds every packet sent during the delay (the shaping is after it, in its tbf child): size its
    # queue (packets) for twice the link's rate over the delay, full-sized frames, and never below the default.
    limit = max(1000, math.ceil(2 * rate / 8 * (delay / 2) / 1500))
    return (
        f"qdisc add dev {dev} root handle 1: netem delay {half_us}us limit {limit}\n"
        f"qdisc add dev {dev} parent 1:1 handle 10: {tbf}\n"
    )
