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
round trip between two hosts is ``2 * latency``.

Cleanup is guaranteed on every exit that Python sees: ``with`` (normal or exception), SIGINT, SIGTERM and
SIGHUP (the handler removes every live cluster, then behaves as the handler it replaced) and ``atexit``.
Only SIGKILL (or a crash of the interpreter) leaves namespaces, which :func:`remove_leftovers` (``gradzip
bench --cleanup``) deletes.
"""

from __future__ import annotations

import atexit
import itertools
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from types import FrameType, TracebackType
from typing import Any

BANDWIDTHS: dict[str, int | None] = {
    "100mbit": 100_000_000,
    "1gbit": 10**9,
    "10gbit": 10**10,
    "unlimited": None,
}

PREFIX = "gz"

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
_TOOL_TIMEOUT_S = 30.0
_NETNS_DIR = Path("/run/netns")
_NAME_RE = re.compile(r"^[A-Za-z0-9_.-]{1,48}$")
_NS_SUFFIX_RE = re.compile(r"-(?:h\d+|sw)$")


class ClusterError(RuntimeError):
    """The emulated cluster could not be set up or removed; the message is one line."""


@dataclass
class Host:
    index: int
    address: str  # the IP other hosts reach it at ("127.0.0.1" when unlimited)
    netns: str | None  # namespace name, None when unlimited


# --------------------------------------------------------------------------------------------- parsing

_RATE_RE = re.compile(r"^(\d+(?:\.\d+)?|\.\d+)(kbit|mbit|gbit)$")
_RATE_UNITS = {"kbit": 10**3, "mbit": 10**6, "gbit": 10**9}
_TIME_RE = re.compile(r"^(\d+(?:\.\d+)?|\.\d+)(s|ms|us)$")
_TIME_UNITS = {"s": 1.0, "ms": 1e-3, "us": 1e-6}


def parse_bandwidth(text: str) -> int | None:
    """Bits per second of ``"1gbit"``, ``"250mbit"``, ``"2.5gbit"``...; None for ``"unlimited"``."""
    key = text.strip().lower()
    if key in BANDWIDTHS:
        return BANDWIDTHS[key]
    m = _RATE_RE.match(key)
    if m:
        bits = round(float(m.group(1)) * _RATE_UNITS[m.group(2)])
        # Below ~100 kbit/s a single full frame takes longer than tbf's queue allows: useless as a link.
        if bits >= 100_000:
            return bits
    raise ValueError(
        f"invalid bandwidth {text!r}: use one of {', '.join(BANDWIDTHS)} or a rate such as 250mbit or "
        "2.5gbit (kbit, mbit, gbit; at least 100kbit)"
    )


def parse_latency(text: str) -> float:
    """Seconds of ``"0ms"``, ``"1ms"``, ``"0.5ms"``, ``"200us"``, ``"0"``."""
    key = text.strip().lower()
    if key == "0":
        return 0.0
    m = _TIME_RE.match(key)
    if m:
        seconds = float(m.group(1)) * _TIME_UNITS[m.group(2)]
        if seconds <= 10.0:  # more is surely a typo (10s instead of 10ms) and would stall every collective
            return seconds
    raise ValueError(
        f"invalid latency {text!r}: use a one-way delay such as 0ms, 1ms, 0.5ms or 200us (s, ms, us; at most 10s)"
    )


# ------------------------------------------------------------------------------------------ tools


def _tool(name: str) -> str | None:
    # sbin is often missing from non-login PATHs (sudo -E, cron), where ip and tc live.
    return shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin:/usr/bin:/bin")


def check_can_emulate(bandwidth: str) -> None:
    """Raise ClusterError (one line, saying what to do) when a cluster at ``bandwidth`` cannot be built here.

    Only the cheap checks: root and iproute2. A kernel without netns, veth, bridge or tbf support (or a
    container without CAP_NET_ADMIN) is reported by EmulatedCluster itself, with the failing command.
    """
    bits = parse_bandwidth(bandwidth)
    if bits is None:
        return
    label = bandwidth.strip().lower()
    if os.geteuid() != 0:
        raise ClusterError(
            f"emulating a {label} link needs root (network namespaces and tc); run as root or use "
            "--bandwidth unlimited"
        )
    missing = [name for name in ("ip", "tc") if _tool(name) is None]
    if missing:
        raise ClusterError(
            f"emulating a {label} link needs the {' and '.join(missing)} command{'s' if len(missing) > 1 else ''} "
            "(iproute2), not found; install iproute2 or use --bandwidth unlimited"
        )


def _last_line(text: str) -> str:
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    # ip -batch ends with "Command failed -:N", which says less than the error line before it.
    useful = [ln for ln in lines if not ln.startswith("Command failed")]
    return (useful or lines or ["no error output"])[-1]


def _run(argv: list[str], script: str | None = None) -> None:
    """Run an ip/tc command (with ``script`` as its -batch input); ClusterError naming it on failure."""
    proc = _start(argv, script)
    _finish(proc, argv, script)


def _start(argv: list[str], script: str | None = None) -> subprocess.Popen[str]:
    try:
        return subprocess.Popen(
            argv,
            stdin=subprocess.PIPE if script is not None else subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            env=dict(os.environ, LC_ALL="C"),  # stable English errors, to quote them
            # A new session: Ctrl-C in the terminal signals the whole foreground process group, and an ip
            # killed halfway through teardown would leave half a cluster. We handle the signal instead.
            start_new_session=True,
        )
    except OSError as exc:
        raise ClusterError(f"cannot run {' '.join(argv)}: {exc.strerror or exc}") from None


def _finish(proc: subprocess.Popen[str], argv: list[str], script: str | None) -> None:
    try:
        _, err = proc.communicate(script, timeout=_TOOL_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        raise ClusterError(f"{' '.join(argv)} timed out after {_TOOL_TIMEOUT_S:g}s") from None
    if proc.returncode != 0:
        where = ""
        m = re.search(r"Command failed -:(\d+)", err)
        if script is not None and m:  # quote the batch line that failed
            batch = script.splitlines()
            n = int(m.group(1))
            if 0 < n <= len(batch):
                where = f" ({batch[n - 1]!r})"
        raise ClusterError(f"{' '.join(argv)}{where} failed: {_last_line(err)}")


def _run_all(jobs: Sequence[tuple[list[str], str | None]]) -> None:
    """Run independent commands concurrently (setup cost is process start-up, not work); first error wins."""
    started: list[tuple[subprocess.Popen[str], list[str], str | None]] = []
    error: ClusterError | None = None
    for argv, script in jobs:
        try:
            started.append((_start(argv, script), argv, script))
        except ClusterError as exc:
            error = error or exc
            break
    for proc, argv, script in started:  # always reap every process started, even after an error
        try:
            _finish(proc, argv, script)
        except ClusterError as exc:
            error = error or exc
    if error is not None:
        raise error


# ------------------------------------------------------------------------------- namespaces on disk


def _existing_namespaces() -> list[str]:
    # /run/netns is where `ip netns add` mounts named namespaces; reading it is what `ip netns list` does,
    # without the process start.
    try:
        return sorted(p.name for p in _NETNS_DIR.iterdir())
    except (FileNotFoundError, NotADirectoryError, PermissionError):
        return []


def leftover_namespaces(prefix: str = PREFIX) -> list[str]:
    """Namespaces that look like an emulated cluster's (``<prefix>...-h<i>`` or ``...-sw``): a live cluster's,
    or one left behind by a killed process."""
    return [n for n in _existing_namespaces() if n.startswith(prefix) and _NS_SUFFIX_RE.search(n)]


def _owner_alive(name: str, prefix: str) -> bool:
    """Whether the process that created the automatically named namespace ``name`` still runs."""
    # The pid is the number before the last "x<n>-" (a longer prefix, like a test's, may hold digits too).
    m = re.match(rf"^{re.escape(prefix)}.*?(\d+)x\d+-(?:h\d+|sw)$", name)
    if not m:
        return False
    pid = int(m.group(1))
    if pid == os.getpid():
        return any(name in c.namespaces for c in _LIVE.values())
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_leftovers(prefix: str = PREFIX, *, force: bool = False) -> list[str]:
    """Delete the namespaces :func:`leftover_namespaces` finds (their veths and bridge go with them) and return
    their names. A cluster whose creating process still runs is left alone unless ``force``: ``gradzip bench
    --cleanup`` must not pull the network from under a benchmark running in another terminal."""
    names = [n for n in leftover_namespaces(prefix) if force or not _owner_alive(n, prefix)]
    _delete_namespaces(names)
    remaining = set(_existing_namespaces()) & set(names)
    if remaining:
        raise ClusterError(f"could not delete namespace(s) {', '.join(sorted(remaining))}")
    return names


def _pids_in(names: Sequence[str]) -> list[int]:
    """Processes inside the named namespaces (what `ip netns pids` does, for all names in one scan)."""
    wanted = set()
    for name in names:
        try:
            st = os.stat(_NETNS_DIR / name)
        except OSError:
            continue
        wanted.add((st.st_dev, st.st_ino))
    if not wanted:
        return []
    pids = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            st = os.stat(f"/proc/{entry.name}/ns/net")
        except OSError:  # exited meanwhile, or not ours to inspect
            continue
        if (st.st_dev, st.st_ino) in wanted:
            pids.append(int(entry.name))
    return pids


def _delete_namespaces(names: Sequence[str]) -> None:
    if not names:
        return
    # A process still inside (a worker the caller did not reap) keeps an unnamed copy of its namespace
    # alive after `ip netns del`; only processes run through the cluster can be in there, so end them.
    for pid in _pids_in(names):
        if pid == os.getpid():
            continue
        with suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)
    ip = _tool("ip") or "ip"
    # -force: carry on past a namespace that is already gone; the caller checks what remains.
    script = "".join(f"netns del {n}\n" for n in names)
    with suppress(ClusterError):
        _run([ip, "-force", "-batch", "-"], script)


# ----------------------------------------------------------------------------- signals and atexit

# Clusters with something to remove, by id; only the process that created a cluster removes it (a forked
# child inherits this table and the handlers, and must not tear down its parent's network).
_LIVE: dict[int, EmulatedCluster] = {}
_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
_saved_handlers: dict[int, Any] = {}
_atexit_registered = False
# Setup and teardown must not be cut in half by our own handler (an `ip netns add` finishing after the
# handler removed the namespaces would recreate one): a signal arriving meanwhile waits for them to finish.
_critical_depth = 0
_pending_signals: list[tuple[int, Any]] = []  # (signal, the handler it replaced)


def _close_all() -> None:
    for cluster in list(_LIVE.values()):
        if cluster._owner != os.getpid():
            continue
        try:
            cluster.close()
        except ClusterError as exc:
            print(f"gradzip: {exc}", file=sys.stderr)


def _on_signal(signum: int, frame: FrameType | None) -> None:
    # Looked up now: by the time a deferred signal is handed on, the last close() has restored the handlers.
    previous = _saved_handlers.get(signum, signal.SIG_DFL)
    if _critical_depth:
        _pending_signals.append((signum, previous))
        return
    _hand_on(signum, frame, previous)


def _hand_on(signum: int, frame: FrameType | None, previous: Any) -> None:
    """Remove every live cluster, then do what the replaced handler would have done."""
    _close_all()
    if previous is signal.SIG_IGN:
        return
    if callable(previous):  # e.g. Python's default for SIGINT: raise KeyboardInterrupt
        previous(signum, frame)
        return
    # The default action (terminate): restore it and re-raise, so the exit status still says "killed by".
    signal.signal(signum, signal.SIG_DFL)
    os.kill(os.getpid(), signum)


@contextmanager
def _deferring_signals() -> Iterator[None]:
    # Handlers run in the main thread only, so only its own setup or teardown can be cut short by them.
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    global _critical_depth
    _critical_depth += 1
    try:
        yield
    finally:
        _critical_depth -= 1
        if not _critical_depth and _pending_signals:
            signum, previous = _pending_signals[0]
            _pending_signals.clear()
            _hand_on(signum, None, previous)


def _register(cluster: EmulatedCluster) -> None:
    global _atexit_registered
    _LIVE[id(cluster)] = cluster
    if not _atexit_registered:
        atexit.register(_close_all)
        _atexit_registered = True
    # Python only lets the main thread install handlers; elsewhere `with` and atexit still clean up.
    if threading.current_thread() is threading.main_thread() and not _saved_handlers:
        for sig in _SIGNALS:
            previous = signal.getsignal(sig)
            if previous is None:  # installed outside Python: we could not hand the signal back to it
                continue
            if previous is signal.SIG_IGN:  # e.g. SIGHUP under nohup: ignored it is, and stays
                continue
            _saved_handlers[sig] = previous
            signal.signal(sig, _on_signal)


def _unregister(cluster: EmulatedCluster) -> None:
    _LIVE.pop(id(cluster), None)
    if _LIVE or threading.current_thread() is not threading.main_thread():
        return
    for sig, previous in _saved_handlers.items():
        if signal.getsignal(sig) is _on_signal:
            signal.signal(sig, previous)
    _saved_handlers.clear()


# ------------------------------------------------------------------------------------------ cluster

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
        self._owner = os.getpid()
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
                if not (_NETNS_DIR / f"{name}-sw").exists():
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
        return [_tool("ip") or "ip", "netns", "exec", host.netns, *argv]

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
        clash = sorted(set(self.namespaces) & set(_existing_namespaces()))
        if clash:
            raise ClusterError(
                f"namespace {clash[0]} already exists (left by a killed run? `gradzip bench --cleanup` "
                "removes those)"
            )
        started = time.perf_counter()
        _register(self)
        try:
            with _deferring_signals():
                self._build()
        except BaseException:
            try:
                self.close()
            except ClusterError as err:
                warnings.warn(str(err), RuntimeWarning, stacklevel=2)
            raise
        self.setup_s = time.perf_counter() - started

    def _build(self) -> None:
        ip, tc = _tool("ip") or "ip", _tool("tc") or "tc"
        assert self._switch is not None
        names = self.namespaces
        # Recorded before running: if the batch fails halfway, close() deletes what exists of these (the
        # clash check above proved none of them existed before).
        self._created = [self._switch, *names[:-1]]
        _run([ip, "-batch", "-"], "".join(f"netns add {n}\n" for n in self._created))

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
        _run([ip, "-n", self._switch, "-batch", "-"], "".join(f"{line}\n" for line in sw))

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
            _run_all(jobs)
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
        if os.getpid() != self._owner:
            return
        self._closed = True
        if not self._created:
            _unregister(self)
            return
        started = time.perf_counter()
        with _deferring_signals():
            names = list(self._created)
            _delete_namespaces(names)
            remaining = sorted(set(_existing_namespaces()) & set(names))
            self._created = remaining
            if not remaining:
                _unregister(self)
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
